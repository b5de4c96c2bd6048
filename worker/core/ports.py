"""The engine's ports and settings: what it needs from a client (:class:`Canceller`), where its
records go (:class:`Recorder`), who is told before a target is sent (:class:`Admissions`), and
what it counts live (:class:`Progress`). The app wires real ones (the aiohttp client, the
journal and the audit log); tests pass fakes (``tests/fakes.py``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from worker.core.retry import RetryPolicy
from worker.model import (
    AbortRule,
    Attempt,
    CancelReply,
    Command,
    Outcome,
    SearchPage,
    Target,
    TargetResult,
)

Answer = CancelReply | Command | SearchPage  # what a call of the Canceller returns


class Canceller(Protocol):
    """What the engine needs from an EnOS client."""

    async def cancel(self, target: Target) -> CancelReply:
        """Cancel the target's command(s); raise a classified EnOSError on failure."""
        ...

    async def cancel_assets(self, targets: Sequence[Target]) -> CancelReply:
        """Cancel every cached command of several assets of one org in one call."""
        ...

    async def get_command(self, target: Target, command_id: str) -> Command:
        """Read one command's current state."""
        ...

    async def search_page(self, target: Target, expression: str | None, page: int) -> SearchPage:
        """One page of the device's commands matching `expression`."""
        ...


class Recorder(Protocol):
    """Where attempts and results go (the audit log and the journal)."""

    def attempt(self, attempt: Attempt, action: str) -> None:
        """Record one HTTP attempt."""

    def result(self, result: TargetResult) -> None:
        """Record one final result."""


class Admissions(Protocol):
    """Told of every target before its first call: the crash-truth high-water mark."""

    def admit(self, ordinal: int) -> None:
        """Target `ordinal` (its place in the job's list) may be sent from now on."""


class StopReason(StrEnum):
    """Why a run ended."""

    FINISHED = "finished"
    FATAL = "fatal"  # credentials, permission, wrong gateway: exit 3
    ABORTED = "aborted"  # the failure-ratio rule: exit 3
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: exit 4
    DEADLINE = "deadline"  # limits.deadline reached: exit 4
    QUOTA = "quota"  # the gateway's quota is spent past the deadline or for over an hour: exit 4
    WINDOW = "window closed"  # the job's window closed: exit 4, resumed in the next one


@dataclass(frozen=True, slots=True)
class EngineSettings:
    """How the engine works through targets; built once by the runner."""

    concurrency: int
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    abort: AbortRule = field(default_factory=AbortRule)
    deadline_at: float | None = None  # on the engine's clock
    attempt_timeout: float = 10.0
    dry_run: bool = False  # search each target, cancel nothing
    verify: bool = True  # Get Command for evidence after a lost answer
    max_waiting: int = 0  # parked targets at most (0: 64 per worker, at least 4,096)
    assets_per_call: int = 1  # > 1: targets by asset id share calls (worker.core.batching)
    batch_settle_s: float = 2.0  # after a trial list's answer, before its assets are searched
    trial_batches: int = 3  # lists verified before lists are trusted


@dataclass
class Progress:
    """Live counters of one segment, read by the progress display and the abort rule."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    in_flight: int = 0
    requests: int = 0
    waiting: int = 0  # targets parked until their retry is due
    abandoned: int = 0  # requests cut off in flight by a second stop signal
    targets: int | None = None  # the segment's targets when found in it (a targets_query)

    @property
    def finished(self) -> int:
        """Targets with a final result in this segment."""
        return sum(self.outcomes.values())


@dataclass(frozen=True, slots=True)
class RateChange:
    """A decision about the rate: from, to (requests/s, None = unlimited), and why."""

    before: float | None
    after: float | None
    cause: str
    detail: str
