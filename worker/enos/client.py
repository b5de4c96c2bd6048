"""An aiohttp client for one EnOS API gateway: token cache and renewal, signing, typed replies.

It reports what happened and never retries on its own (retrying belongs to the engine), with one
exception the protocol demands: a rejected access token is renewed once and the call sent once
more. Every failure becomes one of the classified errors in :mod:`worker.errors`.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import quote

import aiohttp
import orjson
import structlog
from aiohttp import hdrs
from yarl import URL

from worker import redact
from worker.budget import Budget, read_budget
from worker.enos import answers as a
from worker.enos import commands
from worker.enos import protocol as p
from worker.enos.devices import DevicePage, device_page
from worker.enos.signing import request_signature, token_encryption
from worker.errors import (
    AuthError,
    FatalError,
    RateLimitedError,
    RetryableError,
)
from worker.model import CancelReply, Command, Credentials, JsonObject, SearchPage, Target

log = structlog.get_logger("worker.enos")
MAX_BODY = 1 << 20  # bytes of an answer read at the most
MAX_RETRY_AFTER_S = 300.0  # the longest pause a Retry-After may ask for

Params = list[tuple[str, str]]


@dataclass(slots=True)
class _Token:
    value: str
    renew_at: float  # clock time after which the token is renewed before use


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
        self._devices_prefix = str(self._api_url(p.DEVICES_PATH)) + "?"
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
            limit=self._concurrency,
            limit_per_host=self._concurrency,
            ttl_dns_cache=300,
            ssl=context,
        )
        # Answers are decompressed here, not by aiohttp (a.inflate: never past the cap in one
        # step, whatever the aiohttp version), so only what that can decode is asked for.
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=self._timeout),
            auto_decompress=False,
            headers={hdrs.ACCEPT_ENCODING: a.ACCEPTED_ENCODINGS},
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
        return await self._cancel(params, commands.command_id_only)

    async def cancel_assets(self, targets: Sequence[Target]) -> CancelReply:
        """Cancel every cached command of several assets of one org in one call
        (``assetId=a1,a2,...``, signed as the decoded value); each returned command keeps its
        ``assetId``, which attributes it to its target."""
        first = targets[0]
        first.check()
        params = [("orgId", first.org_id), ("assetId", ",".join(t.asset_id or "" for t in targets))]
        return await self._cancel(params, commands.command_of_asset)

    async def _cancel(self, params: Params, read: Callable[[object], Command | str]) -> CancelReply:
        """One cancel call and its code-0 answer, each listed command read by `read`."""
        status, payload, stated = await self._business("POST", p.ACTION_CANCEL, params, b"")
        reply = a.cancel_reply(status, payload, read)
        return reply if stated is None else replace(reply, budget=stated)

    async def get_command(self, target: Target, command_id: str) -> Command:
        """The current state of one command of the target's device."""
        params = [*device_params(target), ("commandId", command_id)]
        _, payload, _ = await self._business("GET", p.ACTION_GET, params, b"")
        return a.got_command(payload)

    async def search_page(
        self,
        target: Target,
        expression: str | None,
        page: int,
        *,
        page_size: int = p.SEARCH_PAGE_SIZE,
    ) -> SearchPage:
        """One page of the device's commands matching `expression` (e.g. ``state = 1``)."""
        query: JsonObject = {"pagination": {"pageNo": page, "pageSize": page_size}}
        if expression is not None:
            query["expression"] = expression
        params = device_params(target)
        body = orjson.dumps(query)
        _, payload, stated = await self._business("POST", p.ACTION_SEARCH, params, body)
        found = a.search_page(payload, page_size, page)
        return found if stated is None else found._replace(budget=stated)

    async def search_commands(
        self, target: Target, expression: str | None = None, *, page_size: int = p.SEARCH_PAGE_SIZE
    ) -> list[Command]:
        """All commands of the device matching `expression`, every page (at most
        :func:`answers.max_search_pages` of them)."""
        found: list[Command] = []
        page = 1
        while True:
            batch = await self.search_page(target, expression, page, page_size=page_size)
            found.extend(batch.commands)
            if not batch.more(page):
                return found
            page += 1

    async def search_devices(
        self, org_id: str, expression: str, page: int, page_size: int
    ) -> DevicePage:
        """One page of Search Device (POST .../devices?action=search&orgId=..., signed like
        every call): the devices matching `expression`, only the fields of
        ``p.DEVICE_PROJECTION`` asked for (never the device secret)."""
        query: JsonObject = {
            "expression": expression,
            "pagination": {"pageNo": page, "pageSize": page_size},
            "projection": list(p.DEVICE_PROJECTION),
        }
        params = [("orgId", org_id)]
        _, payload, stated = await self._business(
            "POST", p.ACTION_SEARCH, params, orjson.dumps(query), prefix=self._devices_prefix
        )
        return device_page(payload, page_size, org_id)._replace(budget=stated)

    # -- signing and sending --------------------------------------------------------------

    async def _business(
        self, method: str, action: str, params: Params, body: bytes, *, prefix: str | None = None
    ) -> tuple[int, JsonObject, Budget | None]:
        """Send one signed business call (to the command API unless `prefix` names another);
        renew a rejected token once and send it again."""
        token = await self._access_token()
        try:
            return await self._send(method, action, params, body, token, prefix=prefix)
        except a.TokenRejected:
            token = await self._renew_rejected(token)
        try:
            return await self._send(method, action, params, body, token, prefix=prefix)
        except a.TokenRejected:
            raise AuthError(
                "the gateway rejected a freshly issued access token; check that the application "
                "(ENOS_APP_KEY) is valid and enabled for this API",
                http_status=401,
            ) from None

    async def _send(
        self,
        method: str,
        action: str,
        params: Params,
        body: bytes,
        token: str,
        *,
        prefix: str | None = None,
    ) -> tuple[int, JsonObject, Budget | None]:
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
        url = URL((prefix or self._commands_prefix) + _query_string(query), encoded=True)
        status, headers_in, raw = await self._exchange(method, url, headers, body)
        # The gateway's budget, as its headers state it (worker.budget bounds every value).
        stated = read_budget(headers_in, sent_at=int(timestamp) / 1000, now=self._clock())
        # The gateway's text is never trusted: what is kept of it is masked once decoded
        # (a.gateway_text, commands.command_id_only), whatever it echoes of this request.
        try:
            return status, a.interpret(status, headers_in, raw, self._max_retry_after), stated
        except RateLimitedError as limited:
            limited.budget = stated
            raise

    async def _exchange(
        self, method: str, url: URL, headers: Mapping[str, str], body: bytes
    ) -> tuple[int, Mapping[str, str], bytes]:
        """One HTTP exchange; transport failures become RetryableError."""
        if self._session is None:
            raise RuntimeError("EnOSClient used outside 'async with'")
        answered = False
        try:
            async with self._session.request(
                method, url, headers=headers, data=body or None, allow_redirects=False
            ) as resp:
                answered = True
                length = resp.content_length
                if length is not None and length <= self._max_body:
                    raw = await resp.read()  # the hot path: one read
                else:
                    raw = await self._read_capped(resp)
                # Only a 200's body is read further (any other status is decided by itself).
                encoding = resp.headers.get(hdrs.CONTENT_ENCODING) if resp.status == 200 else None
                if encoding is not None:
                    raw = self._inflated(resp, raw, encoding)
                return resp.status, resp.headers, raw
        except aiohttp.ClientConnectorCertificateError as exc:
            raise FatalError(
                "the gateway's TLS certificate was not accepted "
                f"({a.gateway_text(exc.certificate_error)}); if it is signed by a private CA, pass "
                "--ca-bundle FILE (or set SSL_CERT_FILE)"
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
        except ValueError as exc:  # before ClientError: aiohttp.InvalidURL is both
            if answered:
                raise
            raise _not_built(exc) from None
        except aiohttp.ClientError as exc:
            raise RetryableError(
                f"connection lost: {type(exc).__name__}", maybe_applied=True
            ) from None

    def _inflated(self, resp: aiohttp.ClientResponse, raw: bytes, encoding: str) -> bytes:
        """The decompressed body, at most the cap; an answer that would inflate past it (or
        cannot be decoded) is refused like any other unreadable answer, and its connection
        dropped: nothing more of it is wanted."""
        try:
            return a.inflate(raw, encoding, self._max_body, resp.status)
        except RetryableError:
            resp.close()
            raise

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        """The body, unless it grows past the cap: then the connection is dropped (a gateway
        that answers without end must not exhaust memory) and the attempt is retried."""
        chunks, size = [], 0
        async for chunk in resp.content.iter_chunked(1 << 16):
            size += len(chunk)
            if size > self._max_body:
                resp.close()
                raise a.oversized(self._max_body, resp.status)
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
            except a.TokenRejected:
                log.info("enos.token_refresh_refused", fallback="get")
        try:
            return await self._token_call(p.TOKEN_GET_PATH, None)
        except a.TokenRejected:
            raise AuthError("the token service refused to issue an access token") from None

    async def _token_call(self, path: str, previous: str | None) -> _Token:
        for _ in range(2):  # a replayed timestamp (1001) is answered once more with a fresh one
            body = self._token_body(previous)
            self.token_requests += 1
            status, headers, raw = await self._exchange(
                "POST", self._api_url(path), {"Content-Type": p.JSON_CONTENT_TYPE}, body
            )
            # What is kept of a token answer goes through a.gateway_text(), which masks.
            reply = a.token_reply(status, headers, raw, self._max_retry_after)
            if reply is not None:
                value, expire = reply
                # from now on masked in every output, also once replaced
                redact.register(value, chosen_by_gateway=True)
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
        encryption = token_encryption(app_key, timestamp, secret)
        redact.register_digest(encryption)  # never kept, even if the token service echoes it
        body: dict[str, str] = {"appKey": app_key, "encryption": encryption, "timestamp": timestamp}
        if previous is not None:
            body["accessToken"] = previous
        return orjson.dumps(body)


def _not_built(exc: ValueError) -> FatalError:
    """A request the HTTP library refused to build (a header value it will not send, a URL it
    cannot form): nothing was sent, so the effect is known, and every call would meet it: the
    run stops. The library's words are masked like the gateway's (they may quote a value)."""
    return FatalError(
        f"a request could not be built ({type(exc).__name__}: {a.gateway_text(exc)[:200]}); "
        "nothing was sent. Check --gateway and the access token the token service issues"
    )


def _query_string(query: Params) -> str:
    """The encoded query of a business call (yarl's with_query costs twice as much): plain ids
    go as they are, anything else is percent-encoded as yarl would, keeping the comma of an
    asset list (the signature covers the decoded values either way)."""
    return "&".join(
        [
            name
            + "="
            + (value if value.isalnum() and value.isascii() else quote(value, safe="?/:@,"))
            for name, value in query
        ]
    )
