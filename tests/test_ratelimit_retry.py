"""The limiter and the retry policy, on a fake clock: pure logic, no network."""

from __future__ import annotations

import random

import pytest

from worker.errors import AuthError, RateLimitedError, RetryableError, TargetError
from worker.ratelimit import RateLimiter
from worker.retry import RetryPolicy, Verdict


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


@pytest.mark.anyio
async def test_throttle_pauses_everyone_and_cuts_then_recovers() -> None:
    """A 429 with Retry-After 2: nobody goes for 2 s, the rate drops to 80 %, then climbs back."""
    clock = FakeClock()
    limiter = RateLimiter(100.0, clock=clock, sleep=clock.sleep)
    await limiter.acquire()
    limiter.throttle(2.0)
    limiter.throttle(2.0)  # the same storm: one cut, not two
    assert limiter.rate == pytest.approx(80.0)
    paused_at = clock.now
    await limiter.acquire()
    assert clock.now >= paused_at + 2.0
    for _ in range(2000):
        limiter.succeeded()
    assert limiter.rate == 100.0


@pytest.mark.anyio
async def test_adaptive_rate_slow_starts_then_probes() -> None:
    """rate: auto doubles roughly each second of clean answers; after a cut it returns to 90 %
    of the knee fast, then probes above it slowly."""
    limiter = RateLimiter(10.0, adaptive=True, ceiling=None, floor=10.0)
    for _ in range(10):
        limiter.succeeded()
    assert limiter.rate == pytest.approx(17.0)
    for _ in range(400):
        limiter.succeeded()
    knee = limiter.rate
    assert knee is not None
    limiter.slow_down()
    assert limiter.rate == pytest.approx(0.8 * knee)
    for _ in range(int(knee)):  # about a second of clean answers
        limiter.succeeded()
    assert limiter.rate == pytest.approx(0.9 * knee, rel=0.02)
    for _ in range(int(knee)):
        limiter.succeeded()
    assert (limiter.rate or 0.0) < 0.92 * knee


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
