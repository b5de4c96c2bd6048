"""The rules that stop a whole run rather than fail one more target: an outage (transient
failures in a row, no answer between), a segment whose first answers all refuse its requests
alike, and the failure-ratio abort rule. Pure: the engine tells them of every answer and
result, and carries out the stop they return (None: go on).
"""

from __future__ import annotations

from collections.abc import Callable

from worker.core.ports import EngineSettings, Progress, StopReason
from worker.core.quota import too_long
from worker.core.ratelimit import RateLimiter
from worker.errors import EnOSError, QuotaPausedError, RateLimitedError, RetryableError, TargetError
from worker.model import Outcome

Stop = tuple[StopReason, str]
REFUSALS_TO_STOP = 20  # a segment's first answers, all one HTTP 4xx: the run's fault


class StopRules:
    """An outage, not bad luck: this many transient failures in a row, with no answer in
    between, stop the run before the outage marks many targets `failed`.

    A run's own fault, not its targets': when a segment's first 20 answers all refuse its
    requests with one HTTP 4xx of the gateway's own (not 429, which is flow control, nor an
    EnOS code in an HTTP 200 such as 99400/99404, which is about one target), with no success
    between, every call is being refused for something they all share (an access token the
    gateway cannot take, a proxy, the wrong --gateway), and the run stops (exit 3) before the
    fleet is failed one by one. Until the rule is settled, such a refusal is held: handed back
    as a retryable error (it took no effect), so its target waits for another attempt instead of
    failing; if the run stops, the targets are left to resume, and if a success comes first
    the rule is off for the segment and the next refusal fails its target. (A request the HTTP
    library refuses to build needs no count: the client makes it fatal at the first.)
    """

    __slots__ = ("_abort", "_failures_in_a_row", "_outage_after", "_refusals", "_refused_as")

    def __init__(self, settings: EngineSettings) -> None:
        attempts = settings.policy.attempts
        self._outage_after = max(10, min(256, settings.concurrency * (attempts - 1)))
        self._failures_in_a_row = 0
        self._abort = settings.abort
        self._refusals = 0  # -1: settled, a success or another answer came first
        self._refused_as: int | None = None  # the HTTP status every refusal so far had

    def answered(self) -> None:
        """The gateway answered with a success: it is up, and takes this run's requests."""
        self._failures_in_a_row = 0
        self._refusals = -1

    def refused(self, error: EnOSError) -> tuple[EnOSError, Stop | None]:
        """The gateway answered with an error (a target's own, or an HTTP 4xx of its own):
        it is up. Returns the error to decide the target with (a held refusal becomes
        retryable) and the stop, when this refusal is the one that settles the rule."""
        self._failures_in_a_row = 0
        status = error.http_status
        alike = self._refused_as is None or status == self._refused_as
        if self._refusals < 0 or not alike or not _gateway_refusal(error):
            self._refusals = -1  # settled: from now on a refusal is its target's
            return error, None
        self._refusals += 1
        self._refused_as = status
        held = RetryableError(
            f"{error} (held: the run's first answers are all this refusal)",
            maybe_applied=False,
            http_status=status,
            request_id=error.request_id,
        )
        if self._refusals < REFUSALS_TO_STOP:
            return held, None
        return held, (
            StopReason.FATAL,
            f"the first {self._refusals} answers of this run all refused its requests with HTTP "
            f"{status} ({error}), and none succeeded: the requests themselves are refused (an "
            "access token the gateway cannot take, a proxy in between, the wrong --gateway), "
            "not the targets; stopped before every target fails alike. Check what answers at "
            "--gateway, then resume (refused calls took no effect)",
        )

    def transient(self, error: RetryableError) -> Stop | None:
        """A 5xx, a timeout, a dropped connection, a garbled answer."""
        self._failures_in_a_row += 1
        if self._failures_in_a_row < self._outage_after:
            return None
        return (
            StopReason.FATAL,
            f"the gateway failed {self._failures_in_a_row} requests in a row (last: {error}); "
            "stopped before an outage marks targets failed; resume with --retry-failed when "
            "it answers again",
        )

    def finished(self, progress: Progress) -> Stop | None:
        """A target reached its result: the abort rule, over the finished targets."""
        ratio, finished = self._abort.failure_ratio, progress.finished
        if ratio is None or finished < self._abort.min_finished:
            return None
        failed = progress.outcomes[Outcome.FAILED]
        if failed / finished < ratio:
            return None
        return (
            StopReason.ABORTED,
            f"{failed} of {finished} finished targets failed ({failed / finished:.0%}), "
            f"at or above abort.failure_ratio {ratio:g}",
        )


def _gateway_refusal(error: EnOSError) -> bool:
    """An HTTP 4xx from the gateway itself (no EnOS code): not 429 (flow control, a
    RetryableError), not 401/403/404 (fatal already), not 99400/99404 (in an HTTP 200)."""
    status = error.http_status
    if type(error) is not TargetError or error.code is not None or status is None:
        return False
    return 400 <= status < 500


def heard(limiter: RateLimiter, error: EnOSError) -> None:
    """What the shared limiter learns from a failed call: a 429 pauses everyone, a 5xx or a
    timeout counts against the rate only when such answers dominate, any other answer says
    the gateway is up."""
    if isinstance(error, RateLimitedError):
        limiter.throttle(error.retry_after)
    elif isinstance(error, RetryableError):
        limiter.rejected()
    else:
        limiter.accepted()


class QuotaWatch:
    """The engine's side of a spent quota: a 429 met while the run waits for it becomes the
    run's wait (the target waits as long, none of its throttles used), and a wait that does
    not fit the run (past the deadline, or over an hour) ends the segment: StopReason.QUOTA,
    with the time the quota resets."""

    def __init__(
        self,
        limiter: RateLimiter,
        settings: EngineSettings,
        clock: Callable[[], float],
        stop: Callable[[StopReason, str], None],
    ) -> None:
        self._limiter = limiter
        self._settings = settings
        self._clock = clock
        self._stop = stop
        self.reset_at: float | None = None  # epoch s, when the run stopped for its quota

    def heard(self, error: EnOSError, in_flight: int) -> EnOSError:
        """A failed call, as the limiter hears it (see `heard`); a 429 with the quota in mind
        (see `throttled`)."""
        if isinstance(error, RateLimitedError):
            return self.throttled(error, in_flight)
        heard(self._limiter, error)
        return error

    def throttled(self, error: RateLimitedError, in_flight: int) -> RateLimitedError:
        """A 429: the limiter pauses everyone; met during a quota wait, it is the run's."""
        stated, wait = error.budget, error.retry_after
        if stated is not None and stated.retry_after_s is not None:
            wait = stated.retry_after_s  # uncapped: a day's Retry-After says "quota", not 300 s
        self._limiter.throttle(wait)
        if stated is not None:
            self._limiter.budget(stated, in_flight)
        pause = self._limiter.quota
        if pause is None:
            return error
        self.check()
        why = f"the run waits for the gateway's quota until {pause.resets_at()}"
        return QuotaPausedError.during(error, max(0.0, pause.until - self._clock()), why)

    def check(self) -> None:
        """End the segment (resumable) when waiting for the quota does not fit the run."""
        pause = self._limiter.quota
        if pause is None:
            return
        settings = self._settings
        why = too_long(pause, settings.deadline_at, settings.attempt_timeout)
        if why is not None and self.reset_at is None:
            self.reset_at = pause.until
            self._stop(StopReason.QUOTA, why)
