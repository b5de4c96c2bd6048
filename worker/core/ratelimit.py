"""The run's shared rate limiter: exact pacing, no start-up burst, cut only by real push-back.

Slots are handed out by virtual scheduling (GCRA): each caller reserves the next free instant and
sleeps until it, so the rate holds however many tasks wait, with no lock and no polling. It starts
empty: the first second of a run sends `rate` requests, not twice that (aiolimiter's default
does). A caller reserves a slot at most HORIZON_S ahead; further back in the queue it waits and
asks again, so a change of rate takes effect within HORIZON_S.

What moves the rate, and nothing else:

- **HTTP 429** (explicit throttling) pauses every caller until Retry-After has passed. A fixed
  rate is then cut to half and ramps back linearly to the asked rate over RECOVERY_S after the
  pause, so one 429 costs seconds, not the rest of the run. ``rate: auto`` takes the knee (every
  answer that was not a 429 in the last second) and settles at 90 % of it, then probes upward
  by 1 % of the knee per second.
- **Overload**: random 5xx, timeouts and dropped connections are retried, and do not touch the
  rate unless they dominate. As in Google SRE's client-side adaptive throttling (K = 2): over the
  last WINDOW_S, when requests > K x accepted answers, the rate is capped at K x the accepted
  rate; the cap lifts as soon as accepted answers are back above 1/K of the requests.
- ``rate: auto`` starts at a floor and grows by 70 % of itself per second (slow start) until
  the first 429.

Every change of cause is reported through `on_change` (the runner logs it) and shown by
:attr:`RateLimiter.cause`; the ramp and the probe themselves are not logged step by step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

HORIZON_S = 0.2  # the furthest ahead a slot is reserved
TICK_S = 0.25  # accounting buckets
WINDOW_S = 5.0  # the overload window (SRE: requests vs accepts)
KNEE_S = 1.0  # the knee: answers in the last second before a 429
OVERLOAD_K = 2.0
OVERLOAD_MIN_REQUESTS = 20  # fewer requests in the window say nothing
RECOVERY_S = 2.0  # a fixed rate's ramp back after a 429 pause
THROTTLE_CUT = 0.5  # a fixed rate's share right after a 429 pause
AUTO_SETTLE = 0.9  # rate: auto settles at this share of the knee
PROBE_SHARE = 0.01  # per second, as a share of the knee
SLOW_START_GAIN = 0.7  # per accepted answer: the rate grows by 70 % of itself per second
HELD_POLL_S = 0.25  # while paused by an operator, callers ask again this often
PAUSED = "paused by operator"
_BUCKETS = int(WINDOW_S / TICK_S)
_KNEE_BUCKETS = int(KNEE_S / TICK_S)


@dataclass(frozen=True, slots=True)
class RateChange:
    """A decision about the rate: from, to (requests/s, None = unlimited), and why."""

    before: float | None
    after: float | None
    cause: str
    detail: str


class RateLimiter:
    """Pace business calls at `rate` per second (None: unlimited), shared by all tasks."""

    def __init__(
        self,
        rate: float | None,
        *,
        adaptive: bool = False,
        ceiling: float | None = None,
        floor: float = 1.0,
        clock: Callable[[], float] = time.monotonic,  # what anyio's asyncio clock reads
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        on_change: Callable[[RateChange], None] | None = None,
    ) -> None:
        self.adaptive = adaptive
        self.asked = ceiling if adaptive else rate  # the most this run may send (None: no bound)
        self.floor = min(floor, rate) if rate is not None else floor
        self._base = rate  # fixed: the asked rate; auto: where the AIMD stands
        self._slow_start = adaptive
        self._knee = rate or 0.0
        self._clock = clock
        self._sleep = sleep
        self._on_change = on_change
        now = clock()
        self._next = now  # the earliest instant the next slot may be used
        self._idle = True  # no slot reserved yet
        self._paused_until = 0.0
        self._last_cut = float("-inf")
        self._ramp_from: float | None = None  # fixed rate: the ramp back starts here
        self._overload_cap: float | None = None
        # Accounting buckets of TICK_S: requests answered (not 429) and accepted (not failed).
        self._tick = int(now / TICK_S)
        self._answered = [0] * _BUCKETS
        self._accepted = [0] * _BUCKETS
        self._requests = [0] * _BUCKETS
        self.cause = "slow start" if adaptive else "asked"
        self._rate = self._effective()
        self.throttles = 0
        self.held = False  # paused by an operator (worker ctl): no slot is handed out
        self.budget: float | None = None  # the gateway's stated budget (requests/s), if known

    @property
    def rate(self) -> float | None:
        """The rate allowed now, in requests per second (None: unlimited)."""
        return self._rate

    # -- the hot path ---------------------------------------------------------------------------

    def _burst_window(self, rate: float) -> float:
        """How far behind schedule a slot may be used: 1/20 s of rate, at least one slot."""
        return max(1.0, rate / 20) / rate - 1.0 / rate

    def reserve(self) -> tuple[float, bool]:
        """Try to reserve the next slot: (seconds to wait, whether a slot is now held).

        No coroutine, no lock. With a slot held, wait and go, unless :meth:`paused` says a
        throttle began meanwhile (then ask again). Without one, wait and ask again.
        """
        if self.held:
            return HELD_POLL_S, False
        now = self._clock()
        if self._ramp_from is not None:
            self._ramp(now)
        rate = self._rate
        if rate is None:
            wait = self._paused_until - now
            return (wait, False) if wait > 0 else (0.0, True)
        if self._idle:  # the first slot: no catching up on a schedule that never ran
            self._idle, self._next = False, max(self._next, now)
        slot = max(self._next, now - self._burst_window(rate), self._paused_until)
        if slot - now > HORIZON_S:
            return max(0.001, slot - now - HORIZON_S), False
        self._next = slot + 1.0 / rate
        return max(0.0, slot - now), True

    def release(self) -> None:
        """Give back the slot just reserved (its caller will not use it now)."""
        if self._rate is not None:
            self._next -= 1.0 / self._rate

    def paused(self) -> bool:
        """Whether a throttle pause is in force now."""
        return self._paused_until > self._clock()

    async def acquire(self) -> None:
        """Wait for this caller's slot (what the engine does, without its stop handling)."""
        while True:
            wait, held = self.reserve()
            if wait > 0:
                await self._sleep(wait)
            if held and not self.paused():
                return

    # -- what the gateway answered --------------------------------------------------------------

    def accepted(self) -> None:
        """A usable answer: a success, or a target's own error (the gateway is fine)."""
        index = self._count()
        self._answered[index] += 1
        self._accepted[index] += 1
        if self.adaptive and self._base is not None:
            self._probe()

    def rejected(self) -> None:
        """A 5xx, a timeout, a dropped connection, a garbled answer: retried, and counted
        against the rate only when such answers dominate."""
        self._answered[self._count()] += 1

    def throttle(self, retry_after: float | None) -> None:
        """The gateway said 429: pause everyone (Retry-After, else 1 s) and cut the rate."""
        self.throttles += 1
        now = self._clock()
        if int(now / TICK_S) != self._tick:
            self._roll(int(now / TICK_S))  # a 429 is not a request for the overload rule
        pause = retry_after if retry_after is not None else 1.0
        self._paused_until = max(self._paused_until, now + pause)
        self._next = max(self._next, self._paused_until)
        if now - self._last_cut < max(pause, 1.0):
            return  # a burst of 429s from one window is one signal, not fifty
        self._last_cut = now
        detail = f"HTTP 429, Retry-After {pause:g} s"
        if self.adaptive:
            self._slow_start = False
            self._knee = max(self.floor, float(sum(self._recent(self._answered, _KNEE_BUCKETS))))
            base = self._base if self._base is not None else self._knee
            self._base = max(self.floor, AUTO_SETTLE * min(base, self._knee))
            self._change("throttled", f"{detail}; knee {self._knee:.0f}/s")
        elif self.asked is not None:
            self._ramp_from = self._paused_until
            self._base = max(self.floor, THROTTLE_CUT * self.asked)
            self._change("throttled", f"{detail}; back to {self.asked:g}/s in {RECOVERY_S:g} s")
        else:
            self._change("throttled", detail)

    # -- an operator's hand (worker ctl) --------------------------------------------------------

    def hold(self, held: bool) -> None:
        """Pause (True) or resume every caller: while held no slot is handed out (requests in
        flight finish); on resuming the schedule starts afresh, without a catch-up burst."""
        self.held = held
        self._idle = True
        steady = "overload" if self._overload_cap is not None else self._steady_cause()
        self.cause = PAUSED if held else steady

    def set_rate(self, rate: float | None) -> float | None:
        """An operator's rate (None: unlimited), fixed from now on (rate: auto stops probing),
        capped at the gateway's stated budget when known; returns the rate set."""
        if rate is not None and self.budget is not None:
            rate = min(rate, self.budget)
        self.adaptive = self._slow_start = False
        self.asked = self._base = rate
        if rate is not None:
            self.floor = min(self.floor, rate)
        self._ramp_from = None
        self._change("asked", f"set to {_per_s(rate)} by an operator")
        return rate

    # -- accounting -----------------------------------------------------------------------------

    def _count(self) -> int:
        """Count one request in the current bucket (rolling buckets over); returns its index."""
        now = self._clock()
        tick = int(now / TICK_S)
        if tick != self._tick:
            self._roll(tick)
        index = tick % _BUCKETS
        self._requests[index] += 1
        return index

    def _roll(self, tick: int) -> None:
        """New buckets: clear those passed over, then judge the last window for overload."""
        for passed in range(self._tick + 1, min(tick, self._tick + _BUCKETS) + 1):
            index = passed % _BUCKETS
            self._requests[index] = self._answered[index] = self._accepted[index] = 0
        self._tick = tick
        self._judge_overload()

    def _recent(self, buckets: list[int], count: int) -> list[int]:
        """The last `count` full buckets before the current one."""
        return [buckets[(self._tick - back) % _BUCKETS] for back in range(1, count + 1)]

    def _judge_overload(self) -> None:
        """SRE client-side throttling: cap at K x accepts while requests > K x accepts."""
        requests = sum(self._requests)
        accepts = sum(self._accepted)
        window = WINDOW_S - TICK_S  # the current bucket has only begun
        if requests >= OVERLOAD_MIN_REQUESTS and requests > OVERLOAD_K * accepts:
            cap = max(self.floor, OVERLOAD_K * accepts / window)
            if self._overload_cap is None or abs(cap - self._overload_cap) > 0.1 * cap:
                self._overload_cap = cap
                detail = (
                    f"{requests - accepts} of {requests} requests failed in {WINDOW_S:g} s; "
                    f"capped at {OVERLOAD_K:g}x the accepted rate"
                )
                self._change("overload", detail)
        elif self._overload_cap is not None:
            self._overload_cap = None
            self._change(self._steady_cause(), "answers are back: the overload cap is lifted")

    # -- the rate -------------------------------------------------------------------------------

    def _ramp(self, now: float) -> None:
        """A fixed rate after a 429: linear from the cut back to the asked rate."""
        assert self._ramp_from is not None
        assert self.asked is not None
        share = (now - self._ramp_from) / RECOVERY_S
        if share >= 1.0:
            self._ramp_from = None
            self._base = self.asked
            self._change(self._steady_cause(), "recovered from the 429")
            return
        if share > 0:
            cut = THROTTLE_CUT * self.asked
            self._base = max(self.floor, cut + (self.asked - cut) * share)
            self._rate = self._effective()

    def _probe(self) -> None:
        """rate: auto, per accepted answer: slow start, else probe 1 % of the knee a second."""
        rate = self._base
        assert rate is not None
        if self.asked is not None and rate >= self.asked:
            return
        rate += SLOW_START_GAIN if self._slow_start else max(1.0, self._knee * PROBE_SHARE) / rate
        self._base = rate if self.asked is None else min(self.asked, rate)
        if self._overload_cap is None:
            self._rate = self._base
        else:
            self._rate = self._effective()

    def _effective(self) -> float | None:
        if self._overload_cap is None:
            return self._base
        if self._base is None:
            return self._overload_cap
        return min(self._base, self._overload_cap)

    def _steady_cause(self) -> str:
        if self._ramp_from is not None:
            return "throttled"
        if self.adaptive:
            return "slow start" if self._slow_start else "probing"
        return "asked"

    def _change(self, cause: str, detail: str) -> None:
        before, self._rate = self._rate, self._effective()
        if self._overload_cap is not None and cause != "overload":
            cause = "overload"
        self.cause = PAUSED if self.held else cause
        if self._on_change is not None:
            self._on_change(RateChange(before, self._rate, cause, detail))


def _per_s(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:g}/s"
