"""The run's shared rate limiter: exact pacing, no start-up burst, 429s slow everyone down.

Slots are handed out by virtual scheduling (GCRA): each caller reserves the next free instant and
sleeps until it, so the rate holds however many tasks wait, with no lock and no polling. It starts
empty: the first second of a run sends `rate` requests, not twice that (aiolimiter's default
does).

A caller reserves a slot at most HORIZON_S ahead; further back in the queue it waits and asks
again, so a change of rate takes effect within HORIZON_S, not after the queue has drained.

The rate follows AIMD around a knee: the accepted rate (clean answers) in the second before
the gateway pushed back. A throttle (HTTP 429) pauses every caller until Retry-After has
passed and, like a 503, sets the rate to 80 % of the knee. Clean answers bring it back to 90 %
of the knee quickly (10 % of the knee per second), then probe above it slowly (1 % per second),
so the run spends its time just under the gateway's limit and meets a 429 rarely. A fixed rate
is its own ceiling: it is only lowered for a while. An adaptive rate (``rate: auto``) starts at
a floor and doubles about every second until the first cut (slow start).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

HORIZON_S = 0.2  # the furthest ahead a slot is reserved
CUT_FACTOR = 0.8
RECOVER_SHARE = 0.10  # per second, as a share of the knee, while below 90 % of it
PROBE_SHARE = 0.01  # per second, as a share of the knee, at or above 90 % of it
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
        clock: Callable[[], float] = time.monotonic,  # what anyio's asyncio clock reads
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._rate = rate
        self.ceiling = ceiling if adaptive else rate
        self.floor = min(floor, rate) if rate is not None else floor
        self._slow_start = adaptive
        self._knee = rate or 0.0  # the accepted rate when the gateway last pushed back
        self._clock = clock
        self._sleep = sleep
        self._next = clock()  # the earliest instant the next slot may be used
        self._paused_until = 0.0
        self._last_cut = float("-inf")
        self._ok_second, self._ok_count, self._ok_previous = 0, 0, 0
        self.throttles = 0

    @property
    def rate(self) -> float | None:
        """The current rate in requests per second (None: unlimited)."""
        return self._rate

    def _burst_window(self, rate: float) -> float:
        """How far behind schedule a slot may be used: 1/20 s of rate, at least one slot."""
        return max(1.0, rate / 20) / rate - 1.0 / rate

    def reserve(self) -> tuple[float, bool]:
        """Try to reserve the next slot: (seconds to wait, whether a slot is now held).

        The hot path: no coroutine, no lock. With a slot held, wait and go, unless
        :meth:`paused` says a throttle began meanwhile (then ask again). Without one, wait and
        ask again.
        """
        now = self._clock()
        rate = self._rate
        if rate is None:
            wait = self._paused_until - now
            return (wait, False) if wait > 0 else (0.0, True)
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
        second = int(now)
        if second == self._ok_second:
            accepted = self._ok_previous  # the last full second
        else:
            accepted = self._ok_count if second == self._ok_second + 1 else 0
        self._knee = min(self._rate, accepted) if accepted else self._rate
        self._rate = max(self.floor, self._knee * CUT_FACTOR)
        self._last_cut = now

    def accepted(self) -> None:
        """The gateway answered (a success or a target's own error)."""
        self.succeeded()

    def rejected(self) -> None:
        """A 5xx, a timeout, a dropped connection, a garbled answer."""

    def succeeded(self) -> None:
        """A clean answer: probe upward toward the ceiling."""
        rate = self._rate
        if rate is None:
            return
        second = int(self._clock())
        if second != self._ok_second:
            self._ok_previous = self._ok_count if second == self._ok_second + 1 else 0
            self._ok_second, self._ok_count = second, 0
        self._ok_count += 1
        if self.ceiling is not None and rate >= self.ceiling:
            return
        if self._slow_start:
            rate += SLOW_START_GAIN
        else:
            share = RECOVER_SHARE if rate < 0.9 * self._knee else PROBE_SHARE
            rate += max(1.0, self._knee * share) / rate
        self._rate = rate if self.ceiling is None else min(self.ceiling, rate)
