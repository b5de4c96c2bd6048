"""Preparing a segment: for a new run, the plan and a fresh manifest; for a resume, what is
final (the done set), the plan marking what is still pending, and the run's own manifest,
checked against the job. The CLI (``run``, ``run --resume``) and the spool watcher prepare
through the same functions, under the run directory's lock.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from pathlib import Path

import structlog

from worker.app.run import SegmentStart
from worker.errors import UsageError
from worker.jobs.plan import Plan, plan
from worker.model import Job, Limits, Shard
from worker.report.hints import resume_command
from worker.store.done import Finished
from worker.store.layout import RunDir, read_manifest
from worker.store.resume import read_for_resume
from worker.store.state import Manifest
from worker.store.tally import JournalFold

log = structlog.get_logger("worker")
SHOWN_DUPLICATES = 20


def utc_stamp() -> str:
    """The current UTC time as run ids and run directories name it."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def new_run_id(job: Job) -> str:
    """<job name>-<UTC timestamp>-<6 hex>: sortable, and unique across machines."""
    return f"{job.name}-{utc_stamp()}-{secrets.token_hex(3)}"


def new_run_dir(out: Path | None, job: Job) -> RunDir:
    """--out DIR (must not exist, or be empty), else runs/<job name>-<UTC timestamp>/."""
    run = RunDir(out if out is not None else Path("runs") / f"{job.name}-{utc_stamp()}")
    if not run.unused():
        raise UsageError(
            f"{run} already exists and is not empty; a run is never overwritten. To continue "
            f"it: {resume_command(str(job.path), run)}"
        )
    run.path.mkdir(parents=True, exist_ok=True)
    return run


def runnable_plan(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
    """The plan (duplicates logged); UsageError when nothing is left to run in it."""
    made = checked_plan(job, shard, done)
    if made.total == 0:
        where = f" in shard {made.shard}" if made.shard is not None else ""
        raise UsageError(f"{job.path} lists no targets{where}; nothing to do")
    return made


def checked_plan(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
    """The plan, each duplicate dropped said in the log (the first SHOWN_DUPLICATES)."""
    made = plan(job, shard, done)
    for note in made.duplicate_notes[:SHOWN_DUPLICATES]:
        log.warning("worker.duplicate_target", note=note)
    if len(made.duplicate_notes) > SHOWN_DUPLICATES:
        log.warning("worker.more_duplicates", count=len(made.duplicate_notes) - SHOWN_DUPLICATES)
    return made


def new_manifest(job: Job, plan_: Plan, *, gateway: str, limits: Limits) -> Manifest:
    """The manifest of a new run."""
    return Manifest(
        run_id=new_run_id(job),
        job=str(job.path),
        job_name=job.name,
        job_sha256=job.sha256,
        targets_sha256=plan_.targets_sha256,
        targets=plan_.total,
        gateway=gateway,
        limits=limits,
        match=job.match,
        shard=str(plan_.shard) if plan_.shard is not None else None,
    )


def start_new(job: Job, shard: Shard | None, *, gateway: str, limits: Limits) -> SegmentStart:
    """The first segment of a new run."""
    made = runnable_plan(job, shard)
    manifest = new_manifest(job, made, gateway=gateway, limits=limits)
    return SegmentStart(job, made, manifest, Finished(), JournalFold())


def start_resumed(
    job: Job, run: RunDir, shard: Shard | None, *, retry_failed: bool, force: bool
) -> SegmentStart:
    """A further segment of the run in `run` (under its lock): what is final first, then the
    plan, which marks what is still pending (a finished run's resume reads its targets file
    once); refused when the job, its targets or the shard are not the run's."""
    manifest = read_manifest(run)
    fold, finished = read_for_resume(run, retry_failed=retry_failed)
    made = runnable_plan(job, shard, finished.done)
    check_same_run(run, manifest, job, made, force=force)
    manifest.targets = made.total
    return SegmentStart(job, made, manifest, finished, fold)


def check_same_run(run: RunDir, manifest: Manifest, job: Job, made: Plan, *, force: bool) -> None:
    """Refuse to resume the run in `run` with another job, other targets (unless `force`), or
    another shard: resuming would mix two different runs."""
    for what, then, now in manifest.changes(job.sha256, made.targets_sha256):
        if not force:
            raise UsageError(
                f"the {what} changed since this run started (sha256 {then[:12]}... then, "
                f"{now[:12]}... now); resuming would mix two different runs. Start a new run, "
                "or pass --force to resume anyway"
            )
    asked = str(made.shard) if made.shard is not None else None
    if asked != manifest.shard:
        covers = f"shard {manifest.shard}" if manifest.shard else "every target (no shard)"
        fix = f"pass --shard {manifest.shard}" if manifest.shard else "drop --shard"
        raise UsageError(f"the run in {run} covers {covers}; {fix} to resume it")
