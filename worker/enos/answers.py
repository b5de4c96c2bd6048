"""Reading the gateway's answers: pure functions from (status, headers, bytes) to typed replies
or classified errors. No I/O, no clock (but Retry-After's HTTP date), no aiohttp: the client
sends, this module decides what came back, and tests drive it with plain bytes.

Nothing the gateway says is trusted: every string kept is capped and masked
(:func:`gateway_text`), ids are bounded, odd shapes become "unreadable", never a clean nothing.
"""

from __future__ import annotations

import email.utils
import math
import time
import zlib
from collections.abc import Callable, Mapping
from typing import Any

import orjson
import structlog

from worker import redact
from worker.enos import protocol as p
from worker.enos.commands import command_full, command_of, read_commands
from worker.errors import (
    AuthError,
    FatalError,
    OversizedAnswerError,
    PermissionDeniedError,
    RateLimitedError,
    RetryableError,
    TargetError,
)
from worker.model import CancelReply, Command, SearchPage

log = structlog.get_logger("worker.enos")
Payload = dict[str, Any]  # a parsed JSON answer: the wire's shape, checked field by field here


class TokenRejected(Exception):
    """The gateway refused the access token (HTTP 401 or code 1203): renew once and retry."""


def cancel_reply(
    status: int, payload: Payload, read: Callable[[object], Command | str]
) -> CancelReply:
    """A code-0 answer to a cancel, each listed command read by `read`."""
    commands, unreadable, problem = read_commands(payload.get("data"), read)
    return CancelReply(
        http_status=status,
        code=p.CODE_OK,
        msg=gateway_text(payload.get("msg")),
        request_id=request_id_of(payload),
        commands=commands,
        unreadable=unreadable,
        problem=problem,
    )


def got_command(payload: Payload) -> Command:
    """The one command of a Get Command answer."""
    command = command_of(payload.get("data"))
    if isinstance(command, str):
        raise malformed(f"get returned no readable command: {command}", payload)
    return command


def search_page(payload: Payload, page_size: int, page: int = 1) -> SearchPage:
    """Page `page` of a Search Command answer, with every field a match looks at.

    Only the documented shape is read: `data` a list of at most `page_size` Command objects,
    each with a readable id, and `pagination` an object whose `totalSize` is a non-negative
    integer. Anything else could hide a command to cancel, so it is an unreadable answer for
    the target (final: a search changes nothing, and the same answer would come again), never
    a clean "nothing". So is an answer that asks for a page past the bound
    (:func:`max_search_pages`): a device cannot cache that many commands.
    """
    data = payload.get("data")
    if type(data) is not list:
        raise unreadable_search(f"'data' is {_kind(data)}, not a list of commands", payload)
    if len(data) > page_size:
        raise unreadable_search(f"it lists {len(data)} commands on a page of {page_size}", payload)
    commands, unreadable, problem = read_commands(data, command_full)
    if unreadable:
        raise unreadable_search(problem or "a command cannot be read", payload)
    pagination = payload.get("pagination")
    if type(pagination) is not dict:
        raise unreadable_search(f"'pagination' is {_kind(pagination)}, not an object", payload)
    total = pagination.get("totalSize")
    if type(total) is not int or total < 0:
        raise unreadable_search("'pagination.totalSize' is not a non-negative integer", payload)
    found = SearchPage(commands, total, 0, page_size, request_id_of(payload))
    if found.more(page) and page >= max_search_pages(page_size):
        raise TargetError(
            f"the search answer counts {total:,} commands, more than {page} pages of "
            f"{page_size}; a device caches at most {p.MAX_CACHED_COMMANDS}, so it was not read "
            "further: the device's cached commands are unknown",
            http_status=200,
            request_id=found.request_id,
        )
    return found


def max_search_pages(page_size: int) -> int:
    """The pages of one device's search read at the most: as many as hold
    ``p.MAX_SEARCH_COMMANDS`` (3 pages of the 50 asked for). A device caches at most 50
    commands, so its ``state = 1`` commands fit the first page; the margin is for commands
    cached while the pages are read. Past it, a `totalSize` that never ends the paging (or
    pages that never do) would make one target search without end."""
    return max(1, -(-p.MAX_SEARCH_COMMANDS // page_size))


def unreadable_search(what: str, payload: Mapping[str, Any]) -> TargetError:
    """A search answer of a shape the docs do not give: the target fails, saying so."""
    return TargetError(
        f"the search answer is not of the documented shape ({what}); the device's cached "
        "commands are unknown",
        http_status=200,
        request_id=request_id_of(payload),
    )


def _kind(value: object) -> str:
    return "missing" if value is None else f"a {type(value).__name__}"


def interpret(
    status: int, headers: Mapping[str, str], raw: bytes, max_retry_after: float
) -> Payload:
    """Map a business answer to its payload, or raise the classified error it stands for."""
    if status != 200:
        raise_for_http(status, headers, max_retry_after)
    payload = json_object(raw)
    code = payload.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise malformed("the answer has no integer 'code'", payload)
    if code == p.CODE_OK:
        return payload
    message, request_id = gateway_text(payload.get("msg")), request_id_of(payload)
    if code == p.TOKEN_EXPIRED:
        raise TokenRejected
    if code == p.CODE_NO_PERMISSION:
        raise PermissionDeniedError(
            f"no permission: {message}", code=code, http_status=status, request_id=request_id
        )
    if code == p.CODE_INTERNAL:
        raise RetryableError(
            f"internal error: {message}",
            maybe_applied=True,
            code=code,
            http_status=status,
            request_id=request_id,
        )
    raise TargetError(
        message or f"code {code}", code=code, http_status=status, request_id=request_id
    )


def raise_for_http(status: int, headers: Mapping[str, str], max_retry_after: float) -> None:
    if status == 401:
        raise TokenRejected
    if status == 403:
        raise PermissionDeniedError("the gateway refused access (HTTP 403)", http_status=403)
    if status == 429:
        retry_after = capped_retry_after(headers.get("Retry-After"), max_retry_after)
        raise RateLimitedError("rate limited (HTTP 429)", retry_after=retry_after, request_id=None)
    if status >= 500:
        raise RetryableError(f"gateway error HTTP {status}", maybe_applied=True, http_status=status)
    if 300 <= status < 400:
        raise FatalError(
            f"the gateway answered HTTP {status} (a redirect); worker never follows one, since "
            "it would resend signed calls elsewhere: pass the final API gateway URL as --gateway",
            http_status=status,
        )
    if status == 404:
        raise FatalError(
            "the gateway has no such API (HTTP 404); check that --gateway is the API gateway's "
            "base URL",
            http_status=404,
        )
    raise TargetError(f"HTTP {status}", http_status=status)


def token_reply(
    status: int, headers: Mapping[str, str], raw: bytes, max_retry_after: float
) -> tuple[str, float] | None:
    """The (token, expire) of a token answer; None for a replay (1001); raise otherwise."""
    if status in (401, 403):
        raise AuthError(f"the token service refused the application (HTTP {status})")
    if status != 200:
        raise_for_http(status, headers, max_retry_after)
    payload = json_object(raw)
    outcome = payload.get("status")
    data = payload.get("data")
    if outcome == p.TOKEN_OK and isinstance(data, dict):
        token, expire = data.get("accessToken"), data.get("expire")
        if isinstance(token, str) and token and isinstance(expire, int | float) and expire > 0:
            problem = token_problem(token)
            if problem is not None:
                raise AuthError(
                    f"the token service issued an access token that cannot be sent ({problem}); "
                    "nothing was sent with it. Check that --gateway is the EnOS API gateway and "
                    "that its token service works"
                )
            return token, float(expire)
        raise malformed("the token answer has no accessToken/expire", payload)
    if outcome == p.TOKEN_REPLAYED:
        return None
    if outcome == p.TOKEN_REFRESH_FAILED:
        raise TokenRejected
    if outcome == p.TOKEN_INTERNAL:
        raise RetryableError("the token service failed (1005)", maybe_applied=False, code=1005)
    raise AuthError(
        f"the token service rejected the application credentials (status {gateway_text(outcome)}: "
        f"{gateway_text(payload.get('msg'))}); check ENOS_APP_KEY and ENOS_APP_SECRET",
        code=outcome if isinstance(outcome, int) else None,
    )


MAX_TOKEN_LENGTH = 4096  # characters: an access token is a header value on every call


def token_problem(token: str) -> str | None:
    """What makes an access token unusable, without quoting it; None when it is fine.

    A token goes into a header of every call: a newline or another control character would be
    refused by the HTTP library before anything is sent (or split the header), a space or a
    non-ASCII letter is not what a token service issues, and a huge one makes every call too
    large for the gateway (each then fails alike). Refusing it once, when it is obtained, stops
    the run with this reason instead of failing every target.
    """
    if len(token) > MAX_TOKEN_LENGTH:
        return f"it is {len(token):,} characters long (at most {MAX_TOKEN_LENGTH:,})"
    if token.isascii() and token.isprintable() and " " not in token:
        return None
    for position, char in enumerate(token):
        if char == " ":
            return f"it holds a space at character {position + 1}"
        if not char.isascii():
            return f"it holds a letter that is not printable ASCII at character {position + 1}"
        if not char.isprintable():
            return f"it holds a control character at character {position + 1}"
    return None  # unreachable: one of the checks above failed


def capped_retry_after(value: str | None, cap: float) -> float | None:
    """Retry-After, at most `cap` seconds: a gateway must not pause the run for days."""
    wanted = parse_retry_after(value)
    if wanted is not None and wanted > cap:
        log.warning("worker.retry_after_capped", asked_s=gateway_text(value)[:40], used_s=cap)
        return cap
    return wanted


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date); None if absent/bad.
    `inf` is kept (the caller caps it); `nan` is nonsense and ignored."""
    if not value or len(value) > 64:
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return None if math.isnan(seconds) else max(0.0, seconds)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def json_object(raw: bytes) -> Payload:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RetryableError(
            f"the answer is not JSON ({len(raw)} bytes)", maybe_applied=True, http_status=200
        ) from None
    if not isinstance(payload, dict):
        raise RetryableError("the answer is not a JSON object", maybe_applied=True, http_status=200)
    return payload


ACCEPTED_ENCODINGS = "gzip, deflate"  # what the client asks for, and all inflate() decodes
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def inflate(raw: bytes, encoding: str, cap: int, status: int) -> bytes:
    """`raw` decompressed as its Content-Encoding says, never past `cap` bytes.

    The cap is on what comes out: a 1 MB gzip answer can inflate to 1 GiB. zlib is asked for at
    most what is left under the cap (+1 byte, to see it passed), so no step allocates more than
    that, whatever the input; each member of a concatenated gzip answer counts against the same
    cap. A stream that stops before its end was cut short (its effect unknown, like a cut-off
    plain body); a corrupt one is unreadable; an encoding not asked for is refused by name.
    ``deflate`` is the zlib format (RFC 9110), or bare deflate data as some servers send it.
    """
    name = encoding.strip().lower()
    if name in ("", "identity"):
        return raw
    wbits = _WBITS.get(name)
    if wbits is None:
        raise RetryableError(
            f"the answer is encoded as '{gateway_text(encoding)[:40]}', which was not asked for "
            f"({ACCEPTED_ENCODINGS})",
            maybe_applied=True,
            http_status=status,
        )
    if name == "deflate" and not _zlib_header(raw):
        wbits = -zlib.MAX_WBITS
    parts, size, rest = [], 0, raw
    while rest:
        stream = zlib.decompressobj(wbits)
        try:
            part = stream.decompress(rest, cap + 1 - size)
        except zlib.error:
            raise RetryableError(
                f"the answer's {name} data is corrupt", maybe_applied=True, http_status=status
            ) from None
        size += len(part)
        if size > cap:
            raise oversized(cap, status)
        if not stream.eof:  # all input used, less than asked for came out: it stops early
            raise RetryableError("the answer was cut short", maybe_applied=True, http_status=status)
        parts.append(part)
        rest = stream.unused_data if wbits > zlib.MAX_WBITS else b""  # the next gzip member
    return b"".join(parts)


def _zlib_header(raw: bytes) -> bool:
    """Whether `raw` starts with a zlib header (RFC 1950: deflate, a window of at most 32 KiB,
    and the check bits), rather than bare deflate data."""
    return (
        len(raw) >= 2
        and raw[0] & 0x0F == 8
        and raw[0] >> 4 <= 7
        and ((raw[0] << 8 | raw[1]) % 31 == 0)
    )


def oversized(cap: int, status: int) -> RetryableError:
    """An answer past the cap: not read further; it may have taken effect."""
    return OversizedAnswerError(
        f"the answer is larger than {cap:,} bytes; not read", maybe_applied=True, http_status=status
    )


def malformed(what: str, payload: Mapping[str, Any]) -> RetryableError:
    return RetryableError(
        what, maybe_applied=True, http_status=200, request_id=request_id_of(payload)
    )


TEXT_CAP = 1000  # characters of gateway text kept in a record


def gateway_text(value: object) -> str:
    """Gateway text for a record: a string, capped, with every registered secret masked (the
    gateway's text is never trusted). It is masked before it is cut, so that a cut cannot
    leave the start of a secret; only as far past the cut as a secret can reach, so that a
    1 MB message costs no more than a short one."""
    text = value if type(value) is str else "" if value is None else str(value)
    if len(text) > TEXT_CAP:
        return redact.scrub_text(text[: TEXT_CAP + redact.reach()])[:TEXT_CAP] + "...[cut]"
    return redact.scrub_text(text)


def request_id_of(payload: Mapping[str, Any]) -> str | None:
    value = payload.get("requestId")
    return gateway_text(value)[:128] if value is not None else None
