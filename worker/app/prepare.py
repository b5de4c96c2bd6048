"""Preparing a segment: for a new run, the plan and a fresh manifest; for a resume, what is
final (the done set), the plan marking what is still pending, and the run's own manifest,
checked against the job. The CLI (``run``, ``run --resume``) and the spool watcher prepare
through the same functions, under the run directory's lock.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import structlog

from worker.app.run import SegmentStart
from worker.errors import UsageError, shown
from worker.jobs.plan import Plan, inline_digest, plan, targets_sha256
from worker.jobs.targets import open_regular
from worker.model import Job, Limits, Shard, TargetsFile
from worker.report.hints import resume_command
from worker.store.audit import last_run_started
from worker.store.done import Finished
from worker.store.layout import RunDir, copy_in, read_manifest
from worker.store.lock import holder_of
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


def new_run_dir(out: Path | None, job: Job, run_id: str) -> RunDir:
    """--out DIR (must not exist, or be empty), else runs/<run id>/ (the job's name, the UTC
    time and a random suffix: two starts in one second never share a directory). UsageError,
    saying what the directory holds and what to do, when it cannot be used."""
    run = RunDir(out if out is not None else Path("runs") / run_id)
    if not run.unused():
        raise UsageError(f"{run} {_what_it_holds(run, job)}")
    try:
        run.path.mkdir(parents=True, exist_ok=out is not None)
    except OSError as exc:
        raise UsageError(
            f"cannot create the run directory {run}: {exc.strerror}; choose another --out, or "
            "fix the permissions of its parent"
        ) from None
    if not os.access(run.path, os.W_OK | os.X_OK):
        raise UsageError(f"cannot write in the run directory {run}; choose another --out")
    return run


def _what_it_holds(run: RunDir, job: Job) -> str:
    """Why an --out directory cannot take a new run, and the one thing that would work."""
    if not run.path.is_dir():
        return "is a file, not a directory; give --out a new or empty directory"
    if not run.holds_run():
        return "already holds files but no run; give --out a new or empty directory"
    holder = holder_of(run)
    if holder is not None:
        return f"holds a run that is running now ({holder}); a run is never overwritten"
    try:
        manifest = read_manifest(run)
    except UsageError:
        return "holds a run.json that cannot be read; give --out a new or empty directory"
    if manifest.job_sha256 != job.sha256:
        return (
            f"holds another job's run ({manifest.job_name}, {manifest.run_id}); a run is never "
            "overwritten: give --out a new or empty directory"
        )
    return (
        "already holds this job's run; a run is never overwritten. To continue it: "
        + resume_command(str(job.path), run)
    )


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


def new_manifest(
    job: Job, plan_: Plan, *, gateway: str, limits: Limits, run_id: str | None = None
) -> Manifest:
    """The manifest of a new run."""
    return Manifest(
        run_id=run_id or new_run_id(job),
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
    """The first segment of a new run (a targets_query's plan is empty until it is resolved,
    at the start of the segment)."""
    made = checked_plan(job, shard) if job.query is not None else runnable_plan(job, shard)
    manifest = new_manifest(job, made, gateway=gateway, limits=limits)
    return SegmentStart(job, made, manifest, Finished(), JournalFold())


def snapshot_targets(start: SegmentStart, run: RunDir) -> SegmentStart:
    """A new run's targets fixed at its start: the targets file copied into the run directory
    (through one open descriptor, hashed as copied), and the segment set to read only the
    copy. UsageError when the file no longer hashes as planned (it changed meanwhile)."""
    job = start.job
    if job.targets_file is None:
        return start
    source, copy = job.targets_file, run.targets(job.targets_file.fmt)
    digest = inline_digest(job)
    with open_regular(source.path) as stream:
        copy_in(stream, copy, digest)
    if digest.hexdigest() != start.plan.targets_sha256:
        copy.unlink(missing_ok=True)
        raise UsageError(
            f"{source.path} changed between planning and the start of the run; nothing was "
            "sent. A targets file must not change under a run: run again once it is final"
        )
    start.manifest.targets_file = copy.name
    return replace(start, job=replace(job, targets_file=TargetsFile(copy, source.fmt)))


def start_resumed(
    job: Job, run: RunDir, shard: Shard | None, *, retry_failed: bool, force: bool
) -> SegmentStart:
    """A further segment of the run in `run` (under its lock): what is final first, then the
    plan over the run's own copy of its targets, which marks what is still pending (a finished
    run's resume reads it once); refused when the job, its targets or the shard are not the
    run's (unless `force` for a changed job or targets file: the run then goes on over the
    targets it started with)."""
    manifest = read_manifest(run)
    fold, finished = read_for_resume(run, retry_failed=retry_failed)
    # A query's targets are the run's snapshot (or none yet): the job file's hash covers the query.
    listed = manifest.targets_sha256 if job.query is not None else targets_sha256(job)
    own = _with_own_targets(job, run, manifest)
    planned = checked_plan if job.query is not None else runnable_plan
    made = planned(own, shard, finished.done)
    if own is not job and made.targets_sha256 != manifest.targets_sha256:
        raise UsageError(
            f"{manifest.targets_file} in {run}, the copy of the targets this run goes over, no "
            "longer hashes as it did at the start; restore it, or start a new run"
        )
    check_same_run(run, manifest, job.sha256, listed, made.shard, force=force)
    manifest.targets = made.total
    return SegmentStart(own, made, manifest, finished, fold)


def _with_own_targets(job: Job, run: RunDir, manifest: Manifest) -> Job:
    """The job reading the run's copy of its targets file (runs started before copies were
    made read the job's own file, as they did); a targets_query's, its snapshot."""
    if manifest.targets_file is None or (job.targets_file is None and job.query is None):
        return job
    copy = run.path / manifest.targets_file
    fmt = "jsonl" if copy.suffix == ".jsonl" else "csv"
    return replace(job, targets_file=TargetsFile(copy, fmt))


def check_same_run(
    run: RunDir,
    manifest: Manifest,
    job_sha256: str,
    targets_sha256: str,
    shard: Shard | None,
    *,
    force: bool,
) -> None:
    """Refuse to resume the run in `run` with another job, other targets (unless `force`), or
    another shard: resuming would mix two different runs."""
    for what, then, now in manifest.changes(job_sha256, targets_sha256):
        if not force:
            raise UsageError(
                f"the {what} changed since this run started (sha256 {then[:12]}... then, "
                f"{now[:12]}... now); resuming would mix two different runs. Start a new run, "
                "or pass --force to resume anyway (over the targets it started with)"
            )
    asked = str(shard) if shard is not None else None
    if asked != manifest.shard:
        covers = f"shard {manifest.shard}" if manifest.shard else "every target (no shard)"
        fix = f"pass --shard {manifest.shard}" if manifest.shard else "drop --shard"
        raise UsageError(f"the run in {run} covers {covers}; {fix} to resume it")


def check_recorded(run: RunDir, manifest: Manifest, *, gateway: str | None) -> None:
    """run.json against the audit's last run_started: the run id, the job and targets hashes
    and the gateway must be what the run last ran as. An edited run.json (a gateway pointed
    elsewhere, to receive the token) is refused; an explicit `gateway` (--gateway, or the
    spool watcher's own) may change the gateway, and run.json then follows it (the new
    segment's run_started records it)."""
    started = last_run_started(run)
    if started is None:
        return  # a run that died before its first record: nothing to compare
    recorded = {
        "run id": (manifest.run_id, started.get("run_id")),
        "job sha256": (manifest.job_sha256, started.get("job_sha256")),
        "targets sha256": (manifest.targets_sha256, started.get("targets_sha256")),
    }
    if gateway is None:
        recorded["gateway"] = (manifest.gateway, started.get("gateway"))
    for what, (then, audited) in recorded.items():
        if then != audited:
            raise UsageError(
                f"{run.manifest} says its {what} is {shown(then)}, but the audit's last segment "
                f"ran with {shown(audited)}: run.json was changed outside worker. Restore it"
                + (", or pass --gateway to change the gateway openly" if what == "gateway" else "")
            )
    if gateway is not None:
        manifest.gateway = gateway
