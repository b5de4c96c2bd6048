"""The rules that stop a whole run rather than fail one more target: an outage (transient
failures in a row, no answer between) and the failure-ratio abort rule. Pure: the engine tells
them of every answer and result, and carries out the stop they return (None: go on).
"""

from __future__ import annotations

from worker.core.ports import EngineSettings, Progress, StopReason
from worker.errors import RetryableError
from worker.model import Outcome

Stop = tuple[StopReason, str]


class StopRules:
    """An outage, not bad luck: this many transient failures in a row, with no answer in
    between, stop the run before the outage marks many targets `failed`."""

    __slots__ = ("_abort", "_failures_in_a_row", "_outage_after")

    def __init__(self, settings: EngineSettings) -> None:
        attempts = settings.policy.attempts
        self._outage_after = max(10, min(256, settings.concurrency * (attempts - 1)))
        self._failures_in_a_row = 0
        self._abort = settings.abort

    def answered(self) -> None:
        """The gateway answered (a success, or a target's own error): it is up."""
        self._failures_in_a_row = 0

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
