"""A faithful local EnOS gateway: APIM tokens, signatures, the command APIs, and injected faults.

It is a real aiohttp.web server, used by `worker simulate`, `worker demo`, the tests and the
benchmarks. It implements enos-api.md §7: token get/refresh with the encryption check and replay
rejection; a signature check on every business call; cancel (one/all), get, search; command
creation (invokeService / setMeasurepoint, at most 50 cached per device). Faults are switched on
through :class:`Faults`, in process or over ``POST /_sim/faults``, and drawn from a seeded RNG.

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
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson
from aiohttp import web

from worker.enos import protocol as p
from worker.enos.signing import request_signature, token_encryption
from worker.sim.state import (
    DeviceStore,
    SimCommand,
    SimDevice,
    parse_expression,
    render_command,
)


@dataclass
class Faults:
    """What goes wrong, and how often. All off by default."""

    latency_ms: float = 0.0  # added to every business call
    error_rate: float = 0.0  # HTTP 500/502/503 before the call is handled
    rate_cap: float | None = None  # business calls per second (1-s window); above: 429
    retry_after_s: int = 1  # the Retry-After sent with a 429
    throttle_next: int = 0  # answer this many next business calls with 429, whatever the rate
    slow_rate: float = 0.0  # answers held back `slow_ms` after the call took effect
    slow_ms: float = 0.0
    drop_before_rate: float = 0.0  # connection closed before the call is handled (no effect)
    oversize_rate: float = 0.0  # a 2 MiB answer after the call took effect
    redirect_rate: float = 0.0  # HTTP 307 to another host, before the call is handled
    down_until: float = 0.0  # CLOCK_MONOTONIC: until then every connection is closed unanswered
    burst_from: int = 0  # business calls burst_from .. burst_from + burst_calls - 1 get a 503
    burst_calls: int = 0
    drop_rate: float = 0.0  # connection closed without an answer, after the call took effect
    malformed_rate: float = 0.0  # answer garbled or cut short, after the call took effect
    token_ttl_s: int = p.TOKEN_LIFETIME_S
    denied_orgs: frozenset[str] = frozenset()  # answered with 99403
    expired_token_answer: str = "401"  # "401" or "1203": how an expired token is refused
    require_command_id: bool = False  # mimic the 2.3.0+ docs that call commandId mandatory
    cancel_echo_state: int = 1  # the state shown in a cancel answer (samples show 1)
    legacy_wire: bool = False  # createTime as number and createLocalTime (2019 samples)
    max_skew_s: float | None = None  # reject apim-timestamp further than this from now
    # assetId=a1,a2,... on cancel (the docs' uncertain claim): "off" looks the whole text up as
    # one id (a gateway without lists: 99404); "strict": an unknown id fails the whole call
    # with 99404 and no effect; "lenient": unknown ids are ignored; "first": only the first
    # id is acted on, code 0 (a gateway that drops the rest silently: what the worker's
    # self-verification must catch).
    multi_asset: str = "off"
    max_assets: int = 100  # a longer list is refused with 99400


@dataclass
class SimStats:
    """What the simulator saw; tests and benchmarks read it."""

    by_action: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    token_requests: int = 0
    rejected_auth: int = 0
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=2_000_000))

    @property
    def business_calls(self) -> int:
        """Every call to the command API, whatever its answer."""
        return sum(self.by_action.values())


@dataclass(slots=True)
class _Issued:
    app_key: str
    expires_at: float


class _Reply(Exception):
    """Raised inside a handler to answer at once with an error envelope."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


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
    ) -> None:
        self.apps = dict(apps)
        self.store = DeviceStore(
            devices=devices, commands_per_device=commands, seed=seed, clock=clock
        )
        self.faults = faults or Faults()
        self.stats = SimStats()
        self._rng = random.Random(seed)
        self._clock = clock
        self._tokens: dict[str, _Issued] = {}
        self._current: dict[str, str] = {}
        self._seen_encryptions: set[str] = set()
        self._window = (0, 0)

    def app(self) -> web.Application:
        """The aiohttp application serving this simulator."""
        application = web.Application(client_max_size=1024**2)
        application.router.add_post(p.TOKEN_GET_PATH, self._token_get)
        application.router.add_post(p.TOKEN_REFRESH_PATH, self._token_refresh)
        application.router.add_route("*", p.COMMANDS_PATH, self._commands)
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
        except _Reply as reply:
            return self._token_answer(reply.code, reply.msg, None)
        return self._token_answer(p.TOKEN_OK, "SUCCESS", self._token_for(app_key, fresh=refresh))

    def _check_token_request(self, raw: bytes, *, refresh: bool) -> str:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise _Reply(p.TOKEN_INVALID_PARAM, "invalid parameter") from None
        if not isinstance(body, dict):
            raise _Reply(p.TOKEN_INVALID_PARAM, "invalid parameter")
        required = ["appKey", "encryption", "timestamp"] + (["accessToken"] if refresh else [])
        if any(body.get(name) in (None, "") for name in required):
            raise _Reply(p.TOKEN_EMPTY_PARAM, "parameter is empty")
        app_key, timestamp = str(body["appKey"]), str(body["timestamp"])
        secret = self.apps.get(app_key)
        if secret is None:
            raise _Reply(p.TOKEN_UNKNOWN_APP, "appKey does not exist")
        encryption = str(body["encryption"])
        if encryption != token_encryption(app_key, timestamp, secret):
            raise _Reply(p.TOKEN_BAD_ENCRYPTION, "encryption is not valid")
        if encryption in self._seen_encryptions:
            raise _Reply(p.TOKEN_REPLAYED, "repeated request")
        self._seen_encryptions.add(encryption)
        if refresh:
            issued = self._tokens.get(str(body["accessToken"]))
            if issued is None or issued.app_key != app_key:
                raise _Reply(p.TOKEN_REFRESH_FAILED, "failed to refresh access token")
        return app_key

    def _token_for(self, app_key: str, *, fresh: bool) -> tuple[str, int]:
        """The app's current token and its remaining seconds; a new one if asked or expired."""
        now = self._clock()
        current = self._current.get(app_key)
        issued = self._tokens.get(current) if current else None
        if fresh or issued is None or issued.expires_at <= now:
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
        self.stats.by_action[request.query.get("action", "")] += 1
        unhandled = self._before_handling(request)
        if unhandled is not None:
            return unhandled
        denied = self._authenticate(request, body)
        if denied is not None:
            self.stats.rejected_auth += 1
            return denied
        if self._over_rate_cap() or self._throttle_next():
            return _gateway_error(429, {"Retry-After": str(self.faults.retry_after_s)})
        if self.faults.error_rate and self._rng.random() < self.faults.error_rate:
            return _gateway_error(self._rng.choice((500, 502, 503)))
        burst = self.faults.burst_from
        if burst and burst <= self.stats.business_calls < burst + self.faults.burst_calls:
            return _gateway_error(503)
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        try:
            data, extra = self._dispatch(request, body)
            payload = {
                "code": p.CODE_OK,
                "msg": "OK",
                "requestId": self._request_id(),
                "data": data,
            }
            payload.update(extra)
        except _Reply as reply:
            payload = {
                "code": reply.code,
                "msg": reply.msg,
                "requestId": self._request_id(),
                "data": None,
            }
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

    async def _deliver(self, request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
        """Send the answer, or lose it on the way as configured (after the effect took place)."""
        raw = orjson.dumps(payload)
        faults = self.faults
        if faults.slow_rate and self._rng.random() < faults.slow_rate:
            await asyncio.sleep(faults.slow_ms / 1000)
        if faults.oversize_rate and self._rng.random() < faults.oversize_rate:
            return web.Response(body=raw[:-1] + b',"pad":"' + b"x" * (2 << 20) + b'"}',
                                content_type="application/json")  # fmt: skip
        if faults.drop_rate and self._rng.random() < faults.drop_rate:
            if request.transport is not None:
                request.transport.close()
            return web.Response(body=raw, content_type="application/json")
        if faults.malformed_rate and self._rng.random() < faults.malformed_rate:
            if self._rng.random() < 0.5:
                return web.Response(body=raw[: len(raw) // 2], content_type="application/json")
            return await _cut_off(request, raw, sent=len(raw) // 2)
        return web.Response(body=raw, content_type="application/json")

    # -- the connection service -----------------------------------------------------------

    def _dispatch(self, request: web.Request, body: bytes) -> tuple[Any, dict[str, Any]]:
        query = request.query
        action = query.get("action")
        if not action:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument action:action is missing")
        handler = self._ACTIONS.get(action)
        if handler is None:
            raise _Reply(p.CODE_INVALID_PARAM, f"Invalid Argument action: unknown action {action}")
        method, operation = handler
        if request.method != method:
            raise _Reply(p.CODE_INVALID_PARAM, f"Invalid Argument: {action} takes {method}")
        if "," in query.get("assetId", "") and self.faults.multi_asset != "off":
            return self._cancel_list(action, query), {}
        device = self._device(query)
        return operation(self, device, query, body)

    def _org(self, query: Mapping[str, str]) -> str:
        org = query.get("orgId")
        if not org:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument orgId: orgId is missing")
        if org in self.faults.denied_orgs:
            raise _Reply(p.CODE_NO_PERMISSION, f"Denied resource:  orgId {org}")
        if org not in self.store.orgs:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument orgId:  orgId does not exist")
        return org

    def _cancel_list(self, action: str, query: Mapping[str, str]) -> list[dict[str, Any]]:
        """Cancel for a comma-separated assetId, as `faults.multi_asset` says lists behave."""
        org = self._org(query)
        if action != p.ACTION_CANCEL or "commandId" in query:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument assetId: one asset id expected")
        if "productKey" in query or "deviceKey" in query:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument: assetId or productKey+deviceKey")
        ids = query["assetId"].split(",")
        if len(ids) > self.faults.max_assets or not all(ids):
            raise _Reply(
                p.CODE_INVALID_PARAM,
                f"Invalid Argument assetId: at most {self.faults.max_assets} asset ids",
            )
        devices = [self.store.find(org, asset, None, None) for asset in ids]
        mode = self.faults.multi_asset
        if mode == "strict" and None in devices:
            raise _Reply(p.CODE_NOT_FOUND, "The specified device does not exist")
        if mode == "first":
            devices = devices[:1]
        shown: list[dict[str, Any]] = []
        for device in devices:
            if device is not None:
                shown += self._cancel(device, query, b"")[0]
        return shown

    def _device(self, query: Mapping[str, str]) -> SimDevice:
        org = self._org(query)
        asset, product, device_key = (
            query.get("assetId"),
            query.get("productKey"),
            query.get("deviceKey"),
        )
        if not asset and not (product and device_key):
            raise _Reply(
                p.CODE_INVALID_PARAM,
                "Invalid Argument: assetId or productKey and deviceKey are required",
            )
        device = self.store.find(org, asset or None, product, device_key)
        if device is None:
            raise _Reply(p.CODE_NOT_FOUND, "The specified device does not exist")
        return device

    def _cancel(
        self, device: SimDevice, query: Mapping[str, str], _: bytes
    ) -> tuple[Any, dict[str, Any]]:
        device.cancel_calls += 1
        command_id = query.get("commandId")
        if command_id is None and self.faults.require_command_id:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument commandId: commandId is missing")
        pending = device.pending(self.store.now_ms())
        chosen = [c for c in pending if command_id is None or c.command_id == command_id]
        echo_state = self.faults.cancel_echo_state
        shown = [self._render(device, c, state=echo_state) for c in chosen]
        for command in chosen:
            command.state = p.CommandState.CANCELED
        return shown, {}

    def _get(
        self, device: SimDevice, query: Mapping[str, str], _: bytes
    ) -> tuple[Any, dict[str, Any]]:
        command_id = query.get("commandId")
        if not command_id:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument commandId: commandId is missing")
        command = device.commands.get(command_id)
        if command is None:
            raise _Reply(p.CODE_NOT_FOUND, "The specified command does not exist")
        command.expire_if_due(self.store.now_ms())
        return self._render(device, command), {}

    def _search(
        self, device: SimDevice, _: Mapping[str, str], body: bytes
    ) -> tuple[Any, dict[str, Any]]:
        request = _json_body(body)
        pagination = request.get("pagination") or {}
        if not isinstance(pagination, dict) or "sorters" in pagination:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument pagination: sorters not supported")
        page_no, page_size = pagination.get("pageNo", 1), pagination.get("pageSize", 100)
        if (
            not isinstance(page_no, int)
            or not isinstance(page_size, int)
            or page_no < 1
            or page_size < 1
        ):
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument pagination")
        commands = list(device.commands.values())
        for command in commands:
            command.expire_if_due(self.store.now_ms())
        expression = request.get("expression")
        if expression:
            try:
                matches = parse_expression(str(expression))
            except ValueError as exc:
                raise _Reply(p.CODE_INVALID_PARAM, f"Invalid Argument expression: {exc}") from None
            commands = [c for c in commands if matches(c)]
        commands.sort(key=lambda c: c.create_time_ms, reverse=True)
        page = commands[(page_no - 1) * page_size : page_no * page_size]
        rendered = [self._render(device, c) for c in page]
        projection = request.get("projection")
        if isinstance(projection, list) and projection:
            rendered = [{k: v for k, v in item.items() if k in projection} for item in rendered]
        sorted_by = [{"field": "createDate", "order": "DESC"}]
        return rendered, {
            "pagination": {
                "sortedBy": sorted_by,
                "pageNo": page_no,
                "pageSize": page_size,
                "totalSize": len(commands),
            }
        }

    def _create(
        self, device: SimDevice, query: Mapping[str, str], body: bytes
    ) -> tuple[Any, dict[str, Any]]:
        ttl, timeout = _int_param(query, "pendingTtl", 0), _int_param(query, "timeout", 30)
        if not 0 <= ttl <= p.MAX_PENDING_TTL_S or not 1 <= timeout <= 60:
            raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument pendingTtl/timeout out of range")
        identifier = query.get("serviceId") or query.get("pointId") or "setMeasurepoint"
        if ttl == 0:
            raise _Reply(11900, "device is offline")  # simulated devices are never online
        if len(device.pending(self.store.now_ms())) >= p.MAX_CACHED_COMMANDS:
            raise _Reply(p.CODE_CACHE_FULL, "number of cached commands reached the upper limit")
        command = SimCommand(
            command_id=self.store.new_command_id(),
            state=p.CommandState.CREATED,
            create_time_ms=self.store.now_ms(),
            pending_ttl=ttl,
            timeout=timeout,
            command_type=2 if query.get("action") == p.ACTION_INVOKE_SERVICE else 1,
            identifier=identifier,
            input_data=_json_body(body).get("inputData", {}) if body else {},
        )
        self.store.create_command(device, command)
        return {"commandId": command.command_id}, {}

    _ACTIONS: ClassVar[dict[str, tuple[str, Callable[..., tuple[Any, dict[str, Any]]]]]] = {
        p.ACTION_CANCEL: ("POST", _cancel),
        p.ACTION_GET: ("GET", _get),
        p.ACTION_SEARCH: ("POST", _search),
        p.ACTION_INVOKE_SERVICE: ("POST", _create),
        p.ACTION_SET_MEASUREPOINT: ("POST", _create),
    }

    def _render(
        self, device: SimDevice, command: SimCommand, state: int | None = None
    ) -> dict[str, Any]:
        return render_command(device, command, legacy=self.faults.legacy_wire, state=state)

    # -- inspection -----------------------------------------------------------------------

    async def _inspect_stats(self, _: web.Request) -> web.Response:
        return _json(self.stats_snapshot())

    def stats_snapshot(self) -> dict[str, Any]:
        """Counts of calls by action and answers by status, token requests, auth rejections."""
        return {
            "business_calls": self.stats.business_calls,
            "by_action": dict(self.stats.by_action),
            "by_status": {str(k): v for k, v in self.stats.by_status.items()},
            "token_requests": self.stats.token_requests,
            "rejected_auth": self.stats.rejected_auth,
        }

    async def _inspect_arrivals(self, _: web.Request) -> web.Response:
        """Arrival times (CLOCK_MONOTONIC seconds, comparable across processes on one machine)
        of every business call, for measuring a client's rate from the server's side."""
        return _json(list(self.stats.arrivals))

    async def _inspect_devices(self, _: web.Request) -> web.Response:
        return _json([_device_view(d) for d in self.store.devices()])

    async def _set_faults(self, request: web.Request) -> web.Response:
        changes = _json_body(await request.read())
        if "down_for_s" in changes:  # a convenience: down from now on, for that long
            changes["down_until"] = time.monotonic() + float(changes.pop("down_for_s"))
        known = {f.name for f in dataclasses.fields(Faults)}
        unknown = sorted(set(changes) - known)
        if unknown:
            return _json({"error": f"unknown fault settings: {unknown}"}, 400)
        if "denied_orgs" in changes:
            changes["denied_orgs"] = frozenset(changes["denied_orgs"])
        self.faults = dataclasses.replace(self.faults, **changes)
        return _json(dataclasses.asdict(self.faults), 200)


def _device_view(device: SimDevice) -> dict[str, Any]:
    return {
        "org_id": device.org_id,
        "asset_id": device.asset_id,
        "product_key": device.product_key,
        "device_key": device.device_key,
        "cancel_calls": device.cancel_calls,
        "commands": {c.command_id: c.state for c in device.commands.values()},
    }


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument: the body is not JSON") from None
    if not isinstance(value, dict):
        raise _Reply(p.CODE_INVALID_PARAM, "Invalid Argument: the body is not a JSON object")
    return value


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise _Reply(p.CODE_INVALID_PARAM, f"Invalid Argument {name}: not an integer") from None


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
