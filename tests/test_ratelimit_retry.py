"""The limiter and the retry policy, on a fake clock: pure logic, no network."""

from __future__ import annotations

import random

import pytest

from worker.core.ports import RateChange
from worker.core.ratelimit import RECOVERY_S, RateLimiter
from worker.core.recent import OVERLOAD_K
from worker.core.retry import RetryPolicy, Verdict
from worker.errors import AuthError, RateLimitedError, RetryableError, TargetError


class FakeClock:
    """A clock that only moves when somebody sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.stamps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += max(0.0, seconds)


async def _acquire_n(limiter: RateLimiter, clock: FakeClock, count: int) -> list[float]:
    stamps = []
    for _ in range(count):
        await limiter.acquire()
        stamps.append(clock.now)
    return stamps


@pytest.mark.anyio
async def test_no_start_up_burst_and_exact_rate() -> None:
    """At 100/s, 300 slots take 3 s from the start; no second holds more than 100."""
    clock = FakeClock()
    limiter = RateLimiter(100.0, clock=clock, sleep=clock.sleep)
    stamps = await _acquire_n(limiter, clock, 300)
    assert stamps[-1] - stamps[0] == pytest.approx(2.99)
    assert max(sum(1 for s in stamps if t <= s < t + 1) for t in stamps) <= 100


def answer_for(
    limiter: RateLimiter,
    clock: FakeClock,
    seconds: float,
    *,
    failing: float,
    rng: random.Random,
    rate: float | None = None,
) -> list[float | None]:
    """Answers arriving at the limiter's rate (or `rate`) for `seconds`, a share of them
    failing (5xx); returns the allowed rate seen after each simulated second."""
    seen: list[float | None] = []
    end, next_second = clock.now + seconds, clock.now + 1.0
    while clock.now < end:
        clock.now += 1.0 / (rate or limiter.rate or 1000.0)
        if rng.random() < failing:
            limiter.rejected()
        else:
            limiter.accepted()
        if clock.now >= next_second:
            seen.append(limiter.rate)
            next_second += 1.0
    return seen


@pytest.mark.anyio
async def test_a_429_pauses_everyone_then_the_fixed_rate_is_back_within_seconds() -> None:
    """Retry-After 2: nobody goes for 2 s, the rate is halved, then ramps back to the asked
    rate within RECOVERY_S of the pause's end; a storm of 429s is one cut, logged once."""
    clock = FakeClock()
    changes: list[RateChange] = []
    limiter = RateLimiter(100.0, clock=clock, sleep=clock.sleep, on_change=changes.append)
    await limiter.acquire()
    limiter.throttle(2.0)
    limiter.throttle(2.0)
    assert limiter.rate == pytest.approx(50.0)
    assert [c.cause for c in changes] == ["throttled"]
    paused_at = clock.now
    await limiter.acquire()
    assert clock.now >= paused_at + 2.0
    clock.now = paused_at + 2.0 + RECOVERY_S / 2
    limiter.reserve()
    assert limiter.rate == pytest.approx(75.0, rel=0.05)
    clock.now = paused_at + 2.0 + RECOVERY_S + 0.01
    limiter.reserve()
    assert limiter.rate == 100.0
    assert [c.cause for c in changes] == ["throttled", "asked"]


@pytest.mark.parametrize("failing", [0.1, 0.2, 0.4])
def test_random_5xx_never_lower_a_fixed_rate(failing: float) -> None:
    """Up to (nearly) half the answers failing at random: the rate is not touched at all."""
    clock = FakeClock()
    changes: list[RateChange] = []
    limiter = RateLimiter(200.0, clock=clock, on_change=changes.append)
    seen = answer_for(limiter, clock, 30, failing=failing, rng=random.Random(4))
    assert set(seen) == {200.0}
    assert changes == []


def test_dominating_failures_cap_the_rate_then_lift() -> None:
    """Three in four failing (overload): the rate is capped near K x the accepted rate; when
    the gateway answers again the cap lifts and the asked rate is back at once."""
    clock = FakeClock()
    changes: list[RateChange] = []
    limiter = RateLimiter(200.0, clock=clock, on_change=changes.append)
    seen = answer_for(limiter, clock, 12, failing=0.75, rng=random.Random(5))
    capped = seen[-1]
    assert capped is not None
    assert capped < 200.0 * OVERLOAD_K * 0.25 * 1.3  # about 2 x the accepted rate, or below
    assert changes[0].cause == "overload"
    assert "requests failed" in changes[0].detail
    seen = answer_for(limiter, clock, 8, failing=0.0, rng=random.Random(6), rate=capped)
    assert seen[-1] == 200.0
    assert changes[-1].cause == "asked"


def test_adaptive_slow_start_then_settles_under_the_knee() -> None:
    """rate: auto grows ~70 % a second from the floor; a 429 sets it to 90 % of the answers
    of the last second (5xx count: they passed the gateway's limiter), then it probes up."""
    clock = FakeClock()
    limiter = RateLimiter(10.0, adaptive=True, ceiling=None, floor=10.0, clock=clock)
    seen = answer_for(limiter, clock, 6, failing=0.1, rng=random.Random(7))
    assert seen[0] is not None
    assert seen[-1] is not None
    assert seen[-1] > 8 * seen[0]
    answer_for(limiter, clock, 1.2, failing=0.1, rng=random.Random(8), rate=300.0)
    limiter.throttle(1.0)
    assert limiter.rate == pytest.approx(0.9 * 300.0, rel=0.06)
    clock.now += 1.0
    after = answer_for(limiter, clock, 10, failing=0.1, rng=random.Random(9))
    assert after[-1] is not None
    assert 0.9 * 300 < after[-1] <= 0.9 * 300 + 10 * 0.01 * 300 + 1


@pytest.mark.anyio
async def test_unlimited_never_waits_unless_paused() -> None:
    """rate None: acquire returns at once; a throttle still pauses."""
    clock = FakeClock()
    limiter = RateLimiter(None, clock=clock, sleep=clock.sleep)
    await _acquire_n(limiter, clock, 1000)
    assert clock.now == 100.0
    limiter.throttle(None)
    await limiter.acquire()
    assert clock.now == 101.0


def test_retry_policy_decisions() -> None:
    """Fatal stops, 429 throttles (to its cap), transient retries (to attempts), others fail."""
    policy = RetryPolicy(attempts=3, max_throttles=2)
    rng = random.Random(1)
    transient = RetryableError("x", maybe_applied=False)
    limited = RateLimitedError("x", retry_after=4.0, request_id=None)
    assert policy.decide(AuthError("x"), failures=1, throttles=0, rng=rng).verdict is Verdict.FATAL
    assert (
        policy.decide(TargetError("x"), failures=1, throttles=0, rng=rng).verdict is Verdict.FAILED
    )
    decision = policy.decide(limited, failures=0, throttles=1, rng=rng)
    assert (decision.verdict, decision.wait_s) == (Verdict.THROTTLED, 4.0)
    assert policy.decide(limited, failures=0, throttles=2, rng=rng).verdict is Verdict.FAILED
    assert policy.decide(transient, failures=2, throttles=0, rng=rng).verdict is Verdict.RETRY
    assert policy.decide(transient, failures=3, throttles=0, rng=rng).verdict is Verdict.FAILED


def test_backoff_is_full_jitter_capped() -> None:
    """Waits are uniform in [0, min(cap, base * 2**(n-1))]."""
    policy = RetryPolicy(base_s=0.5, cap_s=4.0)
    rng = random.Random(3)
    waits = [policy.backoff(failures, rng) for failures in (1, 2, 3, 10) for _ in range(200)]
    assert all(0.0 <= w <= 4.0 for w in waits)
    assert max(waits[:200]) <= 0.5
    assert max(waits[600:]) > 3.0
