"""The limiter against the gateway's budget, on a simulated clock: pacing to stated windows,
rate: auto starting at the budget, shards sharing one budget, quota pauses and their probe.

The gateway is the simulator's own quota model (worker.sim.quota.Quota) driven in virtual
time: three simulated minutes take well under a second, and nothing sleeps.
"""

from __future__ import annotations

import heapq
from collections import Counter
from dataclasses import dataclass, field

import pytest

from worker.budget import Budget, Window, read_budget
from worker.core.ports import RateChange
from worker.core.quota import QUOTA_STOP_S, QuotaPause, too_long
from worker.core.ratelimit import PROBE_POLL_S, RateLimiter
from worker.sim.quota import Quota, parse_quota

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


class Clock:
    """Virtual time, for the limiter's clock and its wall clock alike."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Drive:
    """What the gateway saw: calls admitted, and refusals by the window that refused them."""

    admitted: int = 0
    by_limiter: Counter[int] = field(default_factory=Counter)  # calls admitted, per limiter
    refused: Counter[tuple[str, int]] = field(default_factory=Counter)  # (period, window no.)
    refused_total: int = 0


def refusing_windows(quota: Quota, now: float) -> list[tuple[str, int]]:
    """The (period, window number) of every spent window of `quota` at `now`."""
    lengths = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}
    return [
        (c.rule.period, int(now // (c.rule.length_s or lengths[c.rule.period])))
        for c in quota._counts
        if c.used >= c.rule.limit
    ]


def drive(
    limiters: list[RateLimiter], quota: Quota, clock: Clock, seconds: float, callers: int = 2
) -> Drive:
    """Each limiter's `callers` take slots as the engine does (reserve, sleep, check the pause,
    send), the gateway answers at once, and the answer goes back as the engine gives it (the
    429 first, then what the headers state)."""
    seen = Drive()
    events = [(clock.now, i, c, "ask") for i in range(len(limiters)) for c in range(callers)]
    heapq.heapify(events)
    end = clock.now + seconds
    while events and events[0][0] < end:
        moment, index, caller, step = heapq.heappop(events)
        clock.now = moment
        limiter = limiters[index]
        if step == "ask":
            wait, held = limiter.reserve()
            if held and wait == 0:
                step = "send"
            else:
                heapq.heappush(events, (moment + wait, index, caller, "check" if held else "ask"))
                continue
        if step == "check" and limiter.paused():
            heapq.heappush(events, (moment, index, caller, "ask"))
            continue
        spent = refusing_windows(quota, moment)
        admitted, headers = quota.admit(moment)
        stated = read_budget(headers, sent_at=moment, now=moment)
        if admitted:
            seen.admitted += 1
            seen.by_limiter[index] += 1
            limiter.accepted()
        else:
            seen.refused_total += 1
            seen.refused.update(spent or refusing_windows(quota, moment))
            hint = stated.retry_after_s if stated is not None else None
            limiter.throttle(hint)
        if stated is not None:
            limiter.budget(stated)
        heapq.heappush(events, (moment, index, caller, "ask"))
    return seen


def limiter(clock: Clock, rate: float | None = 400.0, **options: object) -> RateLimiter:
    """A limiter on the virtual clock (its slots and its UTC)."""
    return RateLimiter(rate, clock=clock, wall=clock, **options)  # type: ignore[arg-type]


def waiting(pacer: RateLimiter) -> QuotaPause | None:
    """The limiter's quota pause (read through a call: it changes under the test's feet)."""
    return pacer.quota


def gateway(spec: str, family: str = "x-ratelimit", retry_after: str = "exact") -> Quota:
    """The simulator's quota model."""
    return Quota(parse_quota(spec), family=family, retry_after=retry_after)


def test_a_fixed_rate_above_a_stated_minute_budget_spreads_it_with_one_warning() -> None:
    """--rate 400 against second=100, minute=5000 stated in X-RateLimit headers: the minute
    is spread at ~83/s (not spent in 12 s and then refused for 48), at least 95 % of the
    binding budget over three minutes, at most one 429 in any window; one warning naming both
    rates and the way out."""
    clock = Clock(T0 + 0.25)
    changes: list[RateChange] = []
    pacer = limiter(clock, 400.0, on_change=changes.append)
    seen = drive([pacer], gateway("second=100,minute=5000"), clock, 180.0)
    assert seen.admitted >= 0.95 * 5000 / 60 * 180
    assert max(seen.refused.values(), default=0) <= 1
    assert [c.cause for c in changes] == ["budget"]
    warning = changes[0].detail
    assert "400/s" in warning
    assert "83" in warning
    assert "--rate auto" in warning
    assert pacer.rate is not None
    assert pacer.rate < 90
    assert pacer.cause == "budget"


@pytest.mark.parametrize("family", ["ietf", "both"])
def test_other_header_families_keep_the_budget_too(family: str) -> None:
    """The IETF headers (one window, the one with the fewest left) or both families: at least
    95 % of the binding budget, at most one 429 per window."""
    clock = Clock(T0 + 0.25)
    seen = drive([limiter(clock)], gateway("second=100,minute=5000", family), clock, 180.0)
    assert seen.admitted >= 0.95 * 5000 / 60 * 180
    assert max(seen.refused.values(), default=0) <= 1


@pytest.mark.parametrize(
    ("rate", "retry_after"),
    [(100.0, "exact"), (None, "exact"), (None, "absent"), (None, "capped")],
)
def test_without_headers_a_spent_minute_is_a_quota_pause(
    rate: float | None, retry_after: str
) -> None:
    """No budget headers: the spent minute pauses the whole run to its end (Retry-After, else
    the next UTC minute after three bursts in a row), one probe, then on; the run still gets
    at least 90 % of the binding budget, at most three 429s per window (a fixed rate at the
    second's limit, and rate: auto)."""
    clock = Clock(T0 + 0.25)
    pacer = limiter(clock, rate or 10.0, adaptive=rate is None, floor=10.0)
    quota = gateway("second=100,minute=5000", "none", retry_after)
    seen = drive([pacer], quota, clock, 180.0)
    assert seen.admitted >= 0.9 * 5000 / 60 * 180
    assert max(seen.refused.values()) <= 3


def test_without_any_hint_bursts_in_a_row_wait_for_the_next_minute() -> None:
    """No headers and no Retry-After: three bursts of 429s with nothing answered between are
    a spent quota; the run waits to the next UTC minute (then one probe), at least 90 % of
    the binding budget."""
    clock = Clock(T0 + 0.25)
    pacer = limiter(clock, 100.0)
    seen = drive([pacer], gateway("minute=3000", "none", "absent"), clock, 180.0)
    assert seen.admitted >= 0.9 * 3000 * 3
    assert max(seen.refused.values()) <= 3


def test_rate_auto_starts_at_the_stated_budget() -> None:
    """rate: auto with a stated budget: at the budget from the first answer, no slow start."""
    clock = Clock(T0 + 0.25)
    changes: list[RateChange] = []
    pacer = limiter(clock, 10.0, adaptive=True, floor=10.0, on_change=changes.append)
    drive([pacer], gateway("second=100,minute=5000"), clock, 0.05, callers=1)
    assert pacer.rate == pytest.approx(5000 / 59.75, rel=0.02)
    assert pacer.cause == "budget"
    assert changes[0].cause == "budget"
    assert "rate: auto starts at the gateway's stated budget" in changes[0].detail
    seen = drive([pacer], gateway("second=100,minute=5000"), clock, 120.0)
    assert seen.admitted >= 0.95 * 5000 * 2
    clock.now += 10.0  # the budget grows (another client stopped): rate: auto follows it
    pacer.budget(Budget((Window("minute", 4000, 5000, 20.0, 60.0),), clock.now))
    assert pacer.rate == pytest.approx(200.0)


def test_shards_share_one_budget_by_pacing_from_what_is_left() -> None:
    """Two processes of one application, each asking 400/s: each paces from what is left (the
    other's calls included), so together they keep the budget, each near half."""
    clock = Clock(T0 + 0.25)
    shards = [limiter(clock), limiter(clock)]
    seen = drive(shards, gateway("second=100,minute=5000"), clock, 180.0)
    assert seen.admitted >= 0.95 * 5000 / 60 * 180
    assert max(seen.refused.values(), default=0) <= 1
    assert all(0.4 * seen.admitted < seen.by_limiter[i] < 0.6 * seen.admitted for i in (0, 1))


def test_a_long_retry_after_is_a_quota_pause_with_one_probe() -> None:
    """A 429 with Retry-After 41: every caller waits until then, one probe goes first while
    the others ask again and again; the probe answered, everyone goes on. The progress line's
    words say how long and until when (UTC)."""
    clock = Clock(T0 + 19.0)
    changes: list[RateChange] = []
    pacer = limiter(clock, 100.0, on_change=changes.append)
    pacer.throttle(41.0)
    assert pacer.quota is not None
    assert pacer.quota.describe(clock.now) == "quota: waiting 41 s (until 08:01:00 UTC)"
    assert pacer.quota.resets_at() == "08:01:00 UTC"
    assert pacer.cause == "quota"
    assert changes[-1].cause == "quota"
    pacer.throttle(1.0)  # a call sent before the pause: nothing new
    assert pacer.quota.until == T0 + 60.0
    wait, held = pacer.reserve()
    assert (held, wait > 40) == (False, True)
    clock.now = T0 + 60.0
    assert pacer.reserve() == (0.0, True)  # the probe
    assert pacer.reserve() == (PROBE_POLL_S, False)  # the others wait for its answer
    pacer.accepted()
    assert waiting(pacer) is None
    assert pacer.reserve()[1] is True
    assert changes[-1].detail == "the quota probe was let through: calls go again"


def test_a_probe_given_back_or_lost_goes_again() -> None:
    """A probe's slot given back is due again; one never answered (its caller stopped) is
    handed to another caller after a minute."""
    clock = Clock(T0 + 10.0)
    pacer = limiter(clock, 100.0)
    pacer.throttle(20.0)
    clock.now = T0 + 30.0
    assert pacer.reserve()[1] is True
    pacer.release()
    assert pacer.reserve()[1] is True
    assert pacer.reserve()[1] is False
    clock.now += 61.0
    assert pacer.reserve()[1] is True


def test_unstated_quota_waits_go_to_the_minute_then_hour_then_day() -> None:
    """Without a stated end, the wait goes to the next UTC minute; a refused probe, to the
    hour; refused again, to the day: longer than an hour in all, which ends the segment."""
    clock = Clock(T0 + 3600 * 3 + 60 * 7 + 20.0)  # 11:07:20 UTC
    pacer = limiter(clock, 100.0)
    for _ in range(3):
        pacer.throttle(None)
        clock.now += 1.5
    pause = pacer.quota
    assert pause is not None
    assert pause.until == T0 + 3600 * 3 + 60 * 8
    assert not pause.stated
    assert pause.resets_at() == "11:08:00 UTC at the earliest (a guess: the gateway did not say)"
    clock.now = pause.until
    assert pacer.reserve()[1] is False  # a second after the boundary: clocks differ
    clock.now += 1.0
    assert pacer.reserve()[1] is True
    pacer.throttle(None)
    assert pacer.quota is not None
    assert pacer.quota.until == T0 + 3600 * 4
    assert too_long(pacer.quota, None, 10.0) is None
    clock.now = pacer.quota.until + 1.0
    assert pacer.reserve()[1] is True
    pacer.throttle(1.0)  # a short Retry-After from the probe says no more than none
    assert pacer.quota is not None
    assert pacer.quota.until == T0 + 16 * 3600  # the next 00:00 UTC
    stop = too_long(pacer.quota, None, 10.0)
    assert stop is not None
    assert "resets at 2027-01-16 00:00:00 UTC at the earliest" in stop


def test_a_stated_spent_day_is_a_quota_pause_to_utc_midnight() -> None:
    """X-RateLimit-Remaining-Day: 0 stated at 08:00:10 UTC: every call waits for 00:00 UTC,
    which is over an hour away: the stop's message says when it resets."""
    clock = Clock(T0 + 10.0)
    pacer = limiter(clock, 100.0)
    headers = {"X-RateLimit-Limit-Day": "20000", "X-RateLimit-Remaining-Day": "0"}
    stated = read_budget(headers, sent_at=clock.now - 0.01, now=clock.now)
    assert stated is not None
    pacer.budget(stated)
    pause = pacer.quota
    assert pause is not None
    assert pause.until == T0 + 16 * 3600
    assert pause.why == "the gateway's day: 0 of 20,000 left, resets in 57590 s"
    stop = too_long(pause, None, 10.0)
    assert stop == (
        "the gateway's quota is spent (the gateway's day: 0 of 20,000 left, resets in 57590 s) "
        "and resets at 2027-01-16 00:00:00 UTC; waiting for it would take over 1 h: stopped, "
        "no target failed for it; resume after that"
    )


def test_a_short_spent_window_holds_the_calls_without_a_quota_pause() -> None:
    """The second's budget spent 0.4 s before its end: every call waits for the next second;
    no quota pause (that is a window's edge)."""
    clock = Clock(T0 + 5.6)
    pacer = limiter(clock, 100.0)
    pacer.budget(Budget((Window("second", 0, 100, 0.4, 1.0),), clock.now))
    assert pacer.quota is None
    assert pacer.reserve()[0] == pytest.approx(0.2)  # asks again within the horizon of 6.0
    assert pacer.paused()


def test_quota_stops_past_the_deadline_and_after_an_hour() -> None:
    """A wait that ends after the deadline (less one attempt) does not fit; nor one that
    keeps going for over an hour in all."""
    pause = QuotaPause(until=T0 + 41, since=T0, why="x")
    assert too_long(pause, T0 + 60, 10.0) is None
    assert too_long(pause, T0 + 50, 10.0) is not None
    assert too_long(QuotaPause(T0 + QUOTA_STOP_S + 1, T0, "x"), None, 10.0) is not None
