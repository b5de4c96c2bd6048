"""The retry policy as pure functions: what an error means for its target, and how long to wait.

No I/O and no clock: the engine calls :meth:`RetryPolicy.decide` only after a failure, so a run
where nothing fails pays nothing for retrying.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from enum import StrEnum

from worker.errors import (
    EnOSError,
    FatalError,
    QuotaPausedError,
    RateLimitedError,
    RetryableError,
)


class Verdict(StrEnum):
    """What happens after a failed attempt."""

    RETRY = "retry"  # wait (backoff), then try again: uses up an attempt
    THROTTLED = "throttled"  # 429: the shared limiter pauses; does not use up an attempt
    FAILED = "failed"  # final for this target
    FATAL = "fatal"  # stop the run


@dataclass(frozen=True, slots=True)
class Decision:
    """A verdict and, for a retry, the seconds to wait first (None: the limiter decides)."""

    verdict: Verdict
    wait_s: float | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and by a cap on 429s."""

    attempts: int = 5
    max_throttles: int = 20
    base_s: float = 0.5
    cap_s: float = 30.0

    def backoff(self, failures: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(failures-1))]."""
        return rng.uniform(0.0, min(self.cap_s, self.base_s * 2 ** (failures - 1)))

    def decide(
        self, error: EnOSError, *, failures: int, throttles: int, rng: random.Random
    ) -> Decision:
        """The decision after `error`; `failures` counts attempts used, `throttles` the 429s."""
        if isinstance(error, FatalError):
            return Decision(Verdict.FATAL)
        if isinstance(error, QuotaPausedError):  # the run's wait for its quota, not the target's
            return Decision(Verdict.THROTTLED, error.retry_after)
        if isinstance(error, RateLimitedError):
            if throttles >= self.max_throttles:
                return Decision(Verdict.FAILED)
            return Decision(Verdict.THROTTLED, error.retry_after)
        if isinstance(error, RetryableError) and failures < self.attempts:
            return Decision(Verdict.RETRY, self.backoff(failures, rng))
        return Decision(Verdict.FAILED)


class Retrying:
    """Counts one operation's failures and 429s and asks the policy what they mean.

    The one retry path: the token proof before a run, cancels, verification Gets and dry-run
    searches all decide through it.
    """

    __slots__ = ("failures", "policy", "throttles")

    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.failures = 0
        self.throttles = 0

    def failed(self, error: EnOSError, rng: random.Random) -> Decision:
        """Count `error` and return the policy's decision for it."""
        if isinstance(error, QuotaPausedError):  # the run waits for its quota: not counted
            return self.policy.decide(error, failures=self.failures, throttles=0, rng=rng)
        if isinstance(error, RateLimitedError):
            self.throttles += 1
            return self.policy.decide(
                error, failures=self.failures, throttles=self.throttles - 1, rng=rng
            )
        self.failures += 1
        return self.policy.decide(error, failures=self.failures, throttles=self.throttles, rng=rng)
