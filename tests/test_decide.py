"""The per-target core, driven with plain values: no event loop, no HTTP, no clock.

Each row is a history of events and the action the core must answer with; together they cover
every error class x attempt number x stop state x lost-answer history.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import pytest

from worker.core.actions import RUNNING, Finish, Kind, Leave, Send, Situation, StopRun, Wait
from worker.core.decide import TargetCore
from worker.core.retry import Retrying, RetryPolicy, Verdict
from worker.errors import (
    AuthError,
    EnOSError,
    FatalError,
    PermissionDeniedError,
    RateLimitedError,
    RetryableError,
    TargetError,
    UnreadableAnswerError,
)
from worker.model import CancelReply, Command, Outcome, SearchPage, Target

ORG = "o15541858646501"
ALL = Target(org_id=ORG, asset_id="as000001")
ONE = Target(org_id=ORG, asset_id="as000001", command_id="c1")
CANCELLED, NOTHING, FAILED = Outcome.CANCELLED, Outcome.NOTHING_TO_CANCEL, Outcome.FAILED
POLICY = RetryPolicy(attempts=3, max_throttles=2, base_s=0.5, cap_s=30.0)
STOPPING = Situation(stopping=True)


def lost() -> RetryableError:
    """A timeout: the call may have taken effect."""
    return RetryableError("no answer within 10 s", maybe_applied=True)


def refused() -> RetryableError:
    """Connection refused: the call never reached the service."""
    return RetryableError("cannot connect", maybe_applied=False)


def throttled() -> RateLimitedError:
    """HTTP 429 with Retry-After: 2."""
    return RateLimitedError("rate limited (HTTP 429)", retry_after=2.0, request_id=None)


def reply(*ids: str, unreadable: int = 0) -> CancelReply:
    """A code-0 cancel answer listing these command ids."""
    problem = "a command has no readable commandId" if unreadable else None
    commands = tuple(Command(i, 1) for i in ids)
    return CancelReply(200, 0, "OK", "r1", commands, unreadable, problem)


@dataclass
class Expect:
    """What the core's last answer must be."""

    action: type
    outcome: Outcome | None = None
    unknown: bool = False
    ids: tuple[str, ...] = ()
    throttled: bool = False
    sends: Kind | None = None


def play(
    target: Target,
    failures: list[EnOSError],
    last: EnOSError | CancelReply | Command,
    *,
    situation: Situation = RUNNING,
    sent_before: bool = False,
) -> tuple[TargetCore, object]:
    """Start a core, fail it with `failures` (waiting out each retry), then give it `last`."""
    core = TargetCore(target, POLICY, started=0.0, sent_before=sent_before)
    rng = random.Random(1)
    action: object = core.start()
    for error in failures:
        assert isinstance(action, Send), action
        action = core.failed(error, 1.0, 5.0, rng)
        assert isinstance(action, Wait), action
        action = core.waited()
    assert isinstance(action, Send), action
    if isinstance(last, CancelReply):
        return core, core.cancelled(last, 2.0, 5.0)
    if isinstance(last, Command):
        return core, core.got_command(last, 2.0, 5.0)
    return core, core.failed(last, 2.0, 5.0, rng, situation)


# fmt: off
CASES: dict[str, tuple[Target, list[EnOSError], EnOSError | CancelReply, Expect, bool]] = {
    # -- answers, by lost-answer history; the last field: an earlier segment may have sent it
    "ids seen": (ALL, [], reply("a", "b"), Expect(Finish, CANCELLED, ids=("a", "b")), False),
    "nothing cached": (ALL, [], reply(), Expect(Finish, NOTHING), False),
    "lost then empty, all": (ALL, [lost()], reply(), Expect(Finish, NOTHING, unknown=True), False),
    "lost then ids, all": (ALL, [lost()], reply("b"),
                           Expect(Finish, CANCELLED, unknown=True, ids=("b",)), False),
    "lost then id, one": (ONE, [lost()], reply("c1"), Expect(Finish, CANCELLED, ids=("c1",)),
                          False),
    "lost then empty, one": (ONE, [lost()], reply(), Expect(Send, sends=Kind.GET), False),
    "refused then empty": (ALL, [refused()], reply(), Expect(Finish, NOTHING), False),
    "429 then empty": (ALL, [throttled()], reply(), Expect(Finish, NOTHING), False),
    "earlier segment, empty": (ALL, [], reply(), Expect(Finish, NOTHING, unknown=True), True),
    "earlier segment, ids": (ALL, [], reply("a"),
                             Expect(Finish, CANCELLED, unknown=True, ids=("a",)), True),
    "earlier segment, one": (ONE, [], reply("c1"), Expect(Finish, CANCELLED, ids=("c1",)), True),
    "unreadable item": (ALL, [], reply("a", unreadable=1),
                        Expect(Finish, CANCELLED, unknown=True, ids=("a",)), False),
    "only unreadable": (ALL, [], reply(unreadable=2), Expect(Finish, NOTHING, unknown=True), False),
    # -- errors, by attempt number (3 attempts, at most 2 429s)
    "5xx, first": (ALL, [], lost(), Expect(Wait), False),
    "5xx, second": (ALL, [lost()], lost(), Expect(Wait), False),
    "5xx, last": (ALL, [lost(), lost()], lost(), Expect(Finish, FAILED, unknown=True), False),
    "refused, last": (ALL, [refused(), refused()], refused(), Expect(Finish, FAILED), False),
    "refused twice, lost last": (ALL, [refused(), refused()], lost(),
                                 Expect(Finish, FAILED, unknown=True), False),
    "429": (ALL, [], throttled(), Expect(Wait, throttled=True), False),
    "429s do not use attempts": (ALL, [lost(), lost(), throttled()], throttled(),
                                 Expect(Wait, throttled=True), False),
    "429 cap": (ALL, [throttled(), throttled()], throttled(), Expect(Finish, FAILED), False),
    "429 cap after lost": (ALL, [lost(), throttled(), throttled()], throttled(),
                           Expect(Finish, FAILED, unknown=True), False),
    "99404": (ALL, [], TargetError("unknown device", code=99404), Expect(Finish, FAILED), False),
    "99404 after lost": (ALL, [lost()], TargetError("unknown", code=99404),
                         Expect(Finish, FAILED, unknown=True), False),
    "unreadable answer": (ALL, [], UnreadableAnswerError("ValueError"),
                          Expect(Finish, FAILED, unknown=True), False),
    "auth": (ALL, [], AuthError("rejected"), Expect(StopRun), False),
    "99403": (ALL, [lost()], PermissionDeniedError("no", code=99403), Expect(StopRun), False),
    "404 gateway": (ALL, [], FatalError("no such API", http_status=404), Expect(StopRun), False),
}
# fmt: on


@pytest.mark.parametrize("name", list(CASES))
def test_core_table(name: str) -> None:
    """Every row: the core's answer has the expected kind, outcome, claims and doubts."""
    target, failures, last, expect, sent_before = CASES[name]
    core, action = play(target, failures, last, sent_before=sent_before)
    assert type(action) is expect.action, action
    if isinstance(action, Finish):
        result = action.result
        assert result.outcome is expect.outcome
        assert result.effect_unknown is expect.unknown
        assert result.cancelled_command_ids == expect.ids
        assert result.attempts == core.sent
    if isinstance(action, Wait):
        assert action.throttled is expect.throttled
    if isinstance(action, Send):
        assert action.kind is expect.sends


@pytest.mark.parametrize(
    "error", [lost(), refused(), throttled(), TargetError("x", code=99400), AuthError("x")]
)
def test_a_stopping_run_leaves_what_would_retry(error: EnOSError) -> None:
    """While stopping, an error that would be retried leaves the target resumable; final
    errors still finish it, a fatal one still stops the run."""
    _, action = play(ALL, [], error, situation=STOPPING)
    if isinstance(error, RetryableError):
        assert isinstance(action, Leave)
    elif isinstance(error, FatalError):
        assert isinstance(action, StopRun)
    else:
        assert isinstance(action, Finish)


def test_a_wait_that_ends_past_the_deadline_leaves_the_target() -> None:
    """A retry that cannot finish before the deadline is not started: resumable."""
    _, action = play(ALL, [], lost(), situation=Situation(time_left_s=5.0, attempt_timeout_s=10))
    assert isinstance(action, Leave)
    _, action = play(ALL, [], lost(), situation=Situation(time_left_s=60, attempt_timeout_s=10))
    assert isinstance(action, Wait)


def test_waited_while_stopping_leaves() -> None:
    """A parked target whose wait ends in a stopping run is left, not sent."""
    core = TargetCore(ALL, POLICY, started=0.0)
    core.start()
    assert isinstance(core.failed(lost(), 1.0, 1.0, random.Random(1)), Wait)
    assert isinstance(core.waited(STOPPING), Leave)
    assert core.sent == 1


def test_get_after_lost_answer_is_evidence_not_proof() -> None:
    """Lost, then empty for one command id: Get shows state 2; the result stays
    nothing_to_cancel with effect_unknown, and keeps the state as evidence."""
    core, action = play(ONE, [lost()], reply())
    assert action == Send(Kind.GET)
    finish = core.got_command(Command("c1", 2), 3.0, 4.0)
    result = finish.result
    assert (result.outcome, result.effect_unknown) == (Outcome.NOTHING_TO_CANCEL, True)
    assert (result.cancelled_command_ids, result.get_state) == ((), 2)
    assert result.attempts == 3  # lost cancel, empty cancel, get


@pytest.mark.parametrize(
    "error", [lost(), throttled(), TargetError("x", code=99404), PermissionDeniedError("x")]
)
def test_a_failing_get_never_changes_the_result(error: EnOSError) -> None:
    """Whatever the Get meets, the result is nothing_to_cancel, effect unknown, no evidence;
    retryable errors are retried first, a fatal one does not stop the run from here."""
    core, action = play(ONE, [lost()], reply())
    rng = random.Random(2)
    for _ in range(POLICY.attempts + POLICY.max_throttles + 1):
        action = core.failed(error, 5.0, 1.0, rng)
        if isinstance(action, Finish):
            break
        assert isinstance(action, Wait)
        assert core.waited() == Send(Kind.GET)
    assert isinstance(action, Finish)
    result = action.result
    assert (result.outcome, result.effect_unknown, result.get_state) == (
        Outcome.NOTHING_TO_CANCEL,
        True,
        None,
    )


def test_search_finds_without_claiming() -> None:
    """A dry run's search lists what a cancel would find (the one command id, if given)."""
    core = TargetCore(ONE, POLICY, started=0.0, probe=True)
    assert core.start() == Send(Kind.SEARCH)
    finish = core.searched(SearchPage((Command("c0", 1), Command("c1", 1)), 2, 0, 50), 1.0, 1.0)
    assert isinstance(finish, Finish)
    assert finish.result.found_command_ids == ("c1",)
    assert finish.result.cancelled_command_ids == ()


def test_retrying_counts_failures_and_throttles_apart() -> None:
    """The one retry path: 429s do not use up attempts, but have their own cap."""
    retrying = Retrying(POLICY)
    rng = random.Random(3)
    verdicts = [retrying.failed(throttled(), rng).verdict for _ in range(3)]
    assert verdicts == [Verdict.THROTTLED, Verdict.THROTTLED, Verdict.FAILED]
    retrying = Retrying(POLICY)
    verdicts = [retrying.failed(lost(), rng).verdict for _ in range(3)]
    assert verdicts == [Verdict.RETRY, Verdict.RETRY, Verdict.FAILED]
