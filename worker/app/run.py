"""One run (or one more segment of a resumed run): files, client, engine, signals, summary.

The run directory holds run.json (the manifest: job and target hashes, limits, segments),
results.jsonl, audit.jsonl and summary.json. Whatever ends the run (done, a fatal error, an abort
rule, a signal, a deadline, a bug), the files are closed completely and the summary is written,
in synchronous code that no cancellation can interrupt.
"""

from __future__ import annotations

import random
import secrets
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, TextIO

import anyio
import orjson
import structlog

from worker import __version__
from worker.app.dryrun import Probe, probe
from worker.app.metrics import MetricsAddress, RunMetrics
from worker.app.sweep import SETTLE_S, VERIFY_FILE, Drive, VerifyCounts, sweep
from worker.core.engine import Engine
from worker.core.ports import EngineSettings, Recorder, StopReason
from worker.core.ratelimit import RateChange, RateLimiter
from worker.core.retry import Retrying, RetryPolicy, Verdict
from worker.enos.client import EnOSClient
from worker.errors import EnOSError
from worker.jobs.jobfile import Plan, run_targets
from worker.model import Attempt, Credentials, Job, Limits, Target, TargetResult
from worker.report.details import Details, RunTally, load_run
from worker.report.html import write_report
from worker.report.summary import JournalTally, build_summary, progress_loop, render
from worker.store import checkpoint
from worker.store.appendlog import iso, repair_tail
from worker.store.audit import AUDIT_FILE, AuditLog, who_and_where
from worker.store.journal import RESULTS_FILE, ResultJournal
from worker.store.rundir import (
    SUMMARY_FILE,
    AdmissionMark,
    Finished,
    read_verify_counts,
    write_manifest,
    write_summary,
)
from worker.store.state import ExitCode, Manifest, Segment, Summary

log = structlog.get_logger("worker.run")


@dataclass(frozen=True)
class RunOptions:
    """Everything a run needs besides the job: where, how fast, with which credentials."""

    gateway: str
    credentials: Credentials
    limits: Limits
    run_dir: Path
    resume: bool = False
    progress: bool = True
    seed: int | None = None
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    batch_settle_s: float = 2.0  # after a trial list's answer, before its assets are searched
    metrics: MetricsAddress | None = None  # --metrics-port: serve Prometheus metrics there
    verify_settle_s: float = SETTLE_S  # before a verify sweep searches
    ca_bundle: Path | None = None

    def client(self) -> EnOSClient:
        """The run's client for its gateway, credentials and limits."""
        limits = self.limits
        return EnOSClient(
            self.gateway,
            self.credentials,
            concurrency=limits.concurrency,
            timeout=limits.timeout,
            max_retry_after=limits.max_retry_after,
            ca_bundle=self.ca_bundle,
        )

    def policy(self) -> RetryPolicy:
        """The retry policy of this run."""
        return RetryPolicy(
            attempts=self.limits.attempts,
            max_throttles=self.limits.max_throttles,
            base_s=self.backoff_base_s,
            cap_s=self.backoff_cap_s,
        )


class _Recorder:
    """The engine's Recorder: attempts to the audit log, results to the journal."""

    metrics: RunMetrics | None = None

    def __init__(self, audit: AuditLog, journal: ResultJournal, mark: AdmissionMark) -> None:
        self.audit = audit
        self.journal = journal
        self.mark = mark

    def attempt(self, attempt: Attempt, action: str) -> None:
        self.audit.attempt(attempt, action)

    def result(self, result: TargetResult) -> None:
        self.journal.write(result)

    def metered(self, metrics: RunMetrics) -> _Recorder:
        """The same recorder, also counting every record in `metrics`."""
        metered = _MeteredRecorder(self.audit, self.journal, self.mark)
        metered.metrics = metrics
        return metered

    def sync(self) -> None:
        """fdatasync everything written so far (off the event loop)."""
        self.journal.log.sync()
        self.audit.log.sync()
        self.mark.sync()


class _MeteredRecorder(_Recorder):
    """With --metrics-port: every record also moves the metrics (the plain recorder stays
    free of the check on the hot path)."""

    def attempt(self, attempt: Attempt, action: str) -> None:
        self.audit.attempt(attempt, action)
        assert self.metrics is not None
        self.metrics.attempt(attempt, action)

    def result(self, result: TargetResult) -> None:
        self.journal.write(result)
        assert self.metrics is not None
        self.metrics.result(result)


def new_run_id(job: Job) -> str:
    """<job name>-<UTC timestamp>-<6 hex>: sortable, and unique across machines."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{job.name}-{stamp}-{secrets.token_hex(3)}"


def limiter_for(limits: Limits) -> RateLimiter:
    """The run's shared limiter for its limits; every rate decision is logged with its cause."""
    return RateLimiter(
        limits.rate,
        adaptive=limits.adaptive,
        ceiling=limits.rate_max,
        floor=min(limits.rate_floor, limits.rate or limits.rate_floor),
        on_change=_log_rate_change,
    )


def _log_rate_change(change: RateChange) -> None:
    lowered = change.after is not None and (change.before is None or change.after < change.before)
    (log.warning if lowered else log.info)(
        "worker.rate_changed",
        cause=change.cause,
        from_per_s=_rounded(change.before),
        to_per_s=_rounded(change.after),
        why=change.detail,
    )


def _rounded(rate: float | None) -> float | str:
    return "unlimited" if rate is None else round(rate, 1)


def exit_code_for(reason: StopReason, failed: int, not_attempted: int) -> int:
    """The contract's exit code for how a run ended."""
    if reason in (StopReason.FATAL, StopReason.ABORTED):
        return ExitCode.ABORTED
    if reason in (StopReason.INTERRUPTED, StopReason.DEADLINE, StopReason.QUOTA):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILED if failed or not_attempted else ExitCode.OK


class RunControl:
    """For a caller that runs several jobs in one process (``worker watch``): it stops each
    run itself, so the run does not take the signals, and the runs may share one limiter."""

    def __init__(
        self, limiter: RateLimiter | None = None, metrics: RunMetrics | None = None
    ) -> None:
        self.limiter = limiter
        self.metrics = metrics  # the caller's (served by it): this run's records count there
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


async def execute(
    job: Job,
    plan: Plan,
    options: RunOptions,
    *,
    manifest: Manifest,
    finished: Finished,
    out: TextIO | None = None,
    control: RunControl | None = None,
    counted: RunTally | None = None,
) -> int:
    """Run the job's pending targets as one segment; returns the exit code. With `control`,
    the caller stops the run (no signal handling here) and may share its limiter. `counted`:
    the journal's counts as read for `finished`, which the end of the segment goes on from."""
    run_dir = options.run_dir
    repair_tail(run_dir / RESULTS_FILE)
    repair_tail(run_dir / AUDIT_FILE)
    earlier_segments = bool(manifest.segments)
    segment = Segment(started_at=iso(time.time()), limits=options.limits)
    manifest.segments.append(segment)
    write_manifest(run_dir, manifest)
    limits = options.limits
    mark = AdmissionMark(run_dir, ahead=limits.concurrency, earlier_segments=earlier_segments)
    recorder = _Recorder(AuditLog(run_dir, manifest.run_id), ResultJournal(run_dir), mark)
    metrics = RunMetrics() if options.metrics is not None else None
    counting = metrics or (control.metrics if control is not None else None)
    if counting is not None:
        recorder = recorder.metered(counting)
    recorder.audit.write(_run_started(job, plan, options, manifest))
    client = options.client()
    engine = _engine(job, options, client, recorder, finished=finished, control=control)
    began = time.monotonic()
    try:
        problem = None
        if metrics is not None and options.metrics is not None:
            pending = plan.total - len(finished.done)
            problem = _serve_metrics(metrics, options.metrics, engine, pending)
        async with client:
            if problem is None:
                problem = await prove_gateway(client, options.policy(), random.Random(options.seed))
            if problem is not None:
                engine.stop(StopReason.FATAL, problem)
            else:
                targets = run_targets(job, plan, finished.done)
                already = len(finished.done)
                await _drive(engine, targets, plan, options, out=out, segment=segment,
                             already=already, signals=control is None)  # fmt: skip
    except Exception as exc:  # a bug or an OS failure: end as a resumable stop, say why
        log.exception("worker.internal_error")
        engine.stop(StopReason.FATAL, f"internal error: {exc!r}; the run is resumable")
    finally:
        # Synchronous on purpose: no cancellation can interrupt closing the files.
        segment.requests = engine.progress.requests
        segment.abandoned = engine.progress.abandoned
        segment.batching = _batching_record(engine, limits)
        segment.duration_s = round(time.monotonic() - began, 3)
        summary, read = _close_segment(engine, manifest, segment, recorder, counted)
        if metrics is not None:
            metrics.close()
    render(summary, run_dir, out, audit_head=recorder.audit.head)
    _write_run_report(run_dir, out, read)
    if summary.exit_code in (ExitCode.ABORTED, ExitCode.INTERRUPTED):
        _print_resume_hint(job, run_dir, out, retry_failed=summary.outcomes["failed"] > 0)
    return summary.exit_code


async def verify_run(options: RunOptions, out: TextIO | None = None) -> int:
    """`worker verify DIR` (and `run --verify`): the sweep, then summary.json and the report
    updated; exit 0 when every searched target is verified, 1 when some are still pending or
    could not be searched (or the sweep was stopped), 3 when the gateway cannot be used."""
    run_dir, limits = options.run_dir, options.limits
    async with options.client() as client:
        problem = await prove_gateway(client, options.policy(), random.Random(options.seed))
        if problem is not None:
            (out or sys.stderr).write(f"worker: verify stopped: {problem}\n")
            return ExitCode.ABORTED
        settings = EngineSettings(concurrency=limits.concurrency, policy=options.policy(),
                                  attempt_timeout=limits.timeout, dry_run=True)  # fmt: skip
        limiter, rng = limiter_for(limits), random.Random(options.seed)

        def engine_for(recorder: Recorder) -> Engine:
            return Engine(client, recorder, limiter, settings, rng=rng)

        drive = _drive_sweep(out, progress=options.progress)
        counts, engine = await sweep(run_dir, engine_for, drive, settle_s=options.verify_settle_s)
    _record_sweep(run_dir, counts, out)
    if engine.stop_reason is StopReason.FATAL:
        return ExitCode.ABORTED
    clean = counts.complete and not counts.still_pending and not counts.unverified
    return ExitCode.OK if clean else ExitCode.FAILED


def _drive_sweep(out: TextIO | None, *, progress: bool) -> Drive:
    """The sweep's engine with signals and, when asked, the progress line (a 200,000-target
    sweep at 100 searches/s takes half an hour)."""

    async def drive(
        engine: Engine, targets: Iterator[tuple[int, Target]], total: int
    ) -> StopReason:
        async with anyio.create_task_group() as helpers:
            helpers.start_soon(_signal_loop, engine, out)
            if progress:
                helpers.start_soon(partial(progress_loop, engine.progress, engine.limiter, total,
                                           out, searching=True))  # fmt: skip
            reason = await engine.run(targets)
            helpers.cancel_scope.cancel()
        return reason

    return drive


def _record_sweep(run_dir: Path, counts: VerifyCounts, out: TextIO | None) -> None:
    """The counts into summary.json (which keeps everything else) and the report page."""
    path = run_dir / SUMMARY_FILE
    if path.exists():
        summary = Summary.from_json(orjson.loads(path.read_bytes()))
        write_summary(run_dir, replace(summary, verify=counts.to_json()))
    write_report([load_run(run_dir)], run_dir / "report.html")
    stream = out or sys.stdout
    stream.write(
        f"Verify sweep of {run_dir}: {counts.verified:,} of {counts.checked:,} targets verified"
        f", {counts.still_pending:,} still pending ({counts.commands_pending:,} commands), "
        f"{counts.unverified:,} could not be searched; details in {run_dir / VERIFY_FILE}\n"
    )
    if not counts.complete:
        stream.write("The sweep did not search every target; run worker verify again.\n")
    stream.flush()


async def dry_run(
    options: RunOptions, sample: list[tuple[int, Target]]
) -> tuple[list[Probe], str | None]:
    """`--dry-run`: prove the gateway, then search the sampled targets (no cancel); returns
    the probes and why the gateway cannot be used (None when it can)."""
    limits = options.limits
    async with options.client() as client:
        problem = await prove_gateway(client, options.policy(), random.Random(options.seed))
        if problem is not None:
            return [], problem
        return await probe(client, sample, limiter_for(limits),
                           concurrency=limits.concurrency, policy=options.policy())  # fmt: skip


def _engine(
    job: Job,
    options: RunOptions,
    client: EnOSClient,
    recorder: _Recorder,
    *,
    finished: Finished,
    control: RunControl | None,
) -> Engine:
    """The segment's engine: its limiter (the caller's shared one, under control), settings
    from the limits, the admission mark and what earlier segments may have sent."""
    limits = options.limits
    shared = control.limiter if control is not None else None
    engine = Engine(
        client,
        recorder,
        shared or limiter_for(limits),
        EngineSettings(
            concurrency=limits.concurrency,
            policy=options.policy(),
            abort=job.abort,
            deadline_at=time.time() + limits.deadline if limits.deadline else None,
            attempt_timeout=limits.timeout,
            assets_per_call=limits.assets_per_call,
            batch_settle_s=options.batch_settle_s,
        ),
        admissions=recorder.mark,
        sent_before=_sent_before(recorder.mark, finished),
        rng=random.Random(options.seed),
    )
    if control is not None:
        control.attach(engine)
    return engine


def _leave_checkpoint(run_dir: Path, counted: RunTally) -> None:
    """What this pass counted, for the next resume (a cache: failing to write it loses
    nothing, the next resume reads the journal)."""
    try:
        checkpoint.write(run_dir, counted.cursor, counted.state(), bytes(counted.done))
    except OSError as exc:
        log.warning("worker.checkpoint_not_written", why=str(exc))


def _serve_metrics(
    metrics: RunMetrics, address: MetricsAddress, engine: Engine, pending: int
) -> str | None:
    """The gauges read from the engine, then the server; what stops it (a port taken)."""
    progress = engine.progress
    metrics.gauge("worker_requests_in_flight", "requests sent and not answered yet",
                  lambda: progress.in_flight)  # fmt: skip
    metrics.gauge("worker_targets_waiting", "targets waiting out a retry's backoff",
                  lambda: progress.waiting)  # fmt: skip
    metrics.gauge("worker_targets_pending", "targets of this segment without a final result",
                  lambda: pending - progress.finished)  # fmt: skip
    problem = metrics.serve(address, engine.limiter)
    return None if problem is None else f"{problem}; nothing was sent"


def _batching_record(engine: Engine, limits: Limits) -> dict[str, Any] | None:
    plan = engine.batching
    if plan is None:
        return None
    return {"asked": limits.assets_per_call, "size": plan.size, "trust": plan.trust.value,
            "lists": plan.lists, "notes": list(plan.notes)}  # fmt: skip


def _sent_before(mark: AdmissionMark, finished: Finished) -> Callable[[int, Target], bool] | None:
    """Whether an earlier segment may have sent a target (crash truth, design.md); None when
    no target can have been (a new run), so the hot path asks nothing."""
    retried = finished.retried_maybe_applied
    if not retried:
        if not mark.sent_before(0):
            return None
        return lambda ordinal, _: mark.sent_before(ordinal)
    return lambda ordinal, target: mark.sent_before(ordinal) or target.digest() in retried


async def prove_gateway(
    client: EnOSClient,
    policy: RetryPolicy,
    rng: random.Random,
    sleep: Callable[[float], Any] = anyio.sleep,
) -> str | None:
    """Get the access token before the first target: a wrong gateway or rejected credentials
    stop the run at once (exit 3) instead of failing every target one by one. Retried like any
    call (the same decisions); returns why the gateway cannot be used, or None."""
    retrying = Retrying(policy)
    while True:
        try:
            await client.authenticate()
        except EnOSError as exc:
            decision = retrying.failed(exc, rng)
            if decision.verdict is Verdict.FATAL:
                return str(exc)
            if decision.verdict is Verdict.FAILED:
                return f"the gateway did not answer: {exc}"
            log.warning("worker.gateway_unreachable", attempt=retrying.failures, error=str(exc))
            await sleep(decision.wait_s if decision.wait_s is not None else 1.0)
        else:
            return None


async def _drive(
    engine: Engine,
    targets: Iterator[tuple[int, Target]],
    plan: Plan,
    options: RunOptions,
    *,
    out: TextIO | None,
    segment: Segment,
    already: int = 0,
    signals: bool = True,
) -> None:
    """The engine, with its helpers: journal syncing, signals, progress."""
    async with anyio.create_task_group() as helpers:
        helpers.start_soon(_sync_loop, engine)
        helpers.start_soon(_rate_sampler, engine, segment)
        if signals:
            helpers.start_soon(_signal_loop, engine, out)
        if options.progress:
            helpers.start_soon(
                progress_loop, engine.progress, engine.limiter, plan.total, out, already
            )
        await engine.run(targets)
        helpers.cancel_scope.cancel()


async def _sync_loop(engine: Engine) -> None:
    """fdatasync the journal, the audit log and the mark twice a second, off the event loop."""
    recorder = engine.recorder
    assert isinstance(recorder, _Recorder)
    while True:
        await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(recorder.sync)


TIMELINE_POINTS = 600


async def _rate_sampler(engine: Engine, segment: Segment) -> None:
    """Record [seconds, achieved req/s, limiter req/s] into the segment, about 600 points at
    most: when full, every other point is dropped and the interval doubles."""
    timeline = segment.rate_timeline
    interval, began, last = 1.0, time.monotonic(), 0
    while True:
        await anyio.sleep(interval)
        requests = engine.progress.requests
        limit = engine.limiter.rate
        timeline.append([
            round(time.monotonic() - began, 1),
            round((requests - last) / interval, 1),
            round(limit, 1) if limit is not None else None,
        ])  # fmt: skip
        last = requests
        if len(timeline) >= TIMELINE_POINTS:
            timeline[:] = timeline[1::2]
            interval *= 2


async def _signal_loop(engine: Engine, out: TextIO | None) -> None:
    """First SIGINT/SIGTERM: stop admitting, finish in flight. Second: abandon in flight."""
    stream = out or sys.stderr
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not engine.stopping:
                stream.write(
                    f"\n{name}: no new targets; letting {engine.progress.in_flight} requests in "
                    "flight finish. Send it again to abandon them.\n"
                )
                stream.flush()
                engine.stop(StopReason.INTERRUPTED, f"{name} received")
            else:
                stream.write(f"\n{name} again: abandoning the requests in flight.\n")
                stream.flush()
                engine.cancel()


def _close_segment(
    engine: Engine,
    manifest: Manifest,
    segment: Segment,
    recorder: _Recorder,
    counted: RunTally | None,
) -> tuple[Summary, tuple[JournalTally, Details]]:
    """Close the files, then write run.json, run_finished and summary.json for the whole run."""
    recorder.journal.log.close()
    recorder.mark.close()
    run_dir = recorder.journal.log.path.parent
    counted = counted or RunTally()
    counts, found = counted.read_rest(run_dir)  # the summary and the report
    _leave_checkpoint(run_dir, counted)
    reason = engine.stop_reason
    exit_code = exit_code_for(
        reason, counts.outcomes.get("failed", 0), manifest.targets - counts.finished
    )
    segment.finished_at, segment.reason = iso(time.time()), reason.value
    segment.message, segment.exit_code = engine.stop_message, exit_code
    write_manifest(run_dir, manifest)
    summary = build_summary(manifest, counts, exit_code=exit_code,
                            verify=read_verify_counts(run_dir))  # fmt: skip
    write_summary(run_dir, summary)
    recorder.audit.write(
        {
            "type": "run_finished",
            "at": iso(time.time()),
            "segment": len(manifest.segments),
            "reason": reason.value,
            "message": engine.stop_message,
            "exit_code": exit_code,
            "summary": summary.to_json(),
        }
    )
    recorder.audit.log.close()
    log.info(
        "worker.run_finished", reason=reason.value, exit_code=int(exit_code),
        why=engine.stop_message,
    )  # fmt: skip
    return summary, (counts, found)


def _run_started(job: Job, plan: Plan, options: RunOptions, manifest: Manifest) -> dict[str, Any]:
    return {
        "type": "run_started",
        "at": iso(time.time()),
        "run_id": manifest.run_id,
        "segment": len(manifest.segments),
        "worker_version": __version__,
        **who_and_where(),
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


def new_manifest(job: Job, plan: Plan, options: RunOptions) -> Manifest:
    """The manifest of a new run."""
    return Manifest(
        run_id=new_run_id(job),
        job=str(job.path),
        job_name=job.name,
        job_sha256=job.sha256,
        targets_sha256=plan.targets_sha256,
        targets=plan.total,
        gateway=options.gateway,
        limits=options.limits,
        match=asdict(job.match) if job.match is not None else None,
        shard=str(plan.shard) if plan.shard is not None else None,
    )


def _write_run_report(
    run_dir: Path, out: TextIO | None, read: tuple[JournalTally, Details]
) -> None:
    """report.html (and failed.csv, followup.yaml when targets failed) in the run directory.
    Only a convenience: a failure here is logged and never changes the run's outcome."""
    stream = out or sys.stdout
    try:
        page = run_dir / "report.html"
        followups = write_report([load_run(run_dir, read)], page)
    except Exception:  # the run's files are complete; the report can be made again later
        log.warning("worker.report_failed", exc_info=True, fix=f"worker report {run_dir}")
        return
    stream.write(f"  report             {page}\n")
    for followup in followups:
        stream.write(f"  follow-up job      {followup} (the failed targets)\n")
    stream.flush()


def _print_resume_hint(job: Job, run_dir: Path, out: TextIO | None, *, retry_failed: bool) -> None:
    stream = out or sys.stdout
    flag = " --retry-failed" if retry_failed else ""
    stream.write(f"\nTo continue this run:\n  worker run {job.path} --resume {run_dir}{flag}\n")
    stream.flush()
