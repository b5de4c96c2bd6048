"""The simulated Search Device (POST /connect-service/v2.1/devices?action=search, enos-api.md
§2.3a) over the store's generated devices.

A device's search attributes are derived from its index and the seed, like the rest of it:
a name (``Turbine``/``Inverter``/``Meter`` and its number, in en_US and zh_CN too), a status
(inactive, online, offline, disable), a product type (one in fifty a Gateway) and a device
secret, which every answer carries unless a projection leaves it out (``leak_secrets`` sends it
whatever the projection). Nothing per device is stored: a million devices cost nothing until
they are searched, and a search's matches are cached per expression and fleet version.

The order is the index order, stable between calls, unless ``device_reshuffle_every`` K: then
every K calls reshuffle it (seeded), as the docs' "random pagination" allows. With
``device_drift_every`` K, every K calls one matching device disappears and a new one appears
(the fleet changing while it is paged). A page larger than ``device_page_max`` is refused with
99400.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from worker.enos import protocol as p
from worker.model import JsonObject
from worker.sim.device_expression import DeviceQuery, parse_device_expression
from worker.sim.faults import Faults
from worker.sim.service import Refused, Result, json_body
from worker.sim.state import DEFAULT_ORG, DeviceStore

# One in ten inactive, six online, two offline, one disabled.
STATUSES = ("inactive", *["online"] * 6, "offline", "offline", "disable")
KINDS = (("Turbine", "风机"), ("Inverter", "逆变器"), ("Meter", "电表"))
DEFAULT_PAGE_SIZE = 10  # the documented default
_CACHED = 8  # expressions whose matches are kept


def _mix(seed: int, index: int, salt: str) -> bytes:
    return hashlib.blake2b(f"{salt}:{seed}:{index}".encode(), digest_size=10).digest()


def device_secret(seed: int, index: int) -> str:
    """The connection key of generated device `index`: what no output may ever hold."""
    return "DS" + _mix(seed, index, "secret").hex()


def device_status(seed: int, index: int) -> str:
    """The status of generated device `index`."""
    return STATUSES[_mix(seed, index, "status")[0] % len(STATUSES)]


def device_names(index: int) -> dict[str | None, str]:
    """The device's names: the default (key None), en_US and zh_CN."""
    english, chinese = KINDS[index % len(KINDS)]
    number = f"{index:06d}"
    return {None: f"{english} {number}", "en_US": f"{english} {number}", "zh_CN": chinese + number}


def product_type(index: int) -> str:
    """One device in fifty is a gateway."""
    return "Gateway" if index % 50 == 0 else "Device"


class DeviceService:
    """Search Device over a store; `faults` is read at every call."""

    def __init__(self, store: DeviceStore, faults: Callable[[], Faults], seed: int) -> None:
        self.store = store
        self._faults = faults
        self.seed = seed
        self.calls = 0
        self._version = 0  # moves when the fleet changes (drift)
        self._epoch = 0  # moves when the order is reshuffled
        self._matches: dict[tuple[str, int, int], list[int]] = {}

    def dispatch(self, method: str, query: Mapping[str, str], body: bytes) -> Result:
        """One call to the devices API; Refused for an error answer."""
        if query.get("action") != p.ACTION_SEARCH:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument action: unknown action")
        if method != "POST":
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument: search takes POST")
        org = query.get("orgId")
        if not org:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument orgId: orgId is missing")
        faults = self._faults()
        if org in faults.denied_orgs:
            raise Refused(p.CODE_NO_PERMISSION, f"Denied resource:  orgId {org}")
        if org not in self.store.orgs:
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument orgId:  orgId does not exist")
        return self._search(org, json_body(body), faults)

    def _search(self, org: str, request: JsonObject, faults: Faults) -> Result:
        page_no, page_size = _pagination(request.get("pagination"), faults.device_page_max)
        expression = request.get("expression")
        if expression is not None and not isinstance(expression, str):
            raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument expression")
        self.calls += 1
        self._fault_tick(faults, expression or "")
        order = self._ordered(org, expression or "")
        chosen = order[(page_no - 1) * page_size : page_no * page_size]
        projection = request.get("projection")
        fields = set(projection) if isinstance(projection, list) and projection else None
        if fields is not None and faults.leak_secrets:
            fields.add("deviceSecret")
        data = [self._render(index, fields) for index in chosen]
        pagination = {"sortedBy": None, "pageNo": page_no, "pageSize": page_size}
        pagination["totalSize"] = len(order)
        return data, {"pagination": pagination}

    def _fault_tick(self, faults: Faults, expression: str) -> None:
        """The faults that move with the calls: a reshuffle, a drift."""
        reshuffle, drift = faults.device_reshuffle_every, faults.device_drift_every
        if reshuffle and self.calls % reshuffle == 0:
            self._epoch += 1
        if drift and self.calls % drift == 0:
            matching = self._matching(DEFAULT_ORG, expression)
            rng = random.Random(self.seed * 7919 + self.calls)
            if matching:
                self.store.remove(rng.choice(matching))
            self.store.add_generated()
            self._version += 1
            self._matches.clear()

    def _ordered(self, org: str, expression: str) -> list[int]:
        """The matching devices in the order of this call (stable, or this epoch's shuffle)."""
        key = (expression, self._version, self._epoch)
        order = self._matches.get(key)
        if order is None:
            order = list(self._matching(org, expression))
            if self._epoch:
                random.Random(self.seed * 1_000_003 + self._epoch).shuffle(order)
            if len(self._matches) >= _CACHED:
                self._matches.clear()
            self._matches[key] = order
        return order

    def _matching(self, org: str, expression: str) -> list[int]:
        """Every generated device of `org` the expression selects, by index."""
        if org != DEFAULT_ORG:
            return []
        try:
            query = parse_device_expression(expression) if expression.strip() else DeviceQuery()
        except ValueError as exc:
            raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument expression: {exc}") from None
        deleted = self.store.deleted
        return [i for i in self._candidates(query) if i not in deleted and self._selects(query, i)]

    def _candidates(self, query: DeviceQuery) -> Iterable[int]:
        """The indices worth checking: from the asset ids, device keys or product keys asked
        for, else the whole fleet."""
        count, listed = self.store.generated, query.listed
        if "assetId" in listed:
            return sorted(_indices(listed["assetId"], "as", count))
        if "deviceKey" in listed:
            return sorted(_indices(listed["deviceKey"], "dev_", count))
        if "productKey" in listed:
            keys, step = self.store.product_keys, len(self.store.product_keys)
            starts = [k for k, key in enumerate(keys) if key in listed["productKey"]]
            return sorted(i for k in starts for i in range(k, count, step))
        return range(count)

    def _selects(self, query: DeviceQuery, index: int) -> bool:
        listed = query.listed
        if "productKey" in listed and self.store.product_of(index) not in listed["productKey"]:
            return False
        if "deviceKey" in listed and f"dev_{index:06d}" not in listed["deviceKey"]:
            return False
        if "assetId" in listed and f"as{index:06d}" not in listed["assetId"]:
            return False
        equal = query.equal
        if "status" in equal and device_status(self.seed, index) != equal["status"]:
            return False
        if "productType" in equal and product_type(index) != equal["productType"]:
            return False
        return all(_like(index, locale, text) for locale, text in query.names)

    def _render(self, index: int, fields: set[str] | None) -> JsonObject:
        """A Device struct (only `fields`, when a projection names them)."""
        wanted = _ORDER if fields is None else [name for name in _ORDER if name in fields]
        return {name: _FIELDS[name](self, index) for name in wanted}

    def product_of(self, index: int) -> str:
        """The product key of device `index`."""
        return self.store.product_of(index)


def _names_struct(index: int) -> JsonObject:
    names = device_names(index)
    i18n = {"en_US": names["en_US"], "zh_CN": names["zh_CN"]}
    return {"defaultValue": names[None], "i18nValue": i18n}


# The Device struct's fields (enos-api.md §2.3a), each from (service, index), in the docs' order.
_FIELDS: dict[str, Callable[[DeviceService, int], Any]] = {
    "orgId": lambda _, i: DEFAULT_ORG,
    "assetId": lambda _, i: f"as{i:06d}",
    "modelId": lambda s, i: f"model_{s.product_of(i)}",
    "modelIdPath": lambda s, i: f"/model_{s.product_of(i)}",
    "productKey": lambda s, i: s.product_of(i),
    "productName": lambda s, i: {"defaultValue": f"product {s.product_of(i)}", "i18nValue": {}},
    "productType": lambda _, i: product_type(i),
    "dataFormat": lambda _, i: "Json",
    "deviceKey": lambda _, i: f"dev_{i:06d}",
    "deviceName": lambda _, i: _names_struct(i),
    "deviceSecret": lambda s, i: device_secret(s.seed, i),
    "deviceDesc": lambda _, i: None,
    "timezone": lambda _, i: "+08:00",
    "deviceAttributes": lambda _, i: {},
    "deviceTags": lambda _, i: {},
    "createTime": lambda _, i: 1_558_421_750_575 + i,
    "status": lambda s, i: device_status(s.seed, i),
    "activeTime": lambda _, i: 1_558_482_329_972 + i,
    "lastOnlineTime": lambda _, i: 1_560_743_915_454 + i,
    "lastOfflineTime": lambda _, i: 1_560_744_095_454 + i,
}
_ORDER = list(_FIELDS)


def _pagination(value: object, most: int) -> tuple[int, int]:
    """(pageNo, pageSize), checked; a page above `most` is refused (99400)."""
    if value is None:
        return 1, DEFAULT_PAGE_SIZE
    if not isinstance(value, dict) or "sorters" in value:
        raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument pagination")
    page_no, size = value.get("pageNo", 1), value.get("pageSize", DEFAULT_PAGE_SIZE)
    if type(page_no) is not int or type(size) is not int or page_no < 1 or size < 1:
        raise Refused(p.CODE_INVALID_PARAM, "Invalid Argument pagination")
    if size > most:
        raise Refused(p.CODE_INVALID_PARAM, f"Invalid Argument pageSize: at most {most}")
    return page_no, size


def _indices(values: set[str], prefix: str, count: int) -> set[int]:
    """Generated device indices named by `values` (as000012, dev_000012)."""
    found = set()
    for value in values:
        digits = value.removeprefix(prefix)
        if value.startswith(prefix) and digits.isdigit() and len(digits) >= 6:
            index = int(digits)
            if index < count:
                found.add(index)
    return found


def _like(index: int, locale: str | None, text: str) -> bool:
    """The service's fuzzy match: `text` in the name (any case); a locale without a name
    falls back to the default one; no locale: any of the names."""
    names = device_names(index)
    wanted = text.lower()
    if locale is None:
        return any(wanted in name.lower() for name in names.values())
    name = names.get(None if locale == "default" else locale, names[None])
    return wanted in name.lower()
