"""The run's shared rate limiter: exact pacing, no start-up burst, 429s slow everyone down.

Slots are handed out by virtual scheduling (GCRA): each caller reserves the next free instant and
sleeps until it, so the rate holds however many tasks wait, with no lock and no polling. It starts
empty: the first second of a run sends `rate` requests, not twice that (aiolimiter's default
does). A throttle (HTTP 429) pauses every caller until Retry-After has passed and cuts the
rate multiplicatively; clean answers raise it again additively, up to the ceiling (AIMD).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio


class RateLimiter:
    """Pace business calls at `rate` per second (None: unlimited), shared by all tasks."""

    def __init__(
        self,
        rate: float | None,
        *,
        ceiling: float | None = None,
        floor: float = 1.0,
        recovery_s: float = 20.0,
        clock: Callable[[], float] = anyio.current_time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
    ) -> None:
        self._rate = rate
        self.ceiling = ceiling if ceiling is not None else rate
        self.floor = min(floor, rate) if rate is not None else floor
        # Additive increase: regain the ceiling `recovery_s` seconds after a halving.
        self._step = (self.ceiling or 0.0) / (2 * recovery_s)
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

    def _burst_window(self) -> float:
        """How far behind schedule a slot may be used: 1/20 s of rate, at least one slot."""
        rate = self._rate or 1.0
        return max(1.0, rate / 20) / rate - 1.0 / rate

    async def acquire(self) -> None:
        """Wait for this caller's slot."""
        while True:
            now = self._clock()
            if self._paused_until > now:
                await self._sleep(self._paused_until - now)
                continue
            if self._rate is None:
                return
            interval = 1.0 / self._rate
            slot = max(self._next, now - self._burst_window())
            self._next = slot + interval
            if slot > now:
                await self._sleep(slot - now)
                if self._paused_until > self._clock():
                    continue  # a throttle arrived while we waited: queue behind it
            return

    def throttle(self, retry_after: float | None) -> None:
        """The gateway said 429: pause everyone, and cut the rate (once per pause)."""
        now = self._clock()
        self.throttles += 1
        pause = retry_after if retry_after is not None else 1.0
        self._paused_until = max(self._paused_until, now + pause)
        self._next = max(self._next, self._paused_until)
        if self._rate is not None and now - self._last_cut >= max(pause, 1.0):
            self._rate = max(self.floor, self._rate * 0.5)
            self._last_cut = now

    def succeeded(self) -> None:
        """A clean answer: creep back toward the ceiling (about `step` per second)."""
        rate, ceiling = self._rate, self.ceiling
        if rate is not None and ceiling is not None and rate < ceiling:
            self._rate = min(ceiling, rate + self._step / rate)
