"""Secrets never leave the process: one registry of the values to mask, used everywhere.

The app secret is registered when the credentials are loaded, every access token when the
client obtains it, every token request's ``encryption`` when it is made. Two kinds of text are
masked, by two rules:

- **The gateway's text** (every string of an answer that is kept: ``msg``, ``requestId``,
  command ids, error text): checked once decoded from JSON, so ``\\u0074ok`` escapes do not hide
  a secret, and in any case. Every registered secret is masked wherever it occurs, and so is
  every run of 64 hex digits: a request's signature and a token request's ``encryption`` are
  sha256 digests in hex, so this masks every one ever sent (a registry of them would grow by
  one a request) and the gateway has no business sending one back. A command id that carries a
  secret is not masked but refused (:func:`carries_secret`): a masked id would be a claim.
  Only the gateway's own strings are matched, never JSON keys: an access token spelt like a
  key (``commandId``) cannot break the answer it is in.
- **Our own text** (log lines): registered secrets are masked in any case, but never in keys or
  event names, and an access token that reads as ordinary words (letters only, maybe joined by
  ``.``, ``_`` or ``-``) is not used there: the gateway chooses its token, and must not be able
  to censor our words by choosing ``finished``. An honest token is random, not a word; and the
  gateway's text, where a token can be echoed, is masked by the first rule.
"""

from __future__ import annotations

import re
from collections import deque

REDACTED = "[redacted]"
MIN_LENGTH = 8  # shorter values would mask ordinary text
DIGEST_LENGTH = 64  # a sha256 digest in hex: a signature, an encryption
_DIGEST = "[0-9a-fA-F]{%d}" % DIGEST_LENGTH  # noqa: UP031 (a regex: braces)
_WORDS = re.compile(r"[A-Za-z]+(?:[._-][A-Za-z]+)*")
RECENT_DIGESTS = 256  # encryptions kept for our own text (one per token call)

_secrets: dict[str, bool] = {}  # lowercased secret -> masked in our own text too
_digests: deque[str] = deque(maxlen=RECENT_DIGESTS)
_in_gateway_text = re.compile(_DIGEST)
_in_own_text: re.Pattern[str] | None = None
_shortest = DIGEST_LENGTH  # no text shorter than this can hold a secret
_digit_secret = False  # a secret made of digits only: digit ids are checked too
_reach = DIGEST_LENGTH  # the longest secret: how far past a cut a secret may reach


def register(value: str, *, chosen_by_gateway: bool = False) -> None:
    """Mask this secret wherever it would be written or logged, from now on.

    `chosen_by_gateway`: an access token; if it reads as ordinary words, it is masked in the
    gateway's text only (see the module's docstring).
    """
    lowered = value.lower()
    if len(value) < MIN_LENGTH or lowered in _secrets:
        return
    _secrets[lowered] = not (chosen_by_gateway and _WORDS.fullmatch(value))
    _compile()


def register_digest(value: str) -> None:
    """Mask this per-request digest (a token request's ``encryption``) in our own text too;
    the last few are kept. In the gateway's text every digest is masked anyway."""
    lowered = value.lower()
    if len(lowered) >= MIN_LENGTH and lowered not in _digests:
        _digests.append(lowered)
        _compile()


def _compile() -> None:
    """The patterns, rebuilt when a secret is registered (rarely: a token lasts hours)."""
    global _in_gateway_text, _in_own_text, _shortest, _digit_secret, _reach  # noqa: PLW0603 (one registry per process, by design)
    longest_first = sorted(_secrets, key=len, reverse=True)
    _in_gateway_text = re.compile(
        "|".join([*map(re.escape, longest_first), _DIGEST]), re.IGNORECASE
    )
    own = [s for s in longest_first if _secrets[s]] + sorted(_digests, key=len, reverse=True)
    _in_own_text = re.compile("|".join(map(re.escape, own)), re.IGNORECASE) if own else None
    _shortest = min([DIGEST_LENGTH, *map(len, _secrets)])
    _digit_secret = any(s.isdigit() for s in _secrets)
    _reach = max([DIGEST_LENGTH, *map(len, _secrets)])


def reach() -> int:
    """The longest text a secret can take: a text cut at N characters is scrubbed up to
    N + reach() first, so that no cut leaves the start of a secret unmasked."""
    return _reach


def scrub_text(text: str) -> str:
    """Gateway text with every registered secret (any case) and every hex digest masked."""
    if len(text) < _shortest:
        return text
    return _in_gateway_text.sub(REDACTED, text)


def carries_secret(text: str) -> bool:
    """Whether gateway text (a command id) holds a registered secret or a hex digest.

    The hot path (once per command of every answer): an id of digits, as EnOS gives them, is
    cleared without a search unless a secret is made of digits.
    """
    if len(text) < _shortest:
        return False
    if len(text) < DIGEST_LENGTH and text.isdigit() and text.isascii() and not _digit_secret:
        return False
    return _in_gateway_text.search(text) is not None


def scrub_own(text: str) -> str:
    """Our own text (a log value) with the secrets it may be matched against masked."""
    pattern = _in_own_text
    if pattern is None or len(text) < MIN_LENGTH:
        return text
    return pattern.sub(REDACTED, text)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def printable(text: str) -> str:
    """Text from the gateway or a file, safe for a terminal: control characters (ESC, CR, LF,
    OSC...), zero-width and bidi characters shown escaped (``\\x1b``), never obeyed."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)
