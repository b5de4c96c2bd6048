"""The limiter's recent past: requests, answers and accepted answers in buckets of TICK_S over
the last WINDOW_S, rolled over as time passes. The overload rule (SRE client-side throttling)
and rate: auto's knee read it."""

from __future__ import annotations

TICK_S = 0.25  # accounting buckets
WINDOW_S = 5.0  # the overload window (SRE: requests vs accepts)
KNEE_S = 1.0  # the knee: answers in the last second before a 429
BUCKETS = int(WINDOW_S / TICK_S)
KNEE_BUCKETS = int(KNEE_S / TICK_S)
OVERLOAD_K = 2.0
OVERLOAD_MIN_REQUESTS = 20  # fewer requests in the window say nothing


class RecentAnswers:
    """Counts by bucket; a roll to a new bucket clears the ones passed over."""

    __slots__ = ("accepted", "answered", "requests", "tick")

    def __init__(self, now: float) -> None:
        self.tick = int(now / TICK_S)
        self.answered = [0] * BUCKETS  # not 429
        self.accepted = [0] * BUCKETS  # not failed
        self.requests = [0] * BUCKETS

    def roll(self, now: float) -> bool:
        """Move to the bucket of `now`; True when it is a new one (the caller judges the last
        window then)."""
        tick = int(now / TICK_S)
        if tick == self.tick:
            return False
        for passed in range(self.tick + 1, min(tick, self.tick + BUCKETS) + 1):
            index = passed % BUCKETS
            self.requests[index] = self.answered[index] = self.accepted[index] = 0
        self.tick = tick
        return True

    def count(self, *, accepted: bool) -> None:
        """One request answered (accepted: a usable answer) in the current bucket."""
        index = self.tick % BUCKETS
        self.requests[index] += 1
        self.answered[index] += 1
        self.accepted[index] += accepted

    def knee(self) -> float:
        """Answers in the last KNEE_S of full buckets: what the gateway took before a 429."""
        return float(
            sum(self.answered[(self.tick - back) % BUCKETS] for back in range(1, KNEE_BUCKETS + 1))
        )

    def window(self) -> tuple[int, int]:
        """(requests, accepted answers) over the window."""
        return sum(self.requests), sum(self.accepted)

    def overload(self, floor: float) -> tuple[float, str] | None:
        """SRE client-side throttling (K = OVERLOAD_K): while requests > K x accepted answers
        over the window, the rate is capped at K x the accepted rate (never below `floor`):
        (the cap, why); None when the answers are back."""
        requests, accepts = self.window()
        if requests < OVERLOAD_MIN_REQUESTS or requests <= OVERLOAD_K * accepts:
            return None
        window = WINDOW_S - TICK_S  # the current bucket has only begun
        why = (
            f"{requests - accepts} of {requests} requests failed in {WINDOW_S:g} s; "
            f"capped at {OVERLOAD_K:g}x the accepted rate"
        )
        return max(floor, OVERLOAD_K * accepts / window), why
