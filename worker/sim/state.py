"""The simulated connection service's data: devices, their cached commands, seeding, search.

Generated devices are derived from their index (no random state), so a fleet of a million costs
nothing until a device is first touched, and a job file can name them (jobs/example.yaml does).
Device i of org ``DEFAULT_ORG`` has asset id ``as{i:06d}``, product key ``PRODUCT_KEYS[i % 4]``
(with another number of `products` P: ``simP{i % P:04d}``) and device key ``dev_{i:06d}``; it
has `commands_per_device` cached (state 1) commands, except one device in eight (chosen by the
seed) that has none, and one finished (state 5) command.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from worker.enos.protocol import MAX_PENDING_TTL_S, CommandState
from worker.model import JsonObject, Target

DEFAULT_ORG = "o15541858646501"
# What a generated device holds, in order (name, commandType): the k-th cached command has the
# k-th name (modulo), so a selective job can match one of them and keep the others.
SEEDED_COMMANDS = (("setPoint42", 1), ("restart", 2), ("firmwareCheck", 2), ("setPoint7", 1))
SEEDED_SPACING_MS = 600_000
PRODUCT_KEYS = ("bXuuAiku", "pQ7sLk2d", "Zt9wN4ha", "mK3vR8ce")
_GENERATED_ID_BASE = 2_278_935_391_225_600_000
_EXPLICIT_ID_BASE = 3_278_935_391_225_600_000
_ASSET_RE = re.compile(r"as(\d{6,})")
_DEVICE_RE = re.compile(r"dev_(\d{6,})")


@dataclass(slots=True)
class SimCommand:
    """One command as the service stores it."""

    command_id: str
    state: int
    create_time_ms: int
    pending_ttl: int = MAX_PENDING_TTL_S
    timeout: int = 30
    command_type: int = 2
    identifier: str = "restart"
    input_data: Any = field(default_factory=dict)
    # The last change of state: when (epoch ms) and from what; what a lagging search shows.
    changed_ms: int = 0
    before: int = 0

    def expire_if_due(self, now_ms: int) -> None:
        """A cached command whose pendingTtl has passed becomes Expired (3)."""
        due = self.create_time_ms + self.pending_ttl * 1000
        if self.state == CommandState.CREATED and now_ms > due:
            self.set_state(CommandState.EXPIRED, due)

    def set_state(self, state: int, at_ms: int) -> None:
        """Change the state at `at_ms`, remembering the one before (two ints, not a history:
        a cached command changes state once, and a search lags by seconds)."""
        self.changed_ms, self.before, self.state = at_ms, self.state, state

    def as_of(self, at_ms: int) -> SimCommand:
        """The command as it was at `at_ms` (itself when nothing changed since)."""
        if at_ms >= self.changed_ms or self.changed_ms == 0:
            return self
        return dataclasses.replace(self, state=self.before, changed_ms=0)


@dataclass(slots=True)
class SimDevice:
    """A device and its command history; `cancel_calls` counts cancel requests that reached it."""

    org_id: str
    asset_id: str
    product_key: str
    device_key: str
    commands: dict[str, SimCommand] = field(default_factory=dict)
    cancel_calls: int = 0

    def pending(self, now_ms: int) -> list[SimCommand]:
        """Commands still cached (state 1), after expiring the overdue ones."""
        for command in self.commands.values():
            command.expire_if_due(now_ms)
        return [c for c in self.commands.values() if c.state == CommandState.CREATED]


def _mix(seed: int, index: int) -> int:
    """A stable 64-bit hash of (seed, index): seeding must not depend on Python's `random`."""
    return int.from_bytes(
        hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest(), "big"
    )


def product_keys_for(products: int) -> tuple[str, ...]:
    """The product keys of a generated fleet of `products` products (the four classic ones
    when it has four, the default)."""
    if products == len(PRODUCT_KEYS):
        return PRODUCT_KEYS
    return tuple(f"simP{k:04d}" for k in range(products))


def generated_command_id(index: int, k: int) -> str:
    """The id of the k-th command of generated device `index` (19 digits)."""
    return str(_GENERATED_ID_BASE + index * 64 + k)


class DeviceStore:
    """Devices by asset id and by product/device key, per org; generated ones made on first use."""

    def __init__(
        self,
        *,
        devices: int,
        commands_per_device: int,
        seed: int,
        clock: Callable[[], float] = time.time,
        products: int = len(PRODUCT_KEYS),
    ) -> None:
        self.generated = devices
        self.product_keys = product_keys_for(products)
        self.deleted: set[int] = set()  # generated devices removed since (Search Device drift)
        self.commands_per_device = commands_per_device
        self.seed = seed
        self._clock = clock
        self._by_asset: dict[tuple[str, str], SimDevice] = {}
        self._by_keys: dict[tuple[str, str, str], SimDevice] = {}
        self._explicit = 0
        self.orgs: set[str] = {DEFAULT_ORG}

    def now_ms(self) -> int:
        """The store's clock in epoch milliseconds."""
        return int(self._clock() * 1000)

    def find(
        self, org_id: str, asset_id: str | None, product_key: str | None, device_key: str | None
    ) -> SimDevice | None:
        """The device a request names; asset id wins when both selectors are given."""
        if asset_id is not None:
            found = self._by_asset.get((org_id, asset_id))
            index = _generated_index(_ASSET_RE, asset_id)
        else:
            found = self._by_keys.get((org_id, product_key or "", device_key or ""))
            index = _generated_index(_DEVICE_RE, device_key or "")
            if index is not None and self.product_of(index) != product_key:
                index = None
        if found is not None or org_id != DEFAULT_ORG or index is None or index >= self.generated:
            return found
        if index in self.deleted:
            return None
        return self._materialize(index)

    def product_of(self, index: int) -> str:
        """The product key of generated device `index`."""
        return self.product_keys[index % len(self.product_keys)]

    def add_generated(self) -> int:
        """One more generated device (a device that appears in the fleet); its index."""
        self.generated += 1
        return self.generated - 1

    def remove(self, index: int) -> None:
        """Generated device `index` disappears from the fleet (a cancel then finds nothing)."""
        self.deleted.add(index)
        device = self._by_asset.pop((DEFAULT_ORG, f"as{index:06d}"), None)
        if device is not None:
            self._by_keys.pop((DEFAULT_ORG, device.product_key, device.device_key), None)

    def devices(self) -> Iterator[SimDevice]:
        """Every device touched or created so far (untouched generated ones are not listed)."""
        return iter(self._by_asset.values())

    def is_pending_free(self, index: int) -> bool:
        """Whether generated device `index` was seeded without cached commands."""
        return _mix(self.seed, index) % 8 == 0

    def _materialize(self, index: int) -> SimDevice:
        device = SimDevice(
            org_id=DEFAULT_ORG,
            asset_id=f"as{index:06d}",
            product_key=self.product_of(index),
            device_key=f"dev_{index:06d}",
        )
        pending = 0 if self.is_pending_free(index) else self.commands_per_device
        first = self.now_ms() - (pending + 1) * SEEDED_SPACING_MS
        for k in range(pending + 1):
            state = CommandState.CREATED if k < pending else CommandState.SUCCEEDED
            cid = generated_command_id(index, k)
            name, kind = SEEDED_COMMANDS[k % len(SEEDED_COMMANDS)]
            moment = first + k * SEEDED_SPACING_MS  # the k-th, k x 10 minutes after the first
            device.commands[cid] = SimCommand(
                cid, state, moment, command_type=kind, identifier=name
            )
        self._add(device)
        return device

    def _add(self, device: SimDevice) -> None:
        self.orgs.add(device.org_id)
        self._by_asset[(device.org_id, device.asset_id)] = device
        self._by_keys[(device.org_id, device.product_key, device.device_key)] = device

    def seed_targets(self, targets: Iterable[Target]) -> int:
        """Make every target's device exist with cached commands, and its command id cached."""
        count = 0
        for target in targets:
            device = self.find(
                target.org_id, target.asset_id, target.product_key, target.device_key
            )
            if device is None:
                device = self._new_explicit(target)
            if target.command_id is not None and target.command_id not in device.commands:
                device.commands[target.command_id] = SimCommand(
                    target.command_id, CommandState.CREATED, self.now_ms() - 60_000
                )
            count += 1
        return count

    def _new_explicit(self, target: Target) -> SimDevice:
        self._explicit += 1
        n = self._explicit
        device = SimDevice(
            org_id=target.org_id,
            asset_id=target.asset_id or f"sa{n:06d}",
            product_key=target.product_key or "simProd1",
            device_key=target.device_key or f"sim_{n:06d}",
        )
        created = self.now_ms() - 3_600_000
        for k in range(self.commands_per_device):
            cid = str(_EXPLICIT_ID_BASE + n * 64 + k)
            device.commands[cid] = SimCommand(cid, CommandState.CREATED, created + k * 1000)
        self._add(device)
        return device

    def create_command(self, device: SimDevice, command: SimCommand) -> None:
        """Store a new command (the caller has checked the cache limit)."""
        device.commands[command.command_id] = command

    def new_command_id(self) -> str:
        """A fresh 19-digit id for a command created through the API."""
        self._explicit += 1
        return str(_EXPLICIT_ID_BASE + 9 * 10**16 + self._explicit)


def _generated_index(pattern: re.Pattern[str], text: str) -> int | None:
    match = pattern.fullmatch(text)
    return int(match.group(1)) if match else None


@functools.lru_cache(maxsize=4096)
def _local_time(second: int) -> str:
    """`createLocaltime` text (the simulated assets live in UTC); cached, as commands share it."""
    return datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")


def render_command(
    device: SimDevice, command: SimCommand, *, legacy: bool, state: int | None = None
) -> JsonObject:
    """The wire form of a command. `legacy` uses the 2019 variants (numbers, createLocalTime)."""
    local = _local_time(command.create_time_ms // 1000)
    return {
        "commandId": command.command_id,
        "orgId": device.org_id,
        "productKey": device.product_key,
        "deviceKey": device.device_key,
        "assetId": device.asset_id,
        "createTime": command.create_time_ms if legacy else str(command.create_time_ms),
        ("createLocalTime" if legacy else "createLocaltime"): (
            command.create_time_ms if legacy else local
        ),
        "commandType": command.command_type,
        "commandName": {
            "defaultValue": command.identifier,
            "i18nValue": {"en_US": command.identifier, "zh_CN": localized(command.identifier)},
        },
        "timeout": command.timeout,
        "pendingTtl": command.pending_ttl,
        "state": command.state if state is None else state,
        "tslIdentifier": command.identifier,
        "inputData": command.input_data,
        "outputData": None,
    }


def localized(name: str) -> str:
    """The simulated zh_CN name of a command (en_US and the default are the name itself)."""
    return f"中文-{name}"
