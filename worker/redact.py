"""Secrets never leave the process: one registry of the values to mask, used everywhere.

The app secret is registered when the credentials are loaded, every access token when the
client obtains it. The log pipeline masks them in every event; the client masks them (and the
signature of the request just sent) in the raw bytes of every gateway answer before the answer
is parsed, so a gateway that echoes request headers cannot put them into a journal, an audit
record, a log line or a report.
"""

from __future__ import annotations

REDACTED = "[redacted]"
_REDACTED_BYTES = REDACTED.encode()
MIN_LENGTH = 8  # shorter values would mask ordinary text
_values: set[str] = set()
_needles: tuple[bytes, ...] = ()


def register(value: str) -> None:
    """Mask this exact text wherever it would be written or logged, from now on."""
    global _needles  # noqa: PLW0603 (one registry per process, by design)
    if len(value) >= MIN_LENGTH and value not in _values:
        _values.add(value)
        _needles = tuple(sorted((v.encode() for v in _values), key=len, reverse=True))


def scrub_text(text: str) -> str:
    """`text` with every registered secret masked."""
    for value in _values:
        if value in text:
            text = text.replace(value, REDACTED)
    return text


def scrub_bytes(raw: bytes, *extra: bytes) -> bytes:
    """`raw` with every registered secret (and `extra`, e.g. this request's signature) masked.

    The hot path: a handful of substring searches, no copy when nothing is found.
    """
    for needle in (*extra, *_needles):
        if needle and needle in raw:
            raw = raw.replace(needle, _REDACTED_BYTES)
    return raw
