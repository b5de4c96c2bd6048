"""The simulated connection service behind the gateway: cancel (one, all, lists), get, search,
command creation, per device of a :class:`~worker.sim.state.DeviceStore` (enos-api.md §7).

It knows nothing of HTTP beyond the method, the decoded query and the body: the gateway part
(:mod:`worker.sim.simulator`) authenticates, injects faults and wraps what this returns in the
answer envelope.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import orjson

from worker.enos import protocol as p
from worker.model import JsonObject
from worker.sim.expression import parse_expression
from worker.sim.faults import Faults
from worker.sim.state import DeviceStore, SimCommand, SimDevice, render_command

Result = tuple[Any, JsonObject]  # the answer's `data`, and extra top-level keys (JSON)


class Refused(Exception):
    """Raised inside a handler to answer at once with an error envelope (or a token status)."""

    def __init__(self, code: int, msg: str) -> None:
        super().__init__(msg)
        self.code = code
        self.msg = msg


class CommandService:
    """The connection service's command API over a device store. `faults` is read at every
    call (the gateway replaces its Faults when they are changed over HTTP)."""

    def __init__(self, store: DeviceStore, faults: Callable[[], Faults]) -> None:
        self.store = store
        self._faults = faults

    @property
    def faults(self) -> Faults:
        """The faults in force now."""
        return self._faults()

    def dispatch(self, method: str, query: Mapping[str, str], body: bytes) -> Result:
        """Carry out one business call; raise Refused for an error answer."""
        action = query.get("action")
        if not action:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument action:action is missing")
        handler = self._ACTIONS.get(action)
        if handler is None:
            raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument action: unknown action {action}")
        expected, operation = handler
        if method != expected:
            raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument: {action} takes {expected}")
        if "," in query.get("assetId", "") and self.faults.multi_asset != "off":
            return self._cancel_list(action, query), {}
        device = self._device(query)
        return operation(self, device, query, body)

    def _org(self, query: Mapping[str, str]) -> str:
        org = query.get("orgId")
        if not org:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument orgId: orgId is missing")
        if org in self.faults.denied_orgs:
            raise Refused(p.CODE_NO_PERMISSION, f"Denied resource:  orgId {org}")
        if org not in self.store.orgs:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument orgId:  orgId does not exist")
        return org

    def _cancel_list(self, action: str, query: Mapping[str, str]) -> list[JsonObject]:
        """Cancel for a comma-separated assetId, as `faults.multi_asset` says lists behave."""
        org = self._org(query)
        if action != p.ACTION_CANCEL or "commandId" in query:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument assetId: one asset id expected")
        if "productKey" in query or "deviceKey" in query:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument: assetId or productKey+deviceKey")
        ids = query["assetId"].split(",")
        if len(ids) > self.faults.max_assets or not all(ids):
            raise Refused(
                p.CODE_INVALID_PARAM,
                f"Invalid Argument assetId: at most {self.faults.max_assets} asset ids",
            )
        devices = [self.store.find(org, asset, None, None) for asset in ids]
        mode = self.faults.multi_asset
        if mode == "strict" and None in devices:
            raise Refused(p.CODE_NOT_FOUND, "The specified device does not exist")
        if mode == "first":
            devices = devices[:1]
        shown: list[JsonObject] = []
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
            raise Refused(
                p.CODE_INVALID_PARAM,
                "Invalid Argument: assetId or productKey and deviceKey are required",
            )
        device = self.store.find(org, asset or None, product, device_key)
        if device is None:
            raise Refused(p.CODE_NOT_FOUND, "The specified device does not exist")
        return device

    def _cancel(self, device: SimDevice, query: Mapping[str, str], _: bytes) -> Result:
        device.cancel_calls += 1
        command_id = query.get("commandId")
        if command_id is None and self.faults.require_command_id:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument commandId: commandId is missing")
        pending = device.pending(self.store.now_ms())
        chosen = [c for c in pending if command_id is None or c.command_id == command_id]
        echo_state = self.faults.cancel_echo_state
        shown = [self._render(device, c, state=echo_state) for c in chosen]
        now_ms = self.store.now_ms()
        for command in chosen:
            command.set_state(p.CommandState.CANCELED, now_ms)
        return shown, {}

    def _get(self, device: SimDevice, query: Mapping[str, str], _: bytes) -> Result:
        command_id = query.get("commandId")
        if not command_id:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument commandId: commandId is missing")
        command = device.commands.get(command_id)
        if command is None:
            raise Refused(p.CODE_NOT_FOUND, "The specified command does not exist")
        command.expire_if_due(self.store.now_ms())
        return self._render(device, command), {}

    def _search(self, device: SimDevice, _: Mapping[str, str], body: bytes) -> Result:
        request = json_body(body)
        pagination = request.get("pagination") or {}
        if not isinstance(pagination, dict) or "sorters" in pagination:
            raise Refused(
                p.CODE_INVALID_PARAM, "Invalid Argument pagination: sorters not supported"
            )
        page_no, page_size = pagination.get("pageNo", 1), pagination.get("pageSize", 100)
        if (
            not isinstance(page_no, int)
            or not isinstance(page_size, int)
            or page_no < 1
            or page_size < 1
        ):
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument pagination")
        commands = list(device.commands.values())
        now_ms = self.store.now_ms()
        for command in commands:
            command.expire_if_due(now_ms)
        lag_ms = int(self.faults.search_lag_s * 1000)
        if lag_ms > 0:  # the search index trails the service (EnOS documents about 2 s)
            seen_ms = now_ms - lag_ms
            commands = [c.as_of(seen_ms) for c in commands if c.create_time_ms <= seen_ms]
        expression = request.get("expression")
        if expression:
            try:
                matches = parse_expression(str(expression))
            except ValueError as exc:
                raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument expression: {exc}") from None
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

    def _create(self, device: SimDevice, query: Mapping[str, str], body: bytes) -> Result:
        ttl, timeout = _int_param(query, "pendingTtl", 0), _int_param(query, "timeout", 30)
        if not 0 <= ttl <= p.MAX_PENDING_TTL_S or not 1 <= timeout <= 60:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument pendingTtl/timeout out of range")
        identifier = query.get("serviceId") or query.get("pointId") or "setMeasurepoint"
        if ttl == 0:
            raise Refused(11900, "device is offline")  # simulated devices are never online
        if len(device.pending(self.store.now_ms())) >= p.MAX_CACHED_COMMANDS:
            raise Refused(p.CODE_CACHE_FULL, "number of cached commands reached the upper limit")
        command = SimCommand(
            command_id=self.store.new_command_id(),
            state=p.CommandState.CREATED,
            create_time_ms=self.store.now_ms(),
            pending_ttl=ttl,
            timeout=timeout,
            command_type=2 if query.get("action") == p.ACTION_INVOKE_SERVICE else 1,
            identifier=identifier,
            input_data=json_body(body).get("inputData", {}) if body else {},
        )
        self.store.create_command(device, command)
        return {"commandId": command.command_id}, {}

    _ACTIONS: ClassVar[dict[str, tuple[str, Callable[..., Result]]]] = {
        p.ACTION_CANCEL: ("POST", _cancel),
        p.ACTION_GET: ("GET", _get),
        p.ACTION_SEARCH: ("POST", _search),
        p.ACTION_INVOKE_SERVICE: ("POST", _create),
        p.ACTION_SET_MEASUREPOINT: ("POST", _create),
    }

    def _render(
        self, device: SimDevice, command: SimCommand, state: int | None = None
    ) -> JsonObject:
        return render_command(device, command, legacy=self.faults.legacy_wire, state=state)


def json_body(body: bytes) -> JsonObject:
    try:
        value = orjson.loads(body) if body else {}
    except orjson.JSONDecodeError:
        raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument: the body is not JSON") from None
    if not isinstance(value, dict):
        raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument: the body is not a JSON object")
    return value


def _int_param(query: Mapping[str, str], name: str, default: int) -> int:
    value = query.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument {name}: not an integer") from None
