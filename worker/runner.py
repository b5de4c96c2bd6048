"""One run (or one more segment of a resumed run): files, client, engine, signals, summary.

The run directory holds run.json (the manifest: job and target hashes, limits, segments),
results.jsonl, audit.jsonl and summary.json. Whatever ends the run (done, a fatal error, an abort
rule, a signal, a deadline, a bug), the files are closed completely and the summary is written,
in synchronous code that no cancellation can interrupt.
"""

from __future__ import annotations

import fcntl
import os
import random
import secrets
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import anyio
import orjson
import structlog

from worker import __version__
from worker.audit import AUDIT_FILE, AuditLog, who_and_where
from worker.engine import Engine, StopReason
from worker.enos.client import Credentials, EnOSClient
from worker.errors import FatalError, RetryableError, UsageError
from worker.jobfile import Plan, gc_paused, run_targets
from worker.journal import (
    RESULTS_FILE,
    ResultJournal,
    iso,
    read_journal,
    record_key,
    repair_tail,
)
from worker.model import Attempt, Job, Limits, Outcome, Target, TargetResult, key_digest
from worker.ratelimit import RateLimiter
from worker.report import SUMMARY_FILE, build_summary, progress_loop, render, tally
from worker.retry import RetryPolicy

log = structlog.get_logger("worker.run")
MANIFEST_FILE = "run.json"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ABORTED, EXIT_INTERRUPTED = 0, 1, 2, 3, 4


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


class _Recorder:
    """The engine's Recorder: attempts to the audit log, results to the journal."""

    def __init__(self, audit: AuditLog, journal: ResultJournal) -> None:
        self.audit = audit
        self.journal = journal

    def attempt(self, attempt: Attempt, action: str) -> None:
        self.audit.attempt(attempt, action)

    def result(self, result: TargetResult) -> None:
        self.journal.write(result)


def new_run_id(job: Job) -> str:
    """<job name>-<UTC timestamp>-<6 hex>: sortable, and unique across machines."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{job.name}-{stamp}-{secrets.token_hex(3)}"


def read_manifest(run_dir: Path) -> dict[str, Any]:
    """The run's manifest (run.json)."""
    result: dict[str, Any] = orjson.loads((run_dir / MANIFEST_FILE).read_bytes())
    return result


def write_manifest(run_dir: Path, manifest: dict[str, Any]) -> None:
    """Replace run.json atomically (write, fsync, rename)."""
    tmp = run_dir / f".{MANIFEST_FILE}.tmp"
    with tmp.open("wb") as stream:
        stream.write(orjson.dumps(manifest, option=orjson.OPT_INDENT_2))
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, run_dir / MANIFEST_FILE)


LOCK_FILE = "run.lock"


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for this process: two workers appending to one journal would
    break the one-line-per-target rule. The kernel drops the lock if the process dies."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(
            f"{run_dir} is in use by another worker (pid {holder}); wait for it to end, or stop "
            "it (Ctrl-C / SIGTERM) and resume"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def done_set(run_dir: Path, *, retry_failed: bool) -> set[int]:
    """Digests of the targets already final in the journal (failed ones too, unless retried)."""
    done: set[int] = set()
    with gc_paused():
        for record in read_journal(run_dir / RESULTS_FILE):
            if retry_failed and record["outcome"] == Outcome.FAILED:
                continue
            done.add(key_digest(record_key(record)))
    return done


def exit_code_for(reason: StopReason, failed: int, not_attempted: int) -> int:
    """The contract's exit code for how a run ended."""
    if reason in (StopReason.FATAL, StopReason.ABORTED):
        return EXIT_ABORTED
    if reason in (StopReason.INTERRUPTED, StopReason.DEADLINE):
        return EXIT_INTERRUPTED
    return EXIT_FAILED if failed or not_attempted else EXIT_OK


async def execute(
    job: Job,
    plan: Plan,
    options: RunOptions,
    *,
    manifest: dict[str, Any],
    done: set[int],
    out: TextIO | None = None,
) -> int:
    """Run the job's pending targets as one segment; returns the exit code."""
    run_dir = options.run_dir
    repair_tail(run_dir / RESULTS_FILE)
    repair_tail(run_dir / AUDIT_FILE)
    segment: dict[str, Any] = {"started_at": iso(time.time()), "limits": asdict(options.limits)}
    manifest["segments"].append(segment)
    write_manifest(run_dir, manifest)
    audit = AuditLog(run_dir, manifest["run_id"])
    journal = ResultJournal(run_dir)
    audit.write(_run_started(job, plan, options, manifest))
    limits = options.limits
    client = EnOSClient(
        options.gateway, options.credentials, concurrency=limits.concurrency, timeout=limits.timeout
    )
    engine = Engine(
        client,
        _Recorder(audit, journal),
        RateLimiter(
            limits.rate,
            adaptive=limits.adaptive,
            ceiling=limits.rate_max,
            floor=min(limits.rate_floor, limits.rate or limits.rate_floor),
        ),
        concurrency=limits.concurrency,
        policy=RetryPolicy(
            attempts=limits.attempts,
            max_throttles=limits.max_throttles,
            base_s=options.backoff_base_s,
            cap_s=options.backoff_cap_s,
        ),
        abort=job.abort,
        deadline_at=time.time() + limits.deadline if limits.deadline else None,
        attempt_timeout=limits.timeout,
        rng=random.Random(options.seed),
    )
    began = time.monotonic()
    try:
        async with client:
            if await _gateway_answers(client, engine, options):
                targets = run_targets(job, plan, done)
                await _drive(engine, targets, plan, options, out=out, segment=segment)
    except Exception as exc:  # a bug or an OS failure: end as a resumable stop, say why
        log.exception("worker.internal_error")
        engine.stop(StopReason.FATAL, f"internal error: {exc!r}; the run is resumable")
    finally:
        # Synchronous on purpose: no cancellation can interrupt closing the files.
        segment["requests"] = engine.progress.requests
        segment["duration_s"] = round(time.monotonic() - began, 3)
        summary = _close_segment(engine, manifest, segment, audit, journal)
    render(summary, run_dir, out)
    if summary["exit_code"] in (EXIT_ABORTED, EXIT_INTERRUPTED):
        _print_resume_hint(job, run_dir, out)
    return int(summary["exit_code"])


async def _gateway_answers(client: EnOSClient, engine: Engine, options: RunOptions) -> bool:
    """Get the access token before the first target: a wrong gateway or rejected credentials
    stop the run at once (exit 3) instead of failing every target one by one."""
    policy = RetryPolicy(attempts=options.limits.attempts, base_s=options.backoff_base_s,
                         cap_s=options.backoff_cap_s)  # fmt: skip
    rng = random.Random(options.seed)
    for number in range(1, policy.attempts + 1):
        try:
            await client.authenticate()
        except FatalError as exc:
            engine.stop(StopReason.FATAL, str(exc))
            return False
        except RetryableError as exc:
            if number == policy.attempts:
                engine.stop(StopReason.FATAL, f"the gateway did not answer: {exc}")
                return False
            log.warning("worker.gateway_unreachable", attempt=number, error=str(exc))
            await anyio.sleep(policy.backoff(number, rng))
        else:
            return True
    return False


async def _drive(
    engine: Engine,
    targets: Iterator[Target],
    plan: Plan,
    options: RunOptions,
    *,
    out: TextIO | None,
    segment: dict[str, Any],
) -> None:
    """The engine, with its helpers: journal syncing, signals, progress."""
    async with anyio.create_task_group() as helpers:
        helpers.start_soon(_sync_loop, engine)
        helpers.start_soon(_rate_sampler, engine, segment)
        helpers.start_soon(_signal_loop, engine, out)
        if options.progress:
            helpers.start_soon(progress_loop, engine.progress, plan.total, out)
        await engine.run(targets)
        helpers.cancel_scope.cancel()


async def _sync_loop(engine: Engine) -> None:
    """fdatasync the journal and the audit log twice a second, off the event loop."""
    recorder = engine.recorder
    assert isinstance(recorder, _Recorder)
    while True:
        await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(recorder.journal.log.sync)
        await anyio.to_thread.run_sync(recorder.audit.log.sync)


TIMELINE_POINTS = 600


async def _rate_sampler(engine: Engine, segment: dict[str, Any]) -> None:
    """Record [seconds, achieved req/s, limiter req/s] into the segment, about 600 points at
    most: when full, every other point is dropped and the interval doubles."""
    timeline: list[list[float | None]] = []
    segment["rate_timeline"] = timeline
    interval, began, last = 1.0, time.monotonic(), 0
    while True:
        await anyio.sleep(interval)
        requests = engine.progress.requests
        limit = engine.rate_limit
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
    manifest: dict[str, Any],
    segment: dict[str, Any],
    audit: AuditLog,
    journal: ResultJournal,
) -> dict[str, Any]:
    """Close the files, then write run.json, run_finished and summary.json for the whole run."""
    journal.log.close()
    run_dir = journal.log.path.parent
    counts = tally(run_dir)
    reason = engine.stop_reason
    exit_code = exit_code_for(
        reason, counts.outcomes.get("failed", 0), manifest["targets"] - counts.finished
    )
    segment.update(
        finished_at=iso(time.time()), reason=reason.value, message=engine.stop_message,
        exit_code=exit_code,
    )  # fmt: skip
    write_manifest(run_dir, manifest)
    summary = build_summary(manifest, counts, exit_code=exit_code)
    tmp = run_dir / f".{SUMMARY_FILE}.tmp"
    tmp.write_bytes(orjson.dumps(summary, option=orjson.OPT_INDENT_2))
    os.replace(tmp, run_dir / SUMMARY_FILE)
    audit.write(
        {
            "type": "run_finished",
            "at": iso(time.time()),
            "segment": len(manifest["segments"]),
            "reason": reason.value,
            "message": engine.stop_message,
            "exit_code": exit_code,
            "summary": summary,
        }
    )
    audit.log.close()
    log.info(
        "worker.run_finished", reason=reason.value, exit_code=exit_code, why=engine.stop_message
    )
    return summary


def _run_started(
    job: Job, plan: Plan, options: RunOptions, manifest: dict[str, Any]
) -> dict[str, Any]:
    return {
        "type": "run_started",
        "at": iso(time.time()),
        "run_id": manifest["run_id"],
        "segment": len(manifest["segments"]),
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


def new_manifest(job: Job, plan: Plan, options: RunOptions) -> dict[str, Any]:
    """The manifest of a new run."""
    return {
        "run_id": new_run_id(job),
        "job": str(job.path),
        "job_name": job.name,
        "job_sha256": job.sha256,
        "targets_sha256": plan.targets_sha256,
        "targets": plan.total,
        "gateway": options.gateway,
        "limits": asdict(options.limits),
        "segments": [],
    }


def _print_resume_hint(job: Job, run_dir: Path, out: TextIO | None) -> None:
    stream = out or sys.stdout
    stream.write(f"\nTo continue this run:\n  worker run {job.path} --resume {run_dir}\n")
    stream.flush()
