"""Search Device answers (enos-api.md §2.3a), read as pure functions: a page of the devices a
``targets_query:`` selects, reduced to what a run uses.

Only the fields asked for are read (protocol.DEVICE_PROJECTION); ``deviceSecret``, the device's
connection key, is never read, whatever the gateway sends, so it cannot reach a record, a log
or a file. Everything kept is bounded and masked like all gateway text; an answer of another
shape is unreadable (a device that cannot be named cannot be a target, and a page that hides
one would make the count a lie), never a shorter list.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from worker import redact
from worker.budget import Budget
from worker.enos.answers import gateway_text, request_id_of
from worker.errors import TargetError

ASSET_ID_CAP = 128  # characters; EnOS asset ids are eight
MAX_QUERY_DEVICES = 10_000_000  # a totalSize above this is not paged through: not a fleet
_LABEL_CAP = 64  # a product key or a status, kept for counting only
_NOT_IN_ID = frozenset(" ,'\"\\")


class FoundDevice(NamedTuple):
    """A device as Search Device listed it: what a target needs, and what it is counted by."""

    asset_id: str
    product_key: str  # "" when the answer did not say
    status: str  # "" when the answer did not say


class DevicePage(NamedTuple):
    """One page of a Search Device answer."""

    devices: tuple[FoundDevice, ...]
    total: int  # totalSize: every device matching the expression, all pages
    page_size: int
    request_id: str | None
    budget: Budget | None = None  # what the answer's headers state of the gateway's budget


def device_page(payload: Mapping[str, Any], page_size: int, org_id: str) -> DevicePage:
    """A code-0 Search Device answer: `data` a list of at most `page_size` device objects,
    each with a usable assetId in `org_id`, and `pagination.totalSize` a non-negative integer.
    Anything else raises an unreadable answer (TargetError: the same answer would come again)."""
    data = payload.get("data")
    if type(data) is not list:
        raise unreadable_devices("'data' is not a list of devices", payload)
    if len(data) > page_size:
        raise unreadable_devices(f"it lists {len(data)} devices on a page of {page_size}", payload)
    devices = []
    for item in data:
        device = _device(item, org_id)
        if isinstance(device, str):
            raise unreadable_devices(device, payload)
        devices.append(device)
    pagination = payload.get("pagination")
    total = pagination.get("totalSize") if type(pagination) is dict else None
    if type(total) is not int or not 0 <= total <= MAX_QUERY_DEVICES:
        raise unreadable_devices(
            f"'pagination.totalSize' is not an integer from 0 to {MAX_QUERY_DEVICES:,}", payload
        )
    return DevicePage(tuple(devices), total, page_size, request_id_of(payload))


def _device(item: object, org_id: str) -> FoundDevice | str:
    """One device, or what makes it unusable as a target. Three fields are read, by name."""
    if type(item) is not dict:
        return f"a device is a {type(item).__name__}, not an object"
    asset = item.get("assetId")
    if type(asset) is not str or not _usable_id(asset):
        return "a device has no assetId that can name a target"
    org = item.get("orgId")
    if org is not None and org != org_id:
        return "a device of another org is listed"
    return FoundDevice(asset, _label(item.get("productKey")), _label(item.get("status")))


def _usable_id(text: str) -> bool:
    """An asset id a target can carry and a record can keep: short printable ASCII, no space,
    comma, quote or backslash, no secret of this run (it would be masked: a changed id)."""
    return (
        0 < len(text) <= ASSET_ID_CAP
        and text.isascii()
        and text.isprintable()
        and not _NOT_IN_ID.intersection(text)
        and not redact.carries_secret(text)
    )


def _label(value: object) -> str:
    """A product key or status for counting: text, bounded and masked; "" for anything else."""
    return gateway_text(value)[:_LABEL_CAP] if type(value) is str else ""


def unreadable_devices(what: str, payload: Mapping[str, Any]) -> TargetError:
    """A Search Device answer of a shape the docs do not give."""
    return TargetError(
        f"the Search Device answer is not of the documented shape ({what}); the devices the "
        "query selects are not known",
        http_status=200,
        request_id=request_id_of(payload),
    )
