"""The engine and the gateway's quota, with a FakeCanceller: a 429 met while the run waits for
a spent quota costs no target a throttle, and a wait that does not fit the run ends the
segment (StopReason.QUOTA, resumable) without failing a target."""

from __future__ import annotations

import random
import time

import pytest

from tests.fakes import FakeCanceller, MemoryRecorder, assets, ok
from worker.budget import Budget, Window
from worker.core import ratelimit
from worker.core.engine import Engine
from worker.core.ports import EngineSettings, StopReason
from worker.core.ratelimit import RateLimiter
from worker.core.retry import RetryPolicy
from worker.errors import RateLimitedError
from worker.model import CancelReply, Decided, Outcome

pytestmark = pytest.mark.anyio
NO_THROTTLES = RetryPolicy(attempts=3, max_throttles=0, base_s=0.001, cap_s=0.002)


def refused(retry_after_s: float | None) -> RateLimitedError:
    """A 429 whose headers stated this Retry-After (uncapped)."""
    error = RateLimitedError("rate limited (HTTP 429)", retry_after=None, request_id=None)
    error.budget = Budget((), time.time(), retry_after_s)
    return error


def engine(fake: FakeCanceller, recorder: MemoryRecorder, **settings: object) -> Engine:
    """An engine with 4 workers, no throttle allowed per target, at 200/s."""
    config = EngineSettings(concurrency=4, policy=NO_THROTTLES, **settings)  # type: ignore[arg-type]
    return Engine(fake, recorder, RateLimiter(200.0), config, rng=random.Random(1))


async def test_a_spent_day_ends_the_segment_and_fails_no_target() -> None:
    """Retry-After of two hours: a spent quota; waiting for it does not fit (over an hour), so
    the segment ends as QUOTA with the reset time; the 429s met cost no target anything (not
    one may be throttled here), the targets not done stay resumable."""
    fake = FakeCanceller({f"a{i}": [refused(7200.0)] for i in range(2, 8)})
    recorder = MemoryRecorder()
    run = engine(fake, recorder)
    began = time.time()
    reason = await run.run(iter(assets(50)))
    assert reason is StopReason.QUOTA
    assert run.quota_reset_at is not None
    assert run.quota_reset_at == pytest.approx(began + 7200, abs=5)
    assert "resets at" in run.stop_message
    assert "UTC" in run.stop_message
    assert "no target failed for it" in run.stop_message
    assert all(r.outcome is not Outcome.FAILED for r in recorder.results)
    assert len(recorder.results) < 50
    waits = [a for _, a in recorder.attempts if a.http_status == 429]
    assert waits
    assert all(a.decision is Decided.LEFT for a in waits)  # the run stops: resumable
    assert all("the run waits for the gateway's quota until" in (a.error or "") for a in waits)


async def test_a_quota_wait_past_the_deadline_ends_the_segment() -> None:
    """A stated spent minute (41 s to go) with the deadline 20 s away: QUOTA, not a failure."""
    minute = Budget((Window("minute", 0, 5000, 41.0, 60.0),), time.time())
    spent = CancelReply(200, 0, "OK", "r", (), budget=minute)
    fake = FakeCanceller({"a0": [spent]})
    recorder = MemoryRecorder()
    run = engine(fake, recorder, deadline_at=time.time() + 20.0)
    assert await run.run(iter(assets(30))) is StopReason.QUOTA
    assert "that is after the deadline" in run.stop_message
    assert all(r.outcome is not Outcome.FAILED for r in recorder.results)


async def test_targets_refused_during_a_quota_pause_finish_after_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A quota pause that fits (shortened here to a fraction of a second): the targets met by
    429s during it wait as long, none of their throttles used (none is allowed), one probe
    goes first, and then every target finishes."""
    monkeypatch.setattr(ratelimit, "QUOTA_PAUSE_S", 0.05)
    fake = FakeCanceller({f"a{i}": [refused(0.1), ok("c")] for i in range(4)})
    recorder = MemoryRecorder()
    run = engine(fake, recorder)
    assert await run.run(iter(assets(20))) is StopReason.FINISHED
    done = recorder.by_asset()
    assert len(done) == 20
    assert all(r.outcome is not Outcome.FAILED for r in done.values())
    assert run.limiter.quota is None
    waits = [a for _, a in recorder.attempts if a.http_status == 429]
    assert len(waits) == 4
    assert all(a.decision is Decided.THROTTLED for a in waits)
