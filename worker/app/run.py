"""One segment of a run: open the run directory's records, prove the gateway, drive the engine
over the pending targets, and close the segment whatever ended it.

Whatever ends a segment (done, a fatal error, an abort rule, a signal, a deadline, a bug), the
files are closed completely and the summary is written, in synchronous code that no
cancellation can interrupt.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import TextIO

import structlog

from worker import __version__
from worker.app.beside import drive
from worker.app.conduct import Conductor
from worker.app.conducting import JobSlot
from worker.app.metrics import RunMetrics
from worker.app.query import needs_resolving, resolve_for_run
from worker.app.recorder import RunRecorder
from worker.app.wiring import RunOptions, build_engine, client_for
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.core.ratelimit import RateLimiter
from worker.errors import ExitCode, StoreError
from worker.jobs.plan import Plan, run_targets
from worker.model import Job, Target
from worker.report.console import render
from worker.report.details import load_run
from worker.report.hints import resume_command
from worker.report.html import write_report
from worker.report.summary import build_summary
from worker.store import checkpoint
from worker.store.admitted import AdmissionMark
from worker.store.appendlog import SyncedFile, WriteGuard, iso, repair_tail
from worker.store.audit import AuditLog, who_and_where
from worker.store.done import Finished
from worker.store.journal import ResultJournal
from worker.store.layout import read_verify_counts, write_manifest, write_summary
from worker.store.records import BatchingRecord, RunFinishedRecord, RunStartedRecord
from worker.store.state import Manifest, Segment, Summary
from worker.store.tally import Counts, JournalFold

log = structlog.get_logger("worker.run")


def exit_code_for(reason: StopReason, failed: int, not_attempted: int) -> int:
    """The contract's exit code for how a run ended."""
    if reason in (StopReason.FATAL, StopReason.ABORTED):
        return ExitCode.ABORTED
    if reason in (StopReason.INTERRUPTED, StopReason.DEADLINE, StopReason.QUOTA, StopReason.WINDOW):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILED if failed or not_attempted else ExitCode.OK


class RunControl:
    """For a caller that runs several jobs in one process (``worker watch``): it stops each
    run itself, so the run does not take the signals, and the runs may share one limiter."""

    def __init__(
        self,
        limiter: RateLimiter | None = None,
        metrics: RunMetrics | None = None,
        slot: JobSlot | None = None,
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics  # the caller's (served by it): this run's records count there
        self.slot = slot  # the caller's job slot, lent while the run waits (window, promotion)
        self.engine: Engine | None = None
        self._stop_why: str | None = None

    def attach(self, engine: Engine) -> None:
        """The run's engine exists: a stop asked before now takes effect at once."""
        self.engine = engine
        if self._stop_why is not None:
            engine.stop(StopReason.INTERRUPTED, self._stop_why)

    def stop(self, why: str) -> None:
        """As a first SIGTERM would: nothing new, requests in flight finish."""
        self._stop_why = why
        if self.engine is not None:
            self.engine.stop(StopReason.INTERRUPTED, why)

    def cancel(self) -> None:
        """As a second signal would: abandon the requests in flight."""
        if self.engine is not None:
            self.engine.cancel()


@dataclass(frozen=True)
class SegmentStart:
    """What a segment starts from: the job, its plan, the run so far."""

    job: Job
    plan: Plan
    manifest: Manifest
    finished: Finished  # what is final before this segment
    fold: JournalFold  # the journal's counts as read for `finished`; the end goes on from it


async def execute(
    start: SegmentStart,
    options: RunOptions,
    *,
    out: TextIO | None = None,
    control: RunControl | None = None,
    clock: Callable[[], float] = time.time,
) -> int:
    """Run the job's pending targets as one segment; returns the exit code. With `control`,
    the caller stops the run (no signal handling here) and may share its limiter. `clock`
    is what the job's window is read on (a test's own)."""
    manifest = start.manifest
    resuming = bool(manifest.segments)
    try:
        segment, recorder = _open_segment(start, options)
    except StoreError as error:  # nothing was sent in this segment
        (out or sys.stderr).write(f"worker: {error}\n")
        return ExitCode.ABORTED if resuming else ExitCode.USAGE
    mark = recorder.mark
    metrics = RunMetrics() if options.metrics is not None else None
    counting = metrics or (control.metrics if control is not None else None)
    if counting is not None:
        recorder = recorder.metered(counting)
    client = client_for(options)
    engine = build_engine(
        client,
        recorder,
        options,
        limiter=control.limiter if control is not None else None,
        abort=start.job.abort,
        admissions=mark,
        sent_before=_sent_before(mark, start.finished),
    )
    if control is not None:
        control.attach(engine)
    began = time.monotonic()
    conductor: Conductor | None = None
    try:
        segment_of = (start.job, start.plan, manifest, start.finished, start.fold)
        conductor = Conductor(
            segment_of,
            options,
            engine,
            client,
            recorder.audit,
            out=out,
            spooled=control is not None,
            clock=clock,
            slot=control.slot if control is not None else None,
            resolve=partial(
                resolve_for_run,
                start.job,
                start.plan,
                start.manifest,
                client=client,
                engine=engine,
                audit=recorder.audit,
                options=options,
                out=out,
            )
            if needs_resolving(start.job, start.manifest)
            else None,
        )
        problem = _serve_metrics(metrics, options, engine, start) if metrics else None
        if problem is not None:
            engine.stop(StopReason.FATAL, problem)
        else:
            await _drive_segment(engine, start, out, segment, conductor, control=control)
    except Exception as exc:  # a bug or an OS failure: end as a resumable stop, say why
        log.exception("worker.internal_error")
        engine.stop(StopReason.FATAL, f"internal error: {exc!r}; the run is resumable")
    finally:
        # Synchronous on purpose: no cancellation can interrupt closing the files. Time held
        # for a window, a promotion or a pause is not working time: not in the duration.
        held = conductor.held_s if conductor is not None else 0.0
        segment.duration_s = round(time.monotonic() - began - held, 3)
        summary, counts = _close_segment(engine, manifest, segment, recorder, start.fold)
        if conductor is not None:
            conductor.ended(summary)
        if metrics is not None:
            metrics.close()
    _tell(summary, start, options, out, audit_head=recorder.audit.head, counts=counts)
    return summary.exit_code


def _open_segment(start: SegmentStart, options: RunOptions) -> tuple[Segment, RunRecorder]:
    """A torn last line cut (a machine crash mid-write), the segment added to run.json, the
    records opened (never through a planted link), run_started written. StoreError when the
    run directory cannot take them (the files opened so far are closed again)."""
    run, manifest = options.run, start.manifest
    segment = Segment(started_at=iso(time.time()), limits=options.limits)
    guard = WriteGuard()
    opened: list[SyncedFile] = []
    try:
        repair_tail(run.results)
        repair_tail(run.audit)
        manifest.segments.append(segment)
        write_manifest(run, manifest)
        earlier = len(manifest.segments) > 1
        mark = AdmissionMark(
            run, ahead=options.limits.concurrency, earlier_segments=earlier, guard=guard
        )
        opened.append(mark)
        journal = ResultJournal(run, guard)
        opened.append(journal.log)
        audit = AuditLog(run, manifest.run_id, guard)
        opened.append(audit.log)
        audit.write(_run_started(start, options))
    except (StoreError, OSError) as error:
        for file in opened:
            file.close()
        raise error if isinstance(error, StoreError) else StoreError(run, str(error)) from None
    return segment, RunRecorder(audit, journal, mark)


def _tell(
    summary: Summary,
    start: SegmentStart,
    options: RunOptions,
    out: TextIO | None,
    *,
    audit_head: str,
    counts: Counts,
) -> None:
    """The summary for people, the report page, and how to continue when the run stopped."""
    run = options.run
    render(summary, run, out, audit_head=audit_head)
    _write_run_report(options, out, counts)
    if summary.exit_code in (ExitCode.ABORTED, ExitCode.INTERRUPTED):
        failed = summary.outcomes["failed"] > 0
        stream = out or sys.stdout
        command = resume_command(str(start.job.path), run, retry_failed=failed)
        when = ""
        if summary.quota_reset_at:  # the gateway's quota: nothing goes before it resets
            when = f" once the gateway's quota resets ({summary.quota_reset_at})"
        stream.write(f"\nTo continue this run{when}:\n  {command}\n")
        stream.flush()


async def _drive_segment(
    engine: Engine,
    start: SegmentStart,
    out: TextIO | None,
    segment: Segment,
    conductor: Conductor,
    *,
    control: RunControl | None,
) -> None:
    already = len(start.finished.done)
    await drive(
        engine,
        run_targets(start.job, start.plan, start.finished.done),
        total=start.plan.total,
        out=out,
        segment=segment,
        already=already,
        signals=control is None,
        progress=conductor.options.progress,
        earlier=start.fold.counts.outcomes,
        body=conductor.body,
        beside=conductor.helpers(),
    )


def _serve_metrics(
    metrics: RunMetrics, options: RunOptions, engine: Engine, start: SegmentStart
) -> str | None:
    """The gauges read from the engine, then the server; what stops it (a port taken)."""
    address = options.metrics
    assert address is not None
    progress, manifest, done = engine.progress, start.manifest, len(start.finished.done)
    metrics.gauge(
        "worker_requests_in_flight",
        "requests sent and not answered yet",
        lambda: progress.in_flight,
    )
    metrics.gauge(
        "worker_targets_waiting",
        "targets waiting out a retry's backoff",
        lambda: progress.waiting,
    )
    metrics.gauge(
        "worker_targets_pending",
        "targets of this segment without a final result",
        lambda: manifest.targets - done - progress.finished,  # a query's, once resolved
    )
    problem = metrics.serve(address, engine.limiter)
    return None if problem is None else f"{problem}; nothing was sent"


def _batching_record(engine: Engine, asked: int) -> BatchingRecord | None:
    plan = engine.batching
    if plan is None:
        return None
    return {
        "asked": asked,
        "size": plan.size,
        "trust": plan.trust.value,
        "lists": plan.lists,
        "notes": list(plan.notes),
    }


def _sent_before(mark: AdmissionMark, finished: Finished) -> Callable[[int, Target], bool] | None:
    """Whether an earlier segment may have sent a target (crash truth, design.md); None when
    no target can have been (a new run), so the hot path asks nothing."""
    retried = finished.retried_maybe_applied
    if not retried:
        if not mark.sent_before(0):
            return None
        return lambda ordinal, _: mark.sent_before(ordinal)
    return lambda ordinal, target: mark.sent_before(ordinal) or target.digest() in retried


def _close_segment(
    engine: Engine,
    manifest: Manifest,
    segment: Segment,
    recorder: RunRecorder,
    fold: JournalFold,
) -> tuple[Summary, Counts]:
    """Close the files, then write run.json, summary.json and run_finished for the whole run.

    When a record could not be written (a full disk), nothing more is written: the directory
    then reads as a segment that ended there (resumable, its audit whole), and the summary is
    only shown."""
    progress = engine.progress
    segment.requests, segment.abandoned = progress.requests, progress.abandoned
    segment.batching = _batching_record(engine, segment.limits.assets_per_call)
    stated, reset = engine.limiter.stated, engine.quota_reset_at
    segment.budget = stated.describe() if stated is not None else None
    segment.quota_reset_at = iso(reset) if reset is not None else None
    recorder.journal.log.close()
    recorder.mark.close()
    run, guard = recorder.audit.run, recorder.audit.log.guard
    counts = fold.read_rest(run)  # the summary and the report
    if guard.failed is None:
        try:
            checkpoint.write(run, fold)  # a cache: failing to write it loses nothing
        except StoreError as exc:
            log.warning("worker.checkpoint_not_written", why=str(exc))
    reason = engine.stop_reason
    failed = counts.outcomes.get("failed", 0)
    exit_code = exit_code_for(reason, failed, manifest.targets - counts.finished)
    segment.finished_at, segment.reason = iso(time.time()), reason.value
    segment.message, segment.exit_code = engine.stop_message, exit_code
    verify = read_verify_counts(run)
    summary = build_summary(manifest, counts, exit_code=exit_code, verify=verify)
    try:
        guard.check()
        write_manifest(run, manifest)
        write_summary(run, summary)
        recorder.audit.write(_run_finished(manifest, segment, summary))
    except StoreError as error:
        summary = _unwritten(summary, error)
    recorder.audit.log.close()
    log.info(
        "worker.run_finished",
        reason=summary.stopped,
        exit_code=int(summary.exit_code),
        why=summary.stop_message,
        throttled=engine.limiter.throttles,  # 429s met (one warning said the first)
    )
    return summary, counts


def _run_finished(manifest: Manifest, segment: Segment, summary: Summary) -> RunFinishedRecord:
    return {
        "type": "run_finished",
        "at": segment.finished_at or iso(time.time()),
        "segment": len(manifest.segments),
        "reason": segment.reason or "",
        "message": segment.message,
        "exit_code": summary.exit_code,
        "summary": summary.to_json(),
    }


def _unwritten(summary: Summary, error: StoreError) -> Summary:
    """The summary as shown when the run directory could not take it: a fatal stop, exit 3."""
    why = str(error)
    if summary.stopped == StopReason.FATAL and summary.stop_message:
        why = summary.stop_message
    return replace(
        summary,
        exit_code=ExitCode.ABORTED,
        stopped=StopReason.FATAL.value,
        stop_message=why,
        resumable=True,
    )


def _run_started(start: SegmentStart, options: RunOptions) -> RunStartedRecord:
    job, plan, manifest = start.job, start.plan, start.manifest
    who = who_and_where()
    return {
        "type": "run_started",
        "at": iso(time.time()),
        "run_id": manifest.run_id,
        "segment": len(manifest.segments),
        "worker_version": __version__,
        "operator": who.operator,
        "host": who.host,
        "pid": who.pid,
        "argv": who.argv,
        "job": str(job.path),
        "job_name": job.name,
        "job_sha256": job.sha256,
        "targets_sha256": plan.targets_sha256,
        "targets": plan.total,
        "duplicates_dropped": plan.listed - plan.total,
        "gateway": options.gateway,
        "limits": asdict(options.limits),
        "abort": asdict(job.abort),
        "resume": options.resume,
    }


def _write_run_report(options: RunOptions, out: TextIO | None, counts: Counts) -> None:
    """report.html (and failed.csv, followup.yaml when targets failed) in the run directory.
    Only a convenience: a failure here is logged and never changes the run's outcome."""
    stream = out or sys.stdout
    run = options.run
    try:
        followups = write_report([load_run(run, counts)], run.report)
    except (OSError, StoreError) as exc:  # a full disk: the run's own files say what happened
        log.warning("worker.report_not_written", why=str(exc), fix=f"worker report {run}")
        return
    except Exception:  # a bug: the run's files are complete; the report can be made later
        log.warning("worker.report_failed", exc_info=True, fix=f"worker report {run}")
        return
    stream.write(f"  report             {run.report}\n")
    for followup in followups:
        stream.write(f"  follow-up job      {followup} (the failed targets)\n")
    stream.flush()
