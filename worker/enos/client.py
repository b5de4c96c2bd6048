"""An aiohttp client for one EnOS API gateway: token cache and renewal, signing, typed replies.

It reports what happened and never retries on its own (retrying belongs to the engine), with one
exception the protocol demands: a rejected access token is renewed once and the call sent once
more. Every failure becomes one of the classified errors in :mod:`worker.errors`.
"""

from __future__ import annotations

import asyncio
import email.utils
import math
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from yarl import URL

from worker import redact
from worker.enos import protocol as p
from worker.enos.signing import request_signature, token_encryption
from worker.errors import (
    AuthError,
    FatalError,
    PermissionDeniedError,
    RateLimitedError,
    RetryableError,
    TargetError,
)
from worker.model import CancelReply, Command, Credentials, SearchPage, Target

log = structlog.get_logger("worker.enos")
MAX_BODY = 1 << 20  # bytes of an answer read at the most
MAX_RETRY_AFTER_S = 300.0  # the longest pause a Retry-After may ask for

Params = list[tuple[str, str]]


@dataclass(slots=True)
class _Token:
    value: str
    renew_at: float  # clock time after which the token is renewed before use


class _TokenRejected(Exception):
    """The gateway refused the access token (HTTP 401 or code 1203): renew once and retry."""


def device_params(target: Target) -> Params:
    """The query parameters naming the target's org and device (not its command)."""
    target.check()
    params: Params = [("orgId", target.org_id)]
    if target.asset_id is not None:
        params.append(("assetId", target.asset_id))
    else:
        params += [("productKey", target.product_key or ""), ("deviceKey", target.device_key or "")]
    return params


class EnOSClient:
    """One gateway, one connection pool, one cached access token shared by all callers."""

    def __init__(
        self,
        gateway: str,
        credentials: Credentials,
        *,
        concurrency: int = 16,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        max_body: int = MAX_BODY,
        max_retry_after: float = MAX_RETRY_AFTER_S,
        ca_bundle: Path | None = None,
    ) -> None:
        self._base = URL(gateway.rstrip("/"))
        self._commands_prefix = str(self._api_url(p.COMMANDS_PATH)) + "?"
        self._credentials = credentials
        self._concurrency = concurrency
        self._timeout = timeout
        self._clock = clock
        self._max_body = max_body
        self._max_retry_after = max_retry_after
        self._ca_bundle = ca_bundle
        self._session: aiohttp.ClientSession | None = None
        self._token: _Token | None = None
        self._renewal = asyncio.Lock()
        self._last_token_ts = 0
        self.token_requests = 0

    def _api_url(self, path: str) -> URL:
        """An API path below the gateway's base URL (which may carry a path prefix)."""
        return self._base / path.lstrip("/")

    async def __aenter__(self) -> EnOSClient:
        # TLS is verified: against --ca-bundle when given, else the system store (which
        # honours SSL_CERT_FILE / SSL_CERT_DIR).
        context = ssl.create_default_context(cafile=self._ca_bundle)
        connector = aiohttp.TCPConnector(
            limit=self._concurrency, limit_per_host=self._concurrency, ttl_dns_cache=300,
            ssl=context,
        )  # fmt: skip
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=self._timeout)
        )
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    # -- business operations --------------------------------------------------------------

    async def authenticate(self) -> None:
        """Obtain an access token now: proves the credentials and the gateway, cancels nothing."""
        await self._access_token()

    async def cancel(self, target: Target) -> CancelReply:
        """Cancel one cached command of the target's device, or all of them without an id."""
        params = device_params(target)
        if target.command_id is not None:
            params.append(("commandId", target.command_id))
        return await self._cancel(params, _command_id)

    async def cancel_assets(self, targets: Sequence[Target]) -> CancelReply:
        """Cancel every cached command of several assets of one org in one call
        (``assetId=a1,a2,...``, signed as the decoded value); each returned command keeps its
        ``assetId``, which attributes it to its target."""
        first = targets[0]
        first.check()
        params = [("orgId", first.org_id), ("assetId", ",".join(t.asset_id or "" for t in targets))]
        return await self._cancel(params, _command_of_asset)

    async def _cancel(self, params: Params, read: Callable[[object], Command | str]) -> CancelReply:
        """One cancel call and its code-0 answer, each listed command read by `read`."""
        status, payload = await self._business("POST", p.ACTION_CANCEL, params, b"")
        commands, unreadable, problem = read_commands(payload.get("data"), read)
        return CancelReply(
            http_status=status,
            code=p.CODE_OK,
            msg=_text(payload.get("msg")),
            request_id=_request_id(payload),
            commands=commands,
            unreadable=unreadable,
            problem=problem,
        )

    async def get_command(self, target: Target, command_id: str) -> Command:
        """The current state of one command of the target's device."""
        params = [*device_params(target), ("commandId", command_id)]
        _, payload = await self._business("GET", p.ACTION_GET, params, b"")
        command = _command(payload.get("data"))
        if isinstance(command, str):
            raise _malformed(f"get returned no readable command: {command}", payload)
        return command

    async def search_page(
        self,
        target: Target,
        expression: str | None,
        page: int,
        *,
        page_size: int = p.SEARCH_PAGE_SIZE,
    ) -> SearchPage:
        """One page of the device's commands matching `expression` (e.g. ``state = 1``), with
        every field a match looks at; commands whose id cannot be read are only counted."""
        query: dict[str, Any] = {"pagination": {"pageNo": page, "pageSize": page_size}}
        if expression is not None:
            query["expression"] = expression
        params = device_params(target)
        _, payload = await self._business("POST", p.ACTION_SEARCH, params, orjson.dumps(query))
        commands, unreadable, _ = read_commands(payload.get("data"), _command_full)
        pagination = payload.get("pagination")
        total = pagination.get("totalSize") if isinstance(pagination, dict) else None
        return SearchPage(commands, total if type(total) is int else None, unreadable, page_size,
                          _request_id(payload))  # fmt: skip

    async def search_commands(
        self, target: Target, expression: str | None = None, *, page_size: int = p.SEARCH_PAGE_SIZE
    ) -> list[Command]:
        """All commands of the device matching `expression`, every page."""
        found: list[Command] = []
        page = 1
        while True:
            batch = await self.search_page(target, expression, page, page_size=page_size)
            if batch.unreadable:
                raise _malformed("a search answer lists a command without a readable id", {})
            found.extend(batch.commands)
            if not batch.more(page):
                return found
            page += 1

    # -- signing and sending --------------------------------------------------------------

    async def _business(
        self, method: str, action: str, params: Params, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        """Send one signed business call; renew a rejected token once and send it again."""
        token = await self._access_token()
        try:
            return await self._send(method, action, params, body, token)
        except _TokenRejected:
            token = await self._renew_rejected(token)
        try:
            return await self._send(method, action, params, body, token)
        except _TokenRejected:
            raise AuthError(
                "the gateway rejected a freshly issued access token; check that the application "
                "(ENOS_APP_KEY) is valid and enabled for this API",
                http_status=401,
            ) from None

    async def _send(
        self, method: str, action: str, params: Params, body: bytes, token: str
    ) -> tuple[int, dict[str, Any]]:
        query = [("action", action), *params]
        timestamp = str(int(self._clock() * 1000))
        headers = {
            p.HEADER_TOKEN: token,
            p.HEADER_TIMESTAMP: timestamp,
            p.HEADER_SIGNATURE: request_signature(
                token, query, body, timestamp, self._credentials.app_secret
            ),
        }
        if body:
            headers["Content-Type"] = p.JSON_CONTENT_TYPE
        url = URL(self._commands_prefix + _query_string(query), encoded=True)
        status, headers_in, raw = await self._exchange(method, url, headers, body)
        # The gateway's text is never trusted: what it echoes of this request is masked.
        raw = redact.scrub_bytes(raw, token.encode(), headers[p.HEADER_SIGNATURE].encode())
        return status, _interpret(status, headers_in, raw, self._max_retry_after)

    async def _exchange(
        self, method: str, url: URL, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP exchange; transport failures become RetryableError."""
        if self._session is None:
            raise RuntimeError("EnOSClient used outside 'async with'")
        try:
            async with self._session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            ) as resp:
                length = resp.content_length
                if length is not None and length <= self._max_body:
                    return resp.status, resp.headers, await resp.read()
                return resp.status, resp.headers, await self._read_capped(resp)
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FatalError(
                f"the gateway's TLS certificate was not accepted ({_text(exc.certificate_error)}"
                "); if it is signed by a private CA, pass --ca-bundle FILE (or set SSL_CERT_FILE)"
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise RetryableError(
                "timed out connecting to the gateway", maybe_applied=False
            ) from None
        except TimeoutError:
            raise RetryableError(
                f"no answer within {self._timeout:g} s", maybe_applied=True
            ) from None
        except aiohttp.ClientConnectorError as exc:
            raise RetryableError(
                f"cannot connect to the gateway: {exc.os_error}", maybe_applied=False
            ) from None
        except aiohttp.ClientPayloadError:
            raise RetryableError("the answer was cut short", maybe_applied=True) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(
                f"connection lost: {type(exc).__name__}", maybe_applied=True
            ) from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, unless it grows past the cap: then the connection is dropped (a gateway
        that answers without end must not exhaust memory) and the attempt is retried."""
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                resp.close()
                raise RetryableError(
                    f"the answer is larger than {self._max_body:,} bytes; not read",
                    maybe_applied=True,
                    http_status=resp.status,
                )
            chunks.append(chunk)
        return b"".join(chunks)

    # -- the access token ---------------------------------------------------------------

    async def _access_token(self) -> str:
        """The cached token, renewed first when it is close to expiring; one renewal at a time."""
        token = self._token
        if token is not None and self._clock() < token.renew_at:
            return token.value
        async with self._renewal:
            token = self._token
            if token is None or self._clock() >= token.renew_at:
                previous = token.value if token is not None else None
                self._token = token = await self._obtain_token(previous)
            return token.value

    async def _renew_rejected(self, rejected: str) -> str:
        """Replace a token the gateway refused, unless a concurrent caller already did."""
        async with self._renewal:
            token = self._token
            if token is None or token.value == rejected:
                self._token = token = await self._obtain_token(None)
            return token.value

    async def _obtain_token(self, previous: str | None) -> _Token:
        """Refresh `previous` when there is one (falling back to get), else get a token."""
        if previous is not None:
            try:
                return await self._token_call(p.TOKEN_REFRESH_PATH, previous)
            except _TokenRejected:
                log.info("enos.token_refresh_refused", fallback="get")
        try:
            return await self._token_call(p.TOKEN_GET_PATH, None)
        except _TokenRejected:
            raise AuthError("the token service refused to issue an access token") from None

    async def _token_call(self, path: str, previous: str | None) -> _Token:
        for _ in range(2):  # a replayed timestamp (1001) is answered once more with a fresh one
            body = self._token_body(previous)
            self.token_requests += 1
            status, headers, raw = await self._exchange(
                "POST", self._api_url(path), {"Content-Type": p.JSON_CONTENT_TYPE}, body
            )
            # Not byte-scrubbed: a token answer legitimately holds a token (the same one again,
            # while it is valid); what is kept of it goes through _text(), which masks.
            reply = _token_reply(status, headers, raw, self._max_retry_after)
            if reply is not None:
                value, expire = reply
                redact.register(value)  # from now on masked in every output, also once replaced
                log.info("enos.token_obtained", expires_in_s=expire)
                margin = min(300.0, 0.1 * expire)
                return _Token(value, self._clock() + expire - margin)
        raise RetryableError(
            "the token service kept reporting a replayed request", maybe_applied=False
        )

    def _token_body(self, previous: str | None) -> bytes:
        """A token request with a fresh, strictly increasing millisecond timestamp."""
        self._last_token_ts = max(int(self._clock() * 1000), self._last_token_ts + 1)
        timestamp = str(self._last_token_ts)
        app_key, secret = self._credentials.app_key, self._credentials.app_secret
        body: dict[str, str] = {
            "appKey": app_key,
            "encryption": token_encryption(app_key, timestamp, secret),
            "timestamp": timestamp,
        }
        if previous is not None:
            body["accessToken"] = previous
        return orjson.dumps(body)


# -- interpreting answers (pure) --------------------------------------------------------------


def _query_string(query: Params) -> str:
    """The encoded query of a business call (yarl's with_query costs twice as much): plain ids
    go as they are, anything else is percent-encoded as yarl would, keeping the comma of an
    asset list (the signature covers the decoded values either way)."""
    return "&".join([
        name + "=" + (value if value.isalnum() and value.isascii() else quote(value, safe="?/:@,"))
        for name, value in query
    ])  # fmt: skip


def _interpret(
    status: int, headers: Mapping[str, str], raw: bytes, max_retry_after: float
) -> dict[str, Any]:
    """Map a business answer to its payload, or raise the classified error it stands for."""
    if status != 200:
        _raise_for_http(status, headers, max_retry_after)
    payload = _json_object(raw)
    code = payload.get("code")
    if not isinstance(code, int) or isinstance(code, bool):
        raise _malformed("the answer has no integer 'code'", payload)
    if code == p.CODE_OK:
        return payload
    message, request_id = _text(payload.get("msg")), _request_id(payload)
    if code == p.TOKEN_EXPIRED:
        raise _TokenRejected
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


def _raise_for_http(status: int, headers: Mapping[str, str], max_retry_after: float) -> None:
    if status == 401:
        raise _TokenRejected
    if status == 403:
        raise PermissionDeniedError("the gateway refused access (HTTP 403)", http_status=403)
    if status == 429:
        retry_after = _capped_retry_after(headers.get("Retry-After"), max_retry_after)
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


def _token_reply(
    status: int, headers: Mapping[str, str], raw: bytes, max_retry_after: float
) -> tuple[str, float] | None:
    """The (token, expire) of a token answer; None for a replay (1001); raise otherwise."""
    if status in (401, 403):
        raise AuthError(f"the token service refused the application (HTTP {status})")
    if status != 200:
        _raise_for_http(status, headers, max_retry_after)
    payload = _json_object(raw)
    outcome = payload.get("status")
    data = payload.get("data")
    if outcome == p.TOKEN_OK and isinstance(data, dict):
        token, expire = data.get("accessToken"), data.get("expire")
        if isinstance(token, str) and token and isinstance(expire, int | float) and expire > 0:
            return token, float(expire)
        raise _malformed("the token answer has no accessToken/expire", payload)
    if outcome == p.TOKEN_REPLAYED:
        return None
    if outcome == p.TOKEN_REFRESH_FAILED:
        raise _TokenRejected
    if outcome == p.TOKEN_INTERNAL:
        raise RetryableError("the token service failed (1005)", maybe_applied=False, code=1005)
    raise AuthError(
        f"the token service rejected the application credentials (status {_text(outcome)}: "
        f"{_text(payload.get('msg'))}); check ENOS_APP_KEY and ENOS_APP_SECRET",
        code=outcome if isinstance(outcome, int) else None,
    )


def _capped_retry_after(value: str | None, cap: float) -> float | None:
    """Retry-After, at most `cap` seconds: a gateway must not pause the run for days."""
    wanted = parse_retry_after(value)
    if wanted is not None and wanted > cap:
        log.warning("worker.retry_after_capped", asked_s=_text(value)[:40], used_s=cap)
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


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise RetryableError(
            f"the answer is not JSON ({len(raw)} bytes)", maybe_applied=True, http_status=200
        ) from None
    if not isinstance(payload, dict):
        raise RetryableError("the answer is not a JSON object", maybe_applied=True, http_status=200)
    return payload


def _malformed(what: str, payload: Mapping[str, Any]) -> RetryableError:
    return RetryableError(
        what, maybe_applied=True, http_status=200, request_id=_request_id(payload)
    )


TEXT_CAP = 1000  # characters of gateway text kept in a record


def _text(value: object) -> str:
    """Gateway text for a record: a string, capped, with every registered secret masked (the
    gateway's text is never trusted)."""
    text = value if type(value) is str else "" if value is None else str(value)
    if len(text) > TEXT_CAP:
        text = text[:TEXT_CAP] + "...[cut]"
    return redact.scrub_text(text)


def _request_id(payload: Mapping[str, Any]) -> str | None:
    value = payload.get("requestId")
    return _text(value)[:128] if value is not None else None


def read_commands(
    data: object, read: Callable[[object], Command | str] | None = None
) -> tuple[tuple[Command, ...], int, str | None]:
    """The commands of an answer's `data` (null is an empty list), tolerant of wire variants.

    Returns (readable commands, how many listed commands had no readable id, the first
    problem met). Never raises: a code-0 answer is a fact about the gateway (something was
    cancelled), so what can be read is kept and the rest is said, not thrown away.
    """
    if data is None:
        return (), 0, None
    if not isinstance(data, list):
        return (), 1, f"'data' is a {type(data).__name__}, not a list of commands"
    commands: list[Command] = []
    unreadable, problem = 0, None
    read = read or _command  # _command_id for cancels, _command_full for searches
    for item in data:
        command = read(item)
        if isinstance(command, str):
            unreadable += 1
            problem = problem or command
        else:
            commands.append(command)
    return tuple(commands), unreadable, problem


def _command_id(item: object) -> Command | str:
    """Only the id: all a cancel's result needs (the hot path: three fields less to parse per
    command of every answer). The id rules are those of :func:`_command`."""
    if type(item) is dict:
        command_id = item.get("commandId")
        if type(command_id) is str and 0 < len(command_id) <= ID_CAP:
            return Command(command_id)
    return _command(item)


def _command_of_asset(item: object) -> Command | str:
    """The id and the asset it belongs to (answers to a call for several assets)."""
    command = _command_id(item)
    if isinstance(command, str):
        return command
    asset = item.get("assetId") if type(item) is dict else None
    return command._replace(asset_id=asset if type(asset) is str and asset else None)


def _command(item: object) -> Command | str:
    """One Command struct (createTime as number or string, name as I18n object or text), or
    what makes it unreadable. Only the id is required; any other field may be odd.

    ``type(x) is`` rather than isinstance: it is the hot path, and it also refuses bools."""
    if type(item) is not dict:
        return f"a command is a {type(item).__name__}, not an object"
    command_id = item.get("commandId")
    if type(command_id) is str:
        if not command_id:
            return "a command has no readable commandId"
        if len(command_id) > ID_CAP:
            command_id = command_id[:ID_CAP]
    elif type(command_id) is int:
        command_id = str(command_id)
    else:
        return "a command has no readable commandId"
    name = item.get("commandName")
    if type(name) is dict:
        name = name.get("defaultValue")
    state = item.get("state")
    return Command(
        command_id,
        state if type(state) is int else None,
        _int_or_none(item.get("createTime")),
        name[:NAME_CAP] if type(name) is str else None,
    )


def _command_full(item: object) -> Command | str:
    """A command with every field a match looks at (search answers only)."""
    command = _command(item)
    if isinstance(command, str):
        return command
    assert type(item) is dict
    kind, tsl, name = item.get("commandType"), item.get("tslIdentifier"), item.get("commandName")
    i18n = name.get("i18nValue") if type(name) is dict else None
    names = tuple(
        (str(locale)[:32], text[:NAME_CAP])
        for locale, text in (i18n.items() if type(i18n) is dict else ())
        if type(text) is str
    )[:16]
    return command._replace(
        command_type=kind if type(kind) is int else None,
        tsl_identifier=tsl[:NAME_CAP] if type(tsl) is str else None,
        names=names,
    )


ID_CAP, NAME_CAP, EPOCH_MS_CAP = 128, 256, 10**15


def _int_or_none(value: object) -> int | None:
    """An epoch-ms number from a number or a numeric string; None for anything else (a
    string of 5,000 digits, a superscript two that str.isdigit() accepts but int() refuses)."""
    if type(value) is int:
        return value if -EPOCH_MS_CAP < value < EPOCH_MS_CAP else None
    if type(value) is str and 0 < len(value) <= 15 and value.isascii() and value.isdigit():
        return int(value)
    return None
