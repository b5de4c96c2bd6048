"""Taking the shared limiter's slots for the engine's workers, and giving them up when the run
stops: a worker waiting for its slot is woken by a stop instead of sleeping it out."""

from __future__ import annotations

from collections.abc import Callable

import anyio

from worker.core.ratelimit import RateLimiter


class Pacer:
    """The engine's side of the limiter: slots now (no coroutine) or after a wait."""

    def __init__(self, limiter: RateLimiter, stopping: Callable[[], bool]) -> None:
        self._limiter = limiter
        self._stopping = stopping
        self._sleeping: set[anyio.CancelScope] = set()

    def wake(self) -> None:
        """The run stops: every worker waiting for a slot gives up now."""
        for scope in list(self._sleeping):
            scope.cancel()

    def slot_now(self) -> bool:
        """The hot path: a slot free right now, taken without a coroutine (False: go slow)."""
        if self._stopping():
            return False
        wait, held = self._limiter.reserve()
        if held and wait == 0:
            return True
        if held:
            self._limiter.release()  # give it back; slot() reserves it again and waits
        return False

    async def slot(self, before_waiting: Callable[[], None] | None = None) -> bool:
        """Wait for the shared limiter's next slot; False if the run stopped meanwhile.
        `before_waiting` may stop the run first (a quota wait that does not fit it)."""
        if before_waiting is not None:
            before_waiting()
        while True:
            wait, held = self._limiter.reserve()
            if wait > 0 and not await self._sleep_unless_stopped(wait):
                if held:
                    self._limiter.release()
                return False
            if held and (wait == 0 or not self._limiter.paused()):
                return not self._stopping()

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep unless a stop cuts it short; False if cut."""
        with anyio.CancelScope() as scope:
            self._sleeping.add(scope)
            try:
                if self._stopping():
                    scope.cancel()
                await anyio.sleep(seconds)
            finally:
                self._sleeping.discard(scope)
        return not scope.cancel_called and not self._stopping()
