"""What a target's core answers the engine: the actions (send, wait, finish, leave, stop the
run), the run's situation it decides in, and the one ladder from a retry decision to the next
action. Pure values and functions: :mod:`worker.core.decide` and :mod:`worker.core.batching`
both decide through them, the engine carries them out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from worker.core.retry import Decision, Verdict
from worker.errors import EnOSError
from worker.model import TargetResult

T = TypeVar("T")


class Kind(StrEnum):
    """What a call asks of the gateway."""

    CANCEL = "cancel"
    BATCH = "cancel_assets"  # one cancel for several assets (assetId=a1,a2,...)
    GET = "get"  # Get Command: evidence after a lost answer
    SEARCH = "search"  # Search Command (state = 1): what a dry run would cancel


@dataclass(frozen=True, slots=True)
class Send:
    """Send one call of this kind for the target, at the shared rate: for a selective target,
    a search `page`, or a cancel of one `command_id`."""

    kind: Kind
    page: int = 1
    command_id: str | None = None


@dataclass(frozen=True, slots=True)
class Wait:
    """Put the target aside for `seconds`, then call :meth:`TargetCore.waited`.

    `throttled` (HTTP 429) also pauses every caller: `seconds` is the gateway's Retry-After,
    or None for the limiter's own pause.
    """

    seconds: float | None
    throttled: bool = False


@dataclass(frozen=True, slots=True)
class Finish:
    """The target's final result."""

    result: TargetResult


@dataclass(frozen=True, slots=True)
class Leave:
    """No final result: the run is stopping; the target stays resumable."""

    why: str


@dataclass(frozen=True, slots=True)
class StopRun:
    """Nothing else can succeed (credentials, permission, wrong gateway): stop the run."""

    why: str


Action = Send | Wait | Finish | Leave | StopRun
SENDS = {kind: Send(kind) for kind in Kind}  # frozen: one value per kind, none per call
PLAIN_CANCEL = SENDS[Kind.CANCEL]  # the engine's hot path recognises it by identity


@dataclass(frozen=True, slots=True)
class Situation:
    """What the run is doing when an event arrives: stopping, and the time left (None: no
    deadline), as the core needs them to decide whether a retry still fits."""

    stopping: bool = False
    time_left_s: float | None = None
    attempt_timeout_s: float = 10.0


RUNNING = Situation()


def wait_or_leave(decision: Decision, situation: Situation) -> Wait | Leave:
    """Wait as the policy decided, unless the run is stopping or the wait would pass the
    deadline: then leave the target resumable."""
    throttled = decision.verdict is Verdict.THROTTLED
    if situation.stopping:
        return Leave("the run is stopping")
    if situation.time_left_s is not None:
        needed = (decision.wait_s or 1.0) + situation.attempt_timeout_s
        if needed >= situation.time_left_s:
            return Leave("no time left before the deadline")
    return Wait(decision.wait_s, throttled=throttled)


def after_failure(
    decision: Decision,
    error: EnOSError,
    situation: Situation,
    *,
    give_up: Callable[[], T],
    leave: Callable[[], T] | None = None,
    fatal_stops: bool = True,
) -> Wait | Leave | StopRun | T:
    """The one ladder from the policy's decision after a failed call to the next action.

    A retry (or a 429) waits, unless the run is stopping or the deadline is too near: then the
    core leaves (or, with `leave`, does that instead). A fatal answer stops the run, unless
    `fatal_stops` is off (a question asked only for evidence, whose answer changes nothing:
    the next cancel meets the same answer and stops the run). Anything else is final:
    `give_up` makes the result.
    """
    if decision.verdict in (Verdict.RETRY, Verdict.THROTTLED):
        step = wait_or_leave(decision, situation)
        if isinstance(step, Leave) and leave is not None:
            return leave()
        return step
    if decision.verdict is Verdict.FATAL and fatal_stops:
        return StopRun(str(error))
    return give_up()
