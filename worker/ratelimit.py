"""The run's shared rate limiter: exact pacing, no start-up burst, 429s slow everyone down.

Slots are handed out by virtual scheduling (GCRA): each caller reserves the next free instant and
sleeps until it, so the rate holds however many tasks wait, with no lock and no polling. It starts
empty: the first second of a run sends `rate` requests, not twice that (aiolimiter's default
does).

The rate follows AIMD. A throttle (HTTP 429) pauses every caller until Retry-After has passed
and, like a 503, cuts the rate to 70 %; clean answers raise it again by 5 % of the cut rate per
second, up to the ceiling. A fixed rate is its own ceiling, so it is only ever lowered for a
while. An adaptive rate (``rate: auto``) starts at a floor and doubles about every second until
the first cut (slow start), then probes upward additively.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio

CUT_FACTOR = 0.7
PROBE_SHARE = 0.05  # additive increase per second, as a share of the rate after the last cut
SLOW_START_GAIN = 0.7  # per clean answer; the rate grows by 70 % of itself per second (x2 in ~1 s)


class RateLimiter:
    """Pace business calls at `rate` per second (None: unlimited), shared by all tasks."""

    def __init__(
        self,
        rate: float | None,
        *,
        adaptive: bool = False,
        ceiling: float | None = None,
        floor: float = 1.0,
        clock: Callable[[], float] = anyio.current_time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._rate = rate
        self.ceiling = ceiling if adaptive else rate
        self.floor = min(floor, rate) if rate is not None else floor
        self._slow_start = adaptive
        self._step = max(1.0, (rate or 0.0) * PROBE_SHARE)
        self._clock = clock
        self._sleep = sleep
        self._next = clock()  # the earliest instant the next slot may be used
        self._paused_until = 0.0
        self._last_cut = float("-inf")
        self.throttles = 0

    @property
    def rate(self) -> float | None:
        """The current rate in requests per second (None: unlimited)."""
        return self._rate

    def _burst_window(self, rate: float) -> float:
        """How far behind schedule a slot may be used: 1/20 s of rate, at least one slot."""
        return max(1.0, rate / 20) / rate - 1.0 / rate

    def reserve(self) -> float:
        """Reserve the next slot; returns the seconds until it (0: go now).

        The hot path: no coroutine, no lock. After waiting, call :meth:`recheck`.
        """
        now = self._clock()
        rate = self._rate
        if rate is None:
            return max(0.0, self._paused_until - now)
        slot = max(self._next, now - self._burst_window(rate), self._paused_until)
        self._next = slot + 1.0 / rate
        return max(0.0, slot - now)

    def recheck(self) -> float:
        """After waiting for a slot: 0 to go, or the wait for a new slot if a pause began."""
        if self._paused_until > self._clock():
            return self.reserve()
        return 0.0

    async def acquire(self) -> None:
        """Wait for this caller's slot (the simple form of reserve/recheck)."""
        delay = self.reserve()
        while delay > 0:
            await self._sleep(delay)
            delay = self.recheck()

    def throttle(self, retry_after: float | None) -> None:
        """The gateway said 429: pause everyone (Retry-After, else 1 s) and cut the rate."""
        self.throttles += 1
        pause = retry_after if retry_after is not None else 1.0
        self._paused_until = max(self._paused_until, self._clock() + pause)
        self._next = max(self._next, self._paused_until)
        self._cut(max(pause, 1.0))

    def slow_down(self) -> None:
        """The gateway is overloaded (503): cut the rate without pausing."""
        self._cut(1.0)

    def _cut(self, quiet_s: float) -> None:
        """Cut once per `quiet_s`: a burst of 429s from one window is one signal, not fifty."""
        now = self._clock()
        if self._rate is None or now - self._last_cut < quiet_s:
            return
        self._slow_start = False
        self._rate = max(self.floor, self._rate * CUT_FACTOR)
        self._step = max(1.0, self._rate * PROBE_SHARE)
        self._last_cut = now

    def succeeded(self) -> None:
        """A clean answer: probe upward toward the ceiling."""
        rate = self._rate
        if rate is None or (self.ceiling is not None and rate >= self.ceiling):
            return
        rate += SLOW_START_GAIN if self._slow_start else self._step / rate
        self._rate = rate if self.ceiling is None else min(self.ceiling, rate)
