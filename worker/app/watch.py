"""``worker watch SPOOL``: a long-lived worker that runs the job files dropped into a directory.

Layout (created when missing)::

    SPOOL/incoming/   job files are dropped here (*.yaml, *.yml), by cron or another system;
                      one is claimed once it has not changed for a second
    SPOOL/running/    claimed: renamed here, under a unique name, by the watcher running it
    SPOOL/runs/       one run directory per claimed job, named like its file in running/
    SPOOL/done/       finished jobs (exit 0 or 1), with NAME.exit.json beside each
    SPOOL/failed/     invalid (2), aborted (3) or past their deadline (4), with NAME.exit.json
                      (and NAME.error.txt for a job that could not be read)

A claim is one ``rename`` from incoming/ to a name that exists nowhere else, so of several
watchers on one shared volume exactly one gets each file. The run directory's ``run.lock``
(flock, dropped by the kernel when a process dies) says whether a job in running/ is being run:
an unlocked one is resumed from its journal, by whichever watcher locks it first. Several jobs
run at once under one shared limiter (``--rate`` is the watcher's whole budget). SIGTERM drains:
nothing new is claimed, running jobs stop as a run does on SIGTERM and stay in running/,
resumable by the next watcher.

Targets files move with nothing: a job file refers to them by a path relative to itself, and
incoming/, running/, done/ and failed/ are siblings, so write ``targets_file: ../targets/x.csv``
and keep targets files in ``SPOOL/targets/``.
"""

from __future__ import annotations

import os
import secrets
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import anyio
import orjson
import structlog
from anyio.abc import TaskGroup

from worker.app.metrics import MetricsAddress, RunMetrics
from worker.app.prepare import check_recorded, snapshot_targets, start_new, start_resumed
from worker.app.run import RunControl, SegmentStart, execute
from worker.app.settings import resolve_gateway
from worker.app.wiring import RunOptions, limiter_for
from worker.core.ratelimit import RateLimiter
from worker.errors import ExitCode, JobFileError, UsageError
from worker.jobs.parse import load_job
from worker.model import Credentials, Job, Limits
from worker.store.appendlog import iso
from worker.store.layout import RunDir
from worker.store.lock import RunDirBusy, run_dir_lock

log = structlog.get_logger("worker.watch")
SPOOL_DIRS = ("incoming", "running", "runs", "done", "failed")
JOB_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class WatchOptions:
    """One watcher: its spool, credentials, the shared rate, how many jobs at once."""

    spool: Path
    credentials: Credentials
    limits: Limits  # rate: the whole watcher's budget; concurrency: per job unless the job's
    gateway: str | None = None
    insecure: bool = False
    jobs: int = 2
    poll_s: float = 1.0
    once: bool = False  # exit when nothing is left to do (cron, tests)
    ca_bundle: Path | None = None
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    metrics: MetricsAddress | None = None  # serve the watcher's metrics (all its jobs) there
    quiet_s: float = 1.0  # a job file is claimed once it has not changed for this long


def prepare(spool: Path) -> None:
    """Create the spool's directories (a watcher may be the first on a fresh volume)."""
    for name in SPOOL_DIRS:
        (spool / name).mkdir(parents=True, exist_ok=True)


def claim(spool: Path, name: str) -> Path | None:
    """Move incoming/NAME to running/ under a unique name; None if another watcher took it."""
    stem = Path(name).stem
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    claimed = spool / "running" / f"{stem}.{stamp}-{secrets.token_hex(3)}{Path(name).suffix}"
    try:
        os.rename(spool / "incoming" / name, claimed)
    except FileNotFoundError:
        return None
    log.info("worker.job_claimed", job=name, as_=claimed.name)
    return claimed


def run_dir_of(job_file: Path) -> RunDir:
    """The run directory of a claimed job file: SPOOL/runs/<its name without the suffix>."""
    return RunDir(job_file.parent.parent / "runs" / job_file.stem)


def waiting(spool: Path, quiet_s: float = 0.0) -> list[str]:
    """Job files in incoming/, oldest first; with `quiet_s`, only those unchanged for that
    long (a producer that writes in place must not have half a job claimed: a cut-off YAML
    list can still parse, as a shorter job)."""
    now = time.time()
    entries = [
        entry
        for entry in os.scandir(spool / "incoming")
        if entry.is_file()
        and entry.name.endswith(JOB_SUFFIXES)
        and not entry.name.startswith(".")
        and now - entry.stat().st_mtime >= quiet_s
    ]
    entries.sort(key=lambda entry: (entry.stat().st_mtime, entry.name))
    return [entry.name for entry in entries]


def claimed_files(spool: Path) -> Iterator[Path]:
    """Job files in running/ (some run by live watchers, some left by a dead one)."""
    for entry in sorted(os.scandir(spool / "running"), key=lambda e: e.name):
        if entry.is_file() and entry.name.endswith(JOB_SUFFIXES):
            yield Path(entry.path)


def settle(job_file: Path, code: int, *, error: str | None = None) -> Path:
    """Move a claimed job to done/ (exit 0, 1) or failed/, its exit code written beside it
    first (a crash in between leaves it in running/, where it is resumed: nothing is lost)."""
    spool = job_file.parent.parent
    where = spool / ("done" if code in (ExitCode.OK, ExitCode.FAILED) else "failed")
    record = {"exit_code": int(code), "run_dir": str(run_dir_of(job_file)), "at": iso(time.time())}
    if error is not None:
        record["error"] = error
        (where / f"{job_file.name}.error.txt").write_text(error + "\n", encoding="utf-8")
    (where / f"{job_file.name}.exit.json").write_bytes(orjson.dumps(record) + b"\n")
    os.rename(job_file, where / job_file.name)
    log.info("worker.job_settled", job=job_file.name, exit_code=int(code), to=where.name)
    return where / job_file.name


class Watcher:
    """Claims, runs and settles the spool's jobs until told to stop (or idle, with once)."""

    def __init__(self, options: WatchOptions) -> None:
        self.options = options
        self.limiter: RateLimiter = limiter_for(options.limits)
        self.controls: dict[str, RunControl] = {}  # claimed name -> its run, while it runs
        self.draining = False
        self.settled: list[tuple[str, int]] = []
        self._slots = anyio.Semaphore(options.jobs)
        self._mine: set[str] = set()  # claimed names this watcher has a task for
        self._broken: set[str] = set()  # failed here for a reason of this process: not retried
        self._wake = anyio.Event()
        self.metrics = RunMetrics() if options.metrics is not None else None

    def _serve_metrics(self, address: MetricsAddress) -> None:
        """One server for the watcher: every job's requests and results, and its own state."""
        metrics = self.metrics
        assert metrics is not None
        metrics.gauge(
            "worker_jobs_running",
            "spooled jobs being run by this watcher",
            lambda: len(self.controls),
        )
        metrics.gauge(
            "worker_jobs_waiting",
            "job files in incoming/",
            lambda: len(waiting(self.options.spool)),
        )
        metrics.gauge(
            "worker_jobs_settled",
            "jobs this watcher moved to done/ or failed/",
            lambda: len(self.settled),
        )
        problem = metrics.serve(address, self.limiter)  # the rate the jobs share
        if problem is not None:
            raise UsageError(problem)

    async def run(self) -> int:
        """Watch until SIGINT/SIGTERM (or, with once, until nothing is left); returns 0, 4 when
        a drain left jobs in running/ to resume, 1 when a job could not be run here (it stays in
        running/, resumable; the log says why)."""
        prepare(self.options.spool)
        if self.options.metrics is not None:
            self._serve_metrics(self.options.metrics)
        try:
            return await self._run_watch()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    async def _run_watch(self) -> int:
        async with anyio.create_task_group() as signals:
            signals.start_soon(self._signals)
            async with anyio.create_task_group() as jobs:
                await self._watch(jobs)
            signals.cancel_scope.cancel()  # every job has ended
        left = any(True for _ in claimed_files(self.options.spool))
        if self.draining and left:
            return ExitCode.INTERRUPTED
        return ExitCode.FAILED if self._broken else ExitCode.OK

    async def _watch(self, jobs: TaskGroup) -> None:
        spool = self.options.spool
        while not self._stopping():
            for job_file in claimed_files(spool):  # left by a dead watcher, or just claimed
                if job_file.name not in self._mine | self._broken and not self._stopping():
                    await self._start(jobs, job_file)
            for name in waiting(spool, self.options.quiet_s):
                if self._stopping():
                    break
                await self._slots.acquire()
                claimed = claim(spool, name)
                self._slots.release()
                if claimed is not None:
                    await self._start(jobs, claimed)
            if self.options.once and self._idle():
                return
            with anyio.move_on_after(self.options.poll_s):
                await self._wake.wait()

    def _stopping(self) -> bool:
        """A drain was asked for (a method: the flag changes while this task awaits)."""
        return self.draining

    def _idle(self) -> bool:
        """Nothing to claim, nothing running here, nothing left in running/ to adopt."""
        spool = self.options.spool
        if self._mine or waiting(spool):
            return False
        return all(f.name in self._broken for f in claimed_files(spool))

    async def _start(self, jobs: TaskGroup, job_file: Path) -> None:
        await self._slots.acquire()
        self._mine.add(job_file.name)
        jobs.start_soon(self._adopt, job_file)

    async def _adopt(self, job_file: Path) -> None:
        """Run one claimed job (fresh, or resumed from its journal) under its run dir's lock;
        skip it when a live watcher holds that lock."""
        try:
            run = run_dir_of(job_file)
            run.path.mkdir(exist_ok=True)
            with run_dir_lock(run):
                if job_file.exists():  # noqa: ASYNC240 (a stat: not settled by another watcher)
                    await self._run(job_file, run)
        except RunDirBusy:
            pass  # a live watcher runs it
        except UsageError as exc:
            log.error("worker.job_not_run", job=job_file.name, why=str(exc))
            self._broken.add(job_file.name)
        except Exception:  # a bug or an OS failure: this job stays resumable; the rest goes on
            log.exception("worker.job_crashed", job=job_file.name)
            self._broken.add(job_file.name)
        finally:
            self._mine.discard(job_file.name)
            self._slots.release()
            self._wake.set()
            self._wake = anyio.Event()

    async def _run(self, job_file: Path, run: RunDir) -> None:
        control = RunControl(self.limiter, self.metrics)
        self.controls[job_file.name] = control
        try:
            if self._stopping():
                return
            try:
                start = await anyio.to_thread.run_sync(lambda: self._prepare(job_file, run))
            except (JobFileError, UsageError) as exc:
                settle(job_file, ExitCode.USAGE, error=str(exc))
                return
            code = await execute(start, self._options_for(start, run), control=control)
            if code == ExitCode.INTERRUPTED and self._stopping():
                log.info("worker.job_left_resumable", job=job_file.name)
                return  # stays in running/: the next watcher resumes it
            self.settled.append((job_file.name, code))
            settle(job_file, code)
        finally:
            del self.controls[job_file.name]

    def _prepare(self, job_file: Path, run: RunDir) -> SegmentStart:
        """The job and its segment (a new run, or the run in `run` resumed): off the loop."""
        job = load_job(job_file)
        if run.holds_run():
            try:
                start = start_resumed(job, run, None, retry_failed=False, force=False)
                gateway = resolve_gateway(self.options.gateway, job, insecure=self.options.insecure)
                check_recorded(run, start.manifest, gateway=gateway)  # the watcher's decides
                return start
            except UsageError as exc:
                raise UsageError(
                    f"{job_file.name} is not resumed: {exc} (drop it in again under a new "
                    "name to start a new run)"
                ) from None
        options = self.options
        gateway = resolve_gateway(options.gateway, job, insecure=options.insecure)
        start = start_new(job, None, gateway=gateway, limits=self._limits_for(job))
        return snapshot_targets(start, run)

    def _limits_for(self, job: Job) -> Limits:
        """The job's limits, with the watcher's rate: --rate is the whole watcher's budget."""
        shared = self.options.limits
        return replace(job.limits, rate=shared.rate, adaptive=shared.adaptive)

    def _options_for(self, start: SegmentStart, run: RunDir) -> RunOptions:
        options, job = self.options, start.job
        resuming = bool(start.manifest.segments)
        gateway = resolve_gateway(options.gateway, job, insecure=options.insecure)
        log.info(
            "worker.job_starting",
            run_dir=str(run),
            resuming=resuming,
            targets=start.plan.total,
            already_final=len(start.finished.done),
        )
        return RunOptions(
            gateway,
            options.credentials,
            self._limits_for(job),
            run,
            resume=resuming,
            progress=False,
            ca_bundle=options.ca_bundle,
            backoff_base_s=options.backoff_base_s,
            backoff_cap_s=options.backoff_cap_s,
        )

    def drain(self, why: str) -> None:
        """Claim nothing more; stop the running jobs as SIGTERM would (they stay resumable)."""
        self.draining = True
        log.warning("worker.watch_draining", why=why, running=len(self.controls))
        for control in list(self.controls.values()):
            control.stop(why)
        self._wake.set()

    async def _signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                name = signal.Signals(signum).name
                if not self.draining:
                    self.drain(f"{name} received by the watcher")
                else:
                    for control in list(self.controls.values()):
                        control.cancel()
