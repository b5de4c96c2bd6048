"""The real engine with a FakeCanceller: its scheduling and bookkeeping, in milliseconds."""

from __future__ import annotations

import random

import anyio
import anyio.lowlevel
import pytest

from tests.fakes import FakeCanceller, MarkRecorder, MemoryRecorder, assets, ok
from worker.core.engine import Engine
from worker.core.ports import EngineSettings, StopReason
from worker.core.ratelimit import RateLimiter
from worker.core.retry import RetryPolicy
from worker.errors import AuthError, RetryableError, TargetError
from worker.model import AbortRule, CancelReply, Command, Outcome, SearchPage, Target

pytestmark = pytest.mark.anyio
FAST = RetryPolicy(attempts=4, base_s=0.001, cap_s=0.002)


def lost() -> RetryableError:
    """A 5xx: may have taken effect."""
    return RetryableError("gateway error HTTP 502", maybe_applied=True, http_status=502)


def engine(
    fake: FakeCanceller, recorder: MemoryRecorder, *, concurrency: int = 4, **settings: object
) -> Engine:
    """An engine over `fake` at an unlimited rate, with a fast retry policy."""
    config = EngineSettings(concurrency=concurrency, policy=FAST, **settings)  # type: ignore[arg-type]
    return Engine(fake, recorder, RateLimiter(None), config, rng=random.Random(1))


async def test_a_target_in_backoff_holds_no_worker() -> None:
    """One worker, a target that fails three times: the others are done while it waits, and
    it still ends cancelled; every target has exactly one result."""
    fake = FakeCanceller({"a0": [lost(), lost(), lost(), ok("c")]})
    recorder = MemoryRecorder()
    reason = await engine(fake, recorder, concurrency=1).run(iter(assets(20)))
    assert reason is StopReason.FINISHED
    order = [r.target.asset_id for r in recorder.results]
    assert order[0] == "a1"  # not held up by a0's backoff
    done = recorder.by_asset()
    assert len(done) == 20
    first = done["a0"]
    assert (first.outcome, first.cancelled_command_ids, first.attempts) == (
        Outcome.CANCELLED,
        ("c",),
        4,
    )


async def test_concurrency_bounds_requests_in_flight() -> None:
    """Never more calls in flight than the concurrency."""
    fake = FakeCanceller({f"a{i}": [lost()] for i in range(0, 40, 3)})
    recorder = MemoryRecorder()
    await engine(fake, recorder, concurrency=3).run(iter(assets(40)))
    assert fake.most_in_flight <= 3
    assert len(recorder.by_asset()) == 40


async def test_every_target_is_admitted_in_order_before_its_first_call() -> None:
    """The admission mark hears of each ordinal, in order, before that target is sent."""
    fake = FakeCanceller()
    recorder = MemoryRecorder()
    mark = MarkRecorder(fake.calls)
    run = Engine(
        fake,
        recorder,
        RateLimiter(None),
        EngineSettings(concurrency=4, policy=FAST),
        admissions=mark,
    )
    await run.run(iter(assets(25)))
    assert [ordinal for ordinal, _ in mark.admitted] == list(range(25))
    for ordinal, calls_before in mark.admitted:
        assert ("cancel", f"a{ordinal}") not in fake.calls[:calls_before]


async def test_sent_before_makes_an_empty_answer_unknown() -> None:
    """A target an earlier segment may have sent: nothing found is effect_unknown."""
    fake = FakeCanceller({"a1": [ok("x")]})
    recorder = MemoryRecorder()
    run = Engine(
        fake,
        recorder,
        RateLimiter(None),
        EngineSettings(concurrency=2, policy=FAST),
        sent_before=lambda ordinal, _: ordinal <= 1,
    )
    await run.run(iter(assets(3)))
    done = recorder.by_asset()
    assert (done["a0"].outcome, done["a0"].effect_unknown) == (Outcome.NOTHING_TO_CANCEL, True)
    assert (done["a1"].outcome, done["a1"].effect_unknown) == (Outcome.CANCELLED, True)
    assert done["a2"].effect_unknown is False


async def test_a_client_bug_fails_one_target_not_the_run() -> None:
    """An exception the client did not classify (ValueError on a strange field): that target
    is failed with the effect unknown and an attempt record; the others go on."""
    fake = FakeCanceller({"a2": [ValueError("invalid literal for int()")]})
    recorder = MemoryRecorder()
    reason = await engine(fake, recorder).run(iter(assets(5)))
    assert reason is StopReason.FINISHED
    bad = recorder.by_asset()["a2"]
    assert (bad.outcome, bad.effect_unknown) == (Outcome.FAILED, True)
    assert "ValueError" in (bad.error or "")
    decisions = [a.decision for _, a in recorder.attempts if a.target.asset_id == "a2"]
    assert decisions == ["failed"]
    assert len(recorder.results) == 5


async def test_fatal_stops_admission_and_leaves_the_rest() -> None:
    """A fatal answer stops the run: no target after it is sent, none is marked failed."""
    fake = FakeCanceller({"a3": [AuthError("rejected", http_status=401)]})
    recorder = MemoryRecorder()
    run = engine(fake, recorder, concurrency=1)
    reason = await run.run(iter(assets(10)))
    assert reason is StopReason.FATAL
    assert [r.target.asset_id for r in recorder.results] == ["a0", "a1", "a2"]
    assert ("cancel", "a4") not in fake.calls


async def test_a_stop_leaves_waiting_targets_resumable() -> None:
    """Stopped while a target waits for its retry: it gets no result (resumable)."""
    fake = FakeCanceller({"a0": [lost()]})
    recorder = MemoryRecorder()
    slow = RetryPolicy(attempts=3, base_s=60, cap_s=60)
    run = Engine(
        fake,
        recorder,
        RateLimiter(None),
        EngineSettings(concurrency=2, policy=slow),
        rng=random.Random(5),
    )
    async with anyio.create_task_group() as group:
        group.start_soon(run.run, iter(assets(5)))
        while len(recorder.results) < 4 or run.progress.waiting < 1:
            await anyio.lowlevel.checkpoint()
        run.stop(StopReason.INTERRUPTED, "test")
    assert "a0" not in recorder.by_asset()
    assert len(recorder.results) == 4


async def test_abort_rule_counts_targets() -> None:
    """The failure ratio stops the run once enough targets finished."""
    fake = FakeCanceller({f"a{i}": [TargetError("x", code=99404)] for i in range(40)})
    recorder = MemoryRecorder()
    run = engine(fake, recorder, concurrency=1, abort=AbortRule(failure_ratio=0.5, min_finished=10))
    assert await run.run(iter(assets(100))) is StopReason.ABORTED
    assert len(recorder.results) == 10


async def test_outage_stops_before_the_fleet_fails() -> None:
    """Transient failures in a row with no answer between: the outage stop (fatal)."""
    fake = FakeCanceller({f"a{i}": [lost()] * 10 for i in range(100)})
    recorder = MemoryRecorder()
    run = engine(fake, recorder, concurrency=2)
    assert await run.run(iter(assets(100))) is StopReason.FATAL
    assert "in a row" in run.stop_message
    assert sum(r.outcome is Outcome.FAILED for r in recorder.results) <= 2


async def test_lost_then_get_records_evidence() -> None:
    """Lost, empty retry, Get state 2: nothing_to_cancel, unknown, get_state 2, three calls."""
    fake = FakeCanceller({"a0": [lost(), ok(), Command("c1", 2)]})
    recorder = MemoryRecorder()
    target = Target(org_id="o1", asset_id="a0", command_id="c1")
    await engine(fake, recorder).run(iter([(0, target)]))
    (result,) = recorder.results
    assert (result.outcome, result.effect_unknown, result.get_state) == (
        Outcome.NOTHING_TO_CANCEL,
        True,
        2,
    )
    assert [action for action, _ in fake.calls] == ["cancel", "cancel", "get"]
    assert [action for action, _ in recorder.attempts] == ["cancel", "cancel", "get"]


async def test_dry_run_searches_and_never_cancels() -> None:
    """first=SEARCH: one search per target, no cancel, found ids kept apart from claims."""
    fake = FakeCanceller({"a1": [[Command("c9", 1)]]})
    fake.script.update({f"a{i}": [[]] for i in (0, 2)})
    recorder = MemoryRecorder()
    await engine(fake, recorder, dry_run=True).run(iter(assets(3)))
    assert {action for action, _ in fake.calls} == {"search"}
    done = recorder.by_asset()
    assert done["a1"].found_command_ids == ("c9",)
    assert done["a1"].cancelled_command_ids == ()


async def test_a_second_stop_during_a_lists_verification_keeps_its_answer() -> None:
    """The list's answer came; its assets are being searched when the run is cancelled at once
    (a second signal): the targets keep what the answer showed, nothing is left unwritten."""
    searching = anyio.Event()

    class Held(FakeCanceller):
        async def search_page(
            self, target: Target, expression: str | None, page: int
        ) -> SearchPage:
            searching.set()
            await anyio.sleep_forever()
            raise AssertionError  # never reached

    canceller = Held(
        script={
            "a0,a1,a2": [
                CancelReply(
                    200,
                    0,
                    "OK",
                    "req-9",
                    (Command("c0", 1, asset_id="a0"), Command("c2", 1, asset_id="a2")),
                )
            ]
        }
    )
    recorder = MemoryRecorder()
    run = Engine(
        canceller,
        recorder,
        RateLimiter(None),
        EngineSettings(concurrency=2, assets_per_call=3, batch_settle_s=0.0),
    )
    async with anyio.create_task_group() as group:
        group.start_soon(run.run, iter(list(assets(3))))
        await searching.wait()
        run.stop(StopReason.INTERRUPTED, "SIGINT")
        run.cancel()
    results = recorder.by_asset()
    assert results["a0"].cancelled_command_ids == ("c0",)
    assert results["a1"].outcome is Outcome.NOTHING_TO_CANCEL
    assert results["a2"].cancelled_command_ids == ("c2",)
    assert {r.request_id for r in results.values()} == {"req-9"}
