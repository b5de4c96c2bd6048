"""A faithful local EnOS gateway: APIM tokens, signatures, the command APIs, and injected faults.

It is a real aiohttp.web server, used by `worker simulate`, `worker demo`, the tests and the
benchmarks. It implements enos-api.md §7: token get/refresh with the encryption check and replay
rejection; a signature check on every business call; cancel (one/all), get, search; command
creation (invokeService / setMeasurepoint, at most 50 cached per device). Faults are switched on
through :class:`Faults`, in process or over ``POST /_sim/faults``, and drawn from a seeded RNG;
among them the gateway's budget: quota windows with their headers (:mod:`worker.sim.quota`), a
504 after the effect, a search that lags state changes, a refresh that revokes earlier tokens.

Inspection (no auth; the simulator binds loopback by default): ``GET /_sim/stats``,
``GET /_sim/devices`` (touched devices, their command states and cancel calls),
``GET /_sim/arrivals`` (monotonic arrival time of every business call).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import ssl
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass

import orjson
from aiohttp import web

from worker.enos import protocol as p
from worker.enos.signing import request_signature, token_encryption
from worker.model import JsonObject
from worker.sim.devices import DeviceService
from worker.sim.faults import Faults, SimStats
from worker.sim.quota import Quota, quota_for
from worker.sim.service import CommandService, Refused, json_body
from worker.sim.state import DeviceStore, SimDevice


@dataclass(slots=True)
class _Issued:
    app_key: str
    expires_at: float


def _json(
    payload: object, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(payload, default=sorted),  # sets (denied_orgs) as sorted lists
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _gateway_error(status: int, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"message": p.GATEWAY_MESSAGES.get(status, "error")}, status, headers)


class Simulator:
    """The gateway's state and request handlers."""

    def __init__(
        self,
        *,
        apps: Mapping[str, str],
        devices: int = 1000,
        commands: int = 3,
        seed: int = 7,
        faults: Faults | None = None,
        clock: Callable[[], float] = time.time,
        products: int = 4,
    ) -> None:
        self.apps = dict(apps)
        self.store = DeviceStore(
            devices=devices, commands_per_device=commands, seed=seed, clock=clock, products=products
        )
        self.faults = faults or Faults()
        self.service = CommandService(self.store, lambda: self.faults)
        self.devices = DeviceService(self.store, lambda: self.faults, seed)
        self.stats = SimStats()
        self._rng = random.Random(seed)
        self._clock = clock
        self._tokens: dict[str, _Issued] = {}
        self._current: dict[str, str] = {}
        self._seen_encryptions: set[str] = set()
        self._window = (0, 0)
        self._quota: tuple[tuple[object, ...], Quota | None] = ((), None)  # (settings, quota)
        self._quota_now()  # a bad quota setting fails here, not at the first call

    def app(self) -> web.Application:
        """The aiohttp application serving this simulator."""
        application = web.Application(client_max_size=1024**2)
        application.router.add_post(p.TOKEN_GET_PATH, self._token_get)
        application.router.add_post(p.TOKEN_REFRESH_PATH, self._token_refresh)
        application.router.add_route("*", p.COMMANDS_PATH, self._commands)
        application.router.add_route("*", p.DEVICES_PATH, self._commands)
        application.router.add_get("/_sim/stats", self._inspect_stats)
        application.router.add_get("/_sim/devices", self._inspect_devices)
        application.router.add_get("/_sim/arrivals", self._inspect_arrivals)
        application.router.add_post("/_sim/faults", self._set_faults)
        return application

    # -- tokens ---------------------------------------------------------------------------

    async def _token_get(self, request: web.Request) -> web.Response:
        return await self._token_endpoint(request, refresh=False)

    async def _token_refresh(self, request: web.Request) -> web.Response:
        return await self._token_endpoint(request, refresh=True)

    async def _token_endpoint(self, request: web.Request, *, refresh: bool) -> web.Response:
        self.stats.token_requests += 1
        try:
            app_key = self._check_token_request(await request.read(), refresh=refresh)
        except Refused as reply:
            return self._token_answer(reply.code, reply.msg, None)
        return self._token_answer(p.TOKEN_OK, "SUCCESS", self._token_for(app_key, fresh=refresh))

    def _check_token_request(self, raw: bytes, *, refresh: bool) -> str:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Refused(p.TOKEN_INVALID_PARAM, "invalid parameter") from None
        if not isinstance(body, dict):
            raise Refused(p.TOKEN_INVALID_PARAM, "invalid parameter")
        required = ["appKey", "encryption", "timestamp"] + (["accessToken"] if refresh else [])
        if any(body.get(name) in (None, "") for name in required):
            raise Refused(p.TOKEN_EMPTY_PARAM, "parameter is empty")
        app_key, timestamp = str(body["appKey"]), str(body["timestamp"])
        secret = self.apps.get(app_key)
        if secret is None:
            raise Refused(p.TOKEN_UNKNOWN_APP, "appKey does not exist")
        encryption = str(body["encryption"])
        if encryption != token_encryption(app_key, timestamp, secret):
            raise Refused(p.TOKEN_BAD_ENCRYPTION, "encryption is not valid")
        if encryption in self._seen_encryptions:
            raise Refused(p.TOKEN_REPLAYED, "repeated request")
        self._seen_encryptions.add(encryption)
        if refresh:
            issued = self._tokens.get(str(body["accessToken"]))
            if issued is None or issued.app_key != app_key:
                raise Refused(p.TOKEN_REFRESH_FAILED, "failed to refresh access token")
        return app_key

    def _token_for(self, app_key: str, *, fresh: bool) -> tuple[str, int]:
        """The app's current token and its remaining seconds; a new one if asked or expired."""
        now = self._clock()
        current = self._current.get(app_key)
        issued = self._tokens.get(current) if current else None
        if fresh or issued is None or issued.expires_at <= now:
            if self.faults.refresh_revokes:  # one valid token per application
                for value in [v for v, i in self._tokens.items() if i.app_key == app_key]:
                    del self._tokens[value]
            current = f"{self._rng.getrandbits(128):032x}"
            issued = _Issued(app_key, now + self.faults.token_ttl_s)
            self._tokens[current] = issued
            self._current[app_key] = current
        assert current is not None
        return current, max(1, int(issued.expires_at - now))

    @staticmethod
    def _token_answer(status: int, msg: str, token: tuple[str, int] | None) -> web.Response:
        data = {"accessToken": token[0], "expire": token[1]} if token else None
        return _json({"status": status, "msg": msg, "business": "apim-token-service", "data": data})

    # -- business calls -------------------------------------------------------------------

    async def _commands(self, request: web.Request) -> web.StreamResponse:
        response = await self._command_call(request)
        self.stats.by_status[response.status] += 1
        return response

    async def _command_call(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.stats.arrivals.append(time.monotonic())
        devices = request.path == p.DEVICES_PATH  # Search Device, counted as search_devices
        self.stats.by_action[request.query.get("action", "") + ("_devices" if devices else "")] += 1
        unhandled = self._before_handling(request)
        if unhandled is not None:
            return unhandled
        denied = self._authenticate(request, body)
        if denied is not None:
            self.stats.rejected_auth += 1
            return denied
        if self._over_rate_cap() or self._throttle_next():
            return _gateway_error(429, {"Retry-After": str(self.faults.retry_after_s)})
        admitted, stated = self._admit()
        if not admitted:
            return _gateway_error(429, stated)
        response = await self._handle(request, body, devices=devices)
        if stated and not response.prepared:  # a body cut short went out before this
            response.headers.update(stated)
        return response

    async def _handle(
        self, request: web.Request, body: bytes, *, devices: bool
    ) -> web.StreamResponse:
        """A call the gateway let through (`devices`: Search Device): upstream faults, the
        service, the delivery."""
        if self.faults.error_rate and self._rng.random() < self.faults.error_rate:
            return _gateway_error(self._rng.choice((500, 502, 503)))
        burst = self.faults.burst_from
        if burst and burst <= self.stats.business_calls < burst + self.faults.burst_calls:
            return _gateway_error(503)
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        try:
            service = self.devices if devices else self.service
            data, extra = service.dispatch(request.method, request.query, body)
            payload = {
                "code": p.CODE_OK,
                "msg": "OK",
                "requestId": self._request_id(),
                "data": data,
            }
            payload.update(extra)
        except Refused as reply:
            payload = {
                "code": reply.code,
                "msg": reply.msg,
                "requestId": self._request_id(),
                "data": None,
            }
        if self.faults.late_504_rate and self._rng.random() < self.faults.late_504_rate:
            return _gateway_error(504)  # the call took effect; its answer is lost
        return await self._deliver(request, payload)

    def _authenticate(self, request: web.Request, body: bytes) -> web.Response | None:
        headers = request.headers
        token, signature = headers.get(p.HEADER_TOKEN), headers.get(p.HEADER_SIGNATURE)
        timestamp = headers.get(p.HEADER_TIMESTAMP)
        if not token or not signature or not timestamp:
            return _gateway_error(401)
        issued = self._tokens.get(token)
        if issued is None:
            return _gateway_error(401)
        if issued.expires_at <= self._clock():
            if self.faults.expired_token_answer == "1203":
                return _json(
                    {
                        "code": p.TOKEN_EXPIRED,
                        "msg": "access token has expired",
                        "requestId": self._request_id(),
                        "data": None,
                    }
                )
            return _gateway_error(401)
        if self.faults.max_skew_s is not None and not self._fresh(timestamp):
            return _gateway_error(401)
        secret = self.apps[issued.app_key]
        expected = request_signature(token, request.query.items(), body, timestamp, secret)
        return None if expected == signature else _gateway_error(401)

    def _fresh(self, timestamp: str) -> bool:
        skew = self.faults.max_skew_s or 0.0
        return timestamp.isdigit() and abs(int(timestamp) / 1000 - self._clock()) <= skew

    def _admit(self) -> tuple[bool, dict[str, str]]:
        """The quota's verdict on one more call, and the headers stating it."""
        quota = self._quota_now()
        return (True, {}) if quota is None else quota.admit(self._clock())

    def _quota_now(self) -> Quota | None:
        """The quota the faults set; its counts restart when its settings change."""
        faults = self.faults
        key = (faults.quota, faults.quota_headers, faults.quota_retry_after, faults.retry_after_s)
        if self._quota[0] != key:
            self._quota = (key, quota_for(faults))
        return self._quota[1]

    def _over_rate_cap(self) -> bool:
        cap = self.faults.rate_cap
        if cap is None:
            return False
        second = int(time.monotonic())
        window, count = self._window
        count = count + 1 if window == second else 1
        self._window = (second, count)
        return count > cap

    def _before_handling(self, request: web.Request) -> web.Response | None:
        """Faults that strike before the call is handled: it has no effect."""
        faults, rng = self.faults, self._rng
        down = faults.down_until > time.monotonic()
        if down or (faults.drop_before_rate and rng.random() < faults.drop_before_rate):
            if request.transport is not None:
                request.transport.close()
            return web.Response(status=503)  # never delivered: the connection is gone
        if faults.redirect_rate and rng.random() < faults.redirect_rate:
            location = "http://127.0.0.1:9/connect-service/v2.1/commands?" + request.query_string
            return web.Response(status=307, headers={"Location": location})
        return None

    async def up_again(self) -> None:
        """Return once a `down_until` outage is over (for tests that wait out an outage)."""
        await asyncio.sleep(max(0.0, self.faults.down_until - time.monotonic()))

    def _throttle_next(self) -> bool:
        if self.faults.throttle_next <= 0:
            return False
        self.faults.throttle_next -= 1
        return True

    def _request_id(self) -> str:
        return f"{self._rng.getrandbits(128):032x}"

    async def _deliver(self, request: web.Request, payload: JsonObject) -> web.StreamResponse:
        """Send the answer, or lose it on the way as configured (after the effect took place)."""
        raw = orjson.dumps(payload)
        faults = self.faults
        if faults.slow_rate and self._rng.random() < faults.slow_rate:
            await asyncio.sleep(faults.slow_ms / 1000)
        if faults.oversize_rate and self._rng.random() < faults.oversize_rate:
            return web.Response(
                body=raw[:-1] + b',"pad":"' + b"x" * (2 << 20) + b'"}',
                content_type="application/json",
            )
        if faults.drop_rate and self._rng.random() < faults.drop_rate:
            if request.transport is not None:
                request.transport.close()
            return web.Response(body=raw, content_type="application/json")
        if faults.malformed_rate and self._rng.random() < faults.malformed_rate:
            if self._rng.random() < 0.5:
                return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
            return await _cut_off(request, raw, sent=len(raw) // 2)
        return web.Response(body=raw, content_type="application/json")

    # -- inspection -----------------------------------------------------------------------

    async def _inspect_stats(self, _: web.Request) -> web.Response:
        return _json(self.stats_snapshot())

    def stats_snapshot(self) -> JsonObject:
        """Counts of calls by action and answers by status, token requests, auth rejections."""
        return {
            "business_calls": self.stats.business_calls,
            "by_action": dict(self.stats.by_action),
            "by_status": {str(k): v for k, v in self.stats.by_status.items()},
            "token_requests": self.stats.token_requests,
            "rejected_auth": self.stats.rejected_auth,
            "quota_refused": self._quota[1].refused if self._quota[1] is not None else 0,
        }

    async def _inspect_arrivals(self, _: web.Request) -> web.Response:
        """Arrival times (CLOCK_MONOTONIC seconds, comparable across processes on one machine)
        of every business call, for measuring a client's rate from the server's side."""
        return _json(list(self.stats.arrivals))

    async def _inspect_devices(self, _: web.Request) -> web.Response:
        return _json([_device_view(d) for d in self.store.devices()])

    async def _set_faults(self, request: web.Request) -> web.Response:
        changes = json_body(await request.read())
        if "down_for_s" in changes:  # a convenience: down from now on, for that long
            changes["down_until"] = time.monotonic() + float(changes.pop("down_for_s"))
        known = {f.name for f in dataclasses.fields(Faults)}
        unknown = sorted(set(changes) - known)
        if unknown:
            return _json({"error": f"unknown fault settings: {unknown}"}, 400)
        if "denied_orgs" in changes:
            changes["denied_orgs"] = frozenset(changes["denied_orgs"])
        faults = dataclasses.replace(self.faults, **changes)
        try:
            quota_for(faults)
        except (TypeError, ValueError) as exc:
            return _json({"error": str(exc)}, 400)
        self.faults = faults
        return _json(dataclasses.asdict(self.faults), 200)


def _device_view(device: SimDevice) -> JsonObject:
    return {
        "org_id": device.org_id,
        "asset_id": device.asset_id,
        "product_key": device.product_key,
        "device_key": device.device_key,
        "cancel_calls": device.cancel_calls,
        "commands": {c.command_id: c.state for c in device.commands.values()},
    }


async def _cut_off(request: web.Request, raw: bytes, *, sent: int) -> web.StreamResponse:
    """Announce the whole body, send `sent` bytes of it, then close the connection."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.content_length = len(raw)
    await response.prepare(request)
    if sent:
        await response.write(raw[:sent])
    if request.transport is not None:
        request.transport.close()
    return response


@asynccontextmanager
async def serve(
    simulator: Simulator,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[str]:
    """Run the simulator on host:port (0 = any free port), over TLS when given a server
    context, and yield its base URL."""
    runner = web.AppRunner(simulator.app(), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=tls)
    await site.start()
    try:
        bound = runner.addresses[0][1]
        yield f"{'https' if tls else 'http'}://{host}:{bound}"
    finally:
        await runner.cleanup()
