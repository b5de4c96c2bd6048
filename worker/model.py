"""Frozen values shared by every layer: targets, replies, limits, jobs, results, attempts.

Nothing here does I/O; the engine, the client, the journal and the CLI all speak these types.
"""

from __future__ import annotations

import gc
import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple, TypedDict

from worker.budget import Budget
from worker.errors import InvalidTargetError
from worker.jobparts import Stage, TargetsQuery, Window

JsonObject = dict[str, Any]  # JSON where it crosses a boundary (a file, the wire), checked there


@contextmanager
def gc_paused() -> Iterator[None]:
    """Building many small objects runs the cyclic GC over and over; it finds nothing here."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@dataclass(frozen=True, slots=True)
class Credentials:
    """An application's access key and secret key. The secret never appears in a repr."""

    app_key: str
    app_secret: str = field(repr=False)


def identity_key(
    org_id: str,
    asset_id: str | None,
    product_key: str | None,
    device_key: str | None,
    command_id: str | None,
) -> str:
    """The canonical text of a target's identity; "" stands for an absent field."""
    return "\x1f".join(
        (org_id, asset_id or "", product_key or "", device_key or "", command_id or "")
    )


def key_digest(key: str) -> int:
    """A 128-bit digest of an identity key: 32 bytes a target in a done-set of millions."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=16).digest(), "big")


@dataclass(frozen=True, slots=True)
class Shard:
    """Part `index` of `count` (from 0, as Kubernetes' JOB_COMPLETION_INDEX): the targets whose
    identity digest modulo `count` is `index`. Stable across machines and input order, so N
    processes cover every target exactly once."""

    index: int
    count: int

    def holds(self, digest: int) -> bool:
        """Whether the target with this identity digest (key_digest) belongs to this shard."""
        return digest % self.count == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def selector_problem(asset: str, product: str, device: str, org: str) -> str | None:
    """What is wrong with a target's device selector and org ("problem; fix"), or None.

    The one rule shared by job files (every row) and the client (every request): an asset id,
    or a product key and device key, never both; and an org.
    """
    if asset and (product or device):
        return "gives both asset_id and product_key/device_key; keep one selector"
    if not asset and not product and not device:
        return "has no device selector; give asset_id, or product_key and device_key"
    if not asset and not (product and device):
        return f"has half a device pair; add {'device_key' if product else 'product_key'}"
    if not org:
        return "has no org_id; set org_id for the job or for this target"
    if "," in asset:
        return (
            "has a comma in its asset_id; the gateway may read a comma as a list of assets "
            "(limits.assets_per_call); write one target per asset"
        )
    return None


class Selector(TypedDict, total=False):
    """A target's device: ``{"asset_id"}`` or ``{"product_key", "device_key"}``."""

    asset_id: str
    product_key: str
    device_key: str


@dataclass(frozen=True, slots=True)
class Target:
    """One cancel call: a device (assetId, or productKey+deviceKey) in an org, one or all commands.

    `source` says where the target was written ("jobs/a.yaml:12", "devices.csv row 5"); it is
    not part of the target's identity.
    """

    org_id: str
    asset_id: str | None = None
    product_key: str | None = None
    device_key: str | None = None
    command_id: str | None = None
    source: str = field(default="", compare=False)
    match: Match | None = field(default=None, compare=False)  # selective: cancel what matches

    def check(self) -> None:
        """Refuse a target that cannot become a request, before anything is sent."""
        problem = selector_problem(
            self.asset_id or "", self.product_key or "", self.device_key or "", self.org_id
        )
        if problem is not None:
            where = f" ({self.source})" if self.source else ""
            raise InvalidTargetError(f"target{where} {problem}")

    def selector(self) -> Selector:
        """The device selector as written to results: {asset_id} or {product_key, device_key}."""
        if self.asset_id is not None:
            return {"asset_id": self.asset_id}
        return {"product_key": self.product_key or "", "device_key": self.device_key or ""}

    def key(self) -> str:
        """A canonical text of the identity (org, device, command), used for digests and hashes."""
        return identity_key(
            self.org_id, self.asset_id, self.product_key, self.device_key, self.command_id
        )

    def digest(self) -> int:
        """A 128-bit digest of `key()`: a fixed-size entry for done-sets and duplicate checks."""
        return key_digest(self.key())

    def describe(self) -> str:
        """A short human text of the target for logs and errors."""
        device = (
            f"asset {self.asset_id}"
            if self.asset_id is not None
            else f"device {self.product_key}/{self.device_key}"
        )
        if self.match is not None:
            command = "matching commands"
        else:
            command = f"command {self.command_id}" if self.command_id else "all cached commands"
        return f"{device} in {self.org_id}, {command}"


class Command(NamedTuple):
    """An EnOS command as the API describes it, reduced to what the worker uses.

    The values made once per request (Command, TargetResult, Attempt) are NamedTuples: as
    immutable as a frozen dataclass, and about four times cheaper to build.
    """

    command_id: str
    state: int | None = None
    create_time_ms: int | None = None
    name: str | None = None  # commandName.defaultValue
    command_type: int | None = None  # 1 = measurement-point setting, 2 = service invocation
    tsl_identifier: str | None = None
    names: tuple[tuple[str, str], ...] = ()  # commandName.i18nValue: (locale, name) pairs
    asset_id: str | None = None  # the device it belongs to (read from lists' cancel answers)

    def name_in(self, locale: str | None) -> str | None:
        """The command's name in `locale` (None or "default": the default value)."""
        if locale is None or locale == "default":
            return self.name
        return next((name for key, name in self.names if key == locale), None)


class SearchPage(NamedTuple):
    """One page of a Search Command answer."""

    commands: tuple[Command, ...]
    total: int | None  # totalSize: every command matching the expression, all pages
    unreadable: int  # listed commands without a readable id (cannot be matched: kept)
    page_size: int
    request_id: str | None = None  # the answer's requestId
    budget: Budget | None = None  # what the answer's headers stated of the gateway's budget

    def more(self, page: int) -> bool:
        """Whether a page after `page` holds more (the answer says so, and this one was full)."""
        if not self.commands and not self.unreadable:
            return False
        return self.total is not None and page * self.page_size < self.total


@dataclass(frozen=True, slots=True)
class Match:
    """Which cached commands a selective target cancels: every given criterion must hold.

    Matching is done here, exactly, on the fields Search Command returns (the server's `like`
    is fuzzy, and the zone of `createTime` in expressions is undocumented). The window is
    half-open: created_after <= createTime < created_before (epoch ms). A command whose field
    cannot be read does not match the criterion on it: it is kept, never cancelled by guess.
    """

    command_name: str | None = None  # contained in the name (case-sensitive)
    command_name_locale: str | None = None  # the name in this locale; None: the default name
    tsl_identifier: str | None = None  # exact
    command_type: int | None = None  # 1 or 2
    created_after_ms: int | None = None
    created_before_ms: int | None = None

    def matches(self, command: Command) -> bool:
        """Whether `command` is one to cancel."""
        if self.command_name is not None:
            name = command.name_in(self.command_name_locale)
            if name is None or self.command_name not in name:
                return False
        if self.tsl_identifier is not None and command.tsl_identifier != self.tsl_identifier:
            return False
        if self.command_type is not None and command.command_type != self.command_type:
            return False
        created = command.create_time_ms
        if self.created_after_ms is not None and (
            created is None or created < self.created_after_ms
        ):
            return False
        return self.created_before_ms is None or (
            created is not None and created < self.created_before_ms
        )

    def describe(self) -> str:
        """The rule in words, for validate, the dry run and logs."""
        parts = []
        if self.command_name is not None:
            where = f" ({self.command_name_locale})" if self.command_name_locale else ""
            parts.append(f"name contains {self.command_name!r}{where}")
        if self.tsl_identifier is not None:
            parts.append(f"tslIdentifier = {self.tsl_identifier!r}")
        if self.command_type is not None:
            parts.append(f"commandType = {self.command_type}")
        if self.created_after_ms is not None:
            parts.append(f"created at or after {_utc(self.created_after_ms)}")
        if self.created_before_ms is not None:
            parts.append(f"created before {_utc(self.created_before_ms)}")
        return " and ".join(parts)


def _utc(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class CancelReply:
    """A successful (`code 0`) answer to a cancel: the commands the service says it cancelled.

    `unreadable` counts listed commands whose id could not be read (a command was cancelled,
    but which one is unknown); `problem` says what in the answer could not be parsed.
    """

    http_status: int
    code: int
    msg: str
    request_id: str | None
    commands: tuple[Command, ...]
    unreadable: int = 0
    problem: str | None = None
    budget: Budget | None = None  # what the answer's headers stated of the gateway's budget


DEFAULT_RATE = 10.0  # requests per second: conservative, for a gateway we know nothing of


@dataclass(frozen=True, slots=True)
class Limits:
    """How hard a run may push: requests/s (None = unlimited), in flight, attempts, timeouts.

    With `adaptive` (``rate: auto``) the rate starts at `rate_floor` and finds the gateway's
    limit by itself, never above `rate_max` (None: no upper bound).
    """

    rate: float | None = DEFAULT_RATE
    concurrency: int = 16
    attempts: int = 5
    timeout: float = 10.0
    deadline: float | None = None
    max_throttles: int = 20
    adaptive: bool = False
    rate_floor: float = 10.0
    rate_max: float | None = None
    max_retry_after: float = 300.0  # seconds: a longer Retry-After is capped (and logged)
    assets_per_call: int = 1  # > 1: targets by asset id grouped as assetId=a1,a2,... (opt-in)


@dataclass(frozen=True, slots=True)
class AbortRule:
    """Stop the run when the share of failed targets passes `failure_ratio` (after min_finished)."""

    failure_ratio: float | None = None
    min_finished: int = 50


@dataclass(frozen=True, slots=True)
class TargetsFile:
    """A CSV (header row) or JSONL list of targets, streamed rather than loaded."""

    path: Path
    fmt: str  # "csv" | "jsonl"


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job file. Targets are not held here: they are streamed by `worker.jobs.plan`."""

    path: Path
    name: str
    sha256: str
    gateway: str | None
    org_id: str | None
    command_id: str | None
    limits: Limits
    abort: AbortRule
    inline_targets: tuple[Target, ...]
    targets_file: TargetsFile | None
    match: Match | None = None  # selective: the job's rule for every target without its own
    query: TargetsQuery | None = None  # targets from Search Device, resolved at the run's start
    window: Window | None = None  # when it may send (None: any time)
    stages: tuple[Stage, ...] = ()  # a staged rollout behind verify gates (): all at once


class Outcome(StrEnum):
    """The final outcome of one target."""

    CANCELLED = "cancelled"
    NOTHING_TO_CANCEL = "nothing_to_cancel"
    FAILED = "failed"


class TargetResult(NamedTuple):
    """The final line for one target in results.jsonl."""

    target: Target
    outcome: Outcome
    cancelled_command_ids: tuple[str, ...]
    attempts: int
    http_status: int | None
    code: int | None
    msg: str | None
    request_id: str | None
    error: str | None
    started_at: float
    finished_at: float
    latency_ms: float | None
    effect_unknown: bool = False
    get_state: int | None = None  # what Get Command showed after a lost answer: evidence only
    found_command_ids: tuple[str, ...] = ()  # what a search found (dry run), never a claim
    matched_command_ids: tuple[str, ...] = ()  # selective: cached commands the match selected
    missed_command_ids: tuple[str, ...] = ()  # selective: matched, but gone when cancelled
    kept_command_ids: tuple[str, ...] = ()  # selective: cached commands that did not match
    batch_size: int = 1  # assets in the call whose answer gave this result (assets_per_call)


class Decided(StrEnum):
    """What followed one HTTP attempt, as the audit log words it."""

    DONE = "done"  # answered; the target (or the call) went on or finished
    RETRY = "retry"  # failed; tried again after a backoff
    THROTTLED = "throttled"  # HTTP 429; tried again after the shared pause
    FAILED = "failed"  # failed for good: the target's result is failed
    FATAL = "fatal"  # the run stops
    LEFT = "left"  # the run stopped before the retry: the target stays resumable
    UNVERIFIED = "unverified"  # a Get asked for evidence got no answer
    ABANDONED = "abandoned"  # cut off in flight by a second stop signal
    SPLIT = "split"  # a list refused as a whole: its halves are called next


class Attempt(NamedTuple):
    """One HTTP attempt, for the audit log: what was asked, what came back, what happens next.

    `subject` is what a selective target's call was about: the command id a cancel named, or
    the search page ("page 2").
    """

    target: Target
    number: int
    at: float
    latency_ms: float | None
    http_status: int | None
    code: int | None
    request_id: str | None
    decision: Decided
    wait_s: float | None = None
    error: str | None = None
    subject: str | None = None
    batch: tuple[Target, ...] = ()  # every target of a call for several assets (assetId=a,b)
