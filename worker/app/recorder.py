"""The engine's Recorder for a run: every attempt to the audit log, every result to the journal,
both made durable in batches off the event loop; with ``--metrics-port``, counted too."""

from __future__ import annotations

from worker.app.metrics import RunMetrics
from worker.model import Attempt, TargetResult
from worker.store.admitted import AdmissionMark
from worker.store.audit import AuditLog
from worker.store.journal import ResultJournal


class RunRecorder:
    """Attempts to the audit log, results to the journal."""

    def __init__(self, audit: AuditLog, journal: ResultJournal, mark: AdmissionMark) -> None:
        self.audit = audit
        self.journal = journal
        self.mark = mark

    def attempt(self, attempt: Attempt, action: str) -> None:
        """One HTTP attempt: an audit record."""
        self.audit.attempt(attempt, action)

    def result(self, result: TargetResult) -> None:
        """One final result: a journal line."""
        self.journal.write(result)

    def metered(self, metrics: RunMetrics) -> RunRecorder:
        """The same recorder, also counting every record in `metrics`."""
        return MeteredRecorder(self.audit, self.journal, self.mark, metrics)

    def sync(self) -> None:
        """fdatasync everything written so far (off the event loop)."""
        self.journal.log.sync()
        self.audit.log.sync()
        self.mark.sync()


class MeteredRecorder(RunRecorder):
    """With --metrics-port: every record also moves the metrics (the plain recorder stays
    free of the check on the hot path)."""

    def __init__(
        self, audit: AuditLog, journal: ResultJournal, mark: AdmissionMark, metrics: RunMetrics
    ) -> None:
        super().__init__(audit, journal, mark)
        self.metrics = metrics

    def attempt(self, attempt: Attempt, action: str) -> None:
        """An audit record, counted."""
        self.audit.attempt(attempt, action)
        self.metrics.attempt(attempt, action)

    def result(self, result: TargetResult) -> None:
        """A journal line, counted."""
        self.journal.write(result)
        self.metrics.result(result)
