"""``worker watch SPOOL``: a long-lived worker that runs the job files dropped into a directory.

Layout (the spool must exist, or ``--create``; its subfolders are made when missing)::

    SPOOL/incoming/   job files are dropped here (*.yaml, *.yml), by cron or another system;
                      one is claimed once it has not changed for --unchanged-for seconds
    SPOOL/running/    claimed: renamed here, under a unique name, by the watcher running it
    SPOOL/runs/       one run directory per claimed job, named like its file in running/
    SPOOL/done/       finished jobs (every target final: exit 0 or 1), NAME.exit.json beside each
    SPOOL/failed/     every job that ended without finishing: refused or invalid (2), aborted
                      or crashed (3), past its deadline (4); NAME.exit.json and NAME.error.txt

A claim is one ``rename`` from incoming/ to a name that exists nowhere else, so of several
watchers on one shared volume exactly one gets each file. The run directory's ``run.lock``
(flock, dropped by the kernel when a process dies) says whether a job in running/ is being run:
an unlocked one is resumed from its journal, by whichever watcher locks it first. Several jobs
run at once under one shared limiter (``--rate`` is the watcher's whole budget). SIGTERM drains:
nothing new is claimed, running jobs stop as a run does on SIGTERM and stay in running/,
resumable by the next watcher. Those two (a drain, a job another live watcher holds) are the
only ways a job stays in running/: every other end but finishing files it under failed/.

Every job runs against the watcher's own gateway; a job is refused before anything is read
through it when it names another gateway, a targets file outside the spool, or is a link
(:mod:`worker.app.spoolcheck`). Its targets file, too, must have been still for
--unchanged-for seconds before it is planned.

Targets files move with nothing: a job file refers to them by a path relative to itself, and
incoming/, running/, done/ and failed/ are siblings, so write ``targets_file: ../targets/x.csv``
and keep targets files in ``SPOOL/targets/``.
"""

from __future__ import annotations

import os
import signal
import time
from collections import deque
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

import anyio
import structlog
from anyio.abc import TaskGroup

from worker.app.metrics import MetricsAddress, RunMetrics
from worker.app.prepare import check_recorded, snapshot_targets, start_new, start_resumed
from worker.app.run import RunControl, SegmentStart, execute
from worker.app.spool import (
    JobRefused,
    Settled,
    Slot,
    claim,
    claimed_files,
    make_run_dir,
    open_spool,
    run_dir_of,
    settle,
    unfinished,
    waiting,
)
from worker.app.spoolcheck import check_job, check_job_file, public_text, still
from worker.app.spoolctl import carry_out_spool_requests, watching, write_spool_status
from worker.app.spoolwindow import Waiting, check_window, closed, reopens_at
from worker.app.wiring import RunOptions, limiter_for
from worker.core.ratelimit import RateLimiter
from worker.errors import ExitCode, UsageError
from worker.jobs.parse import load_job
from worker.model import Credentials, Job, Limits
from worker.report.hints import resume_command
from worker.store.control import RequestResult
from worker.store.layout import RunDir, read_summary
from worker.store.lock import RunDirBusy, run_dir_lock

log = structlog.get_logger("worker.watch")


@dataclass(frozen=True)
class WatchOptions:
    """One watcher: its spool, credentials, gateway, the shared rate, how many jobs at once."""

    spool: Path
    credentials: Credentials
    limits: Limits  # rate: the whole watcher's budget; concurrency: per job unless the job's
    gateway: str  # the watcher's own, checked: every job runs against it, whatever it names
    jobs: int = 2
    poll_s: float = 1.0
    once: bool = False  # exit when nothing is left to do (cron, tests)
    ca_bundle: Path | None = None
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    metrics: MetricsAddress | None = None  # serve the watcher's metrics (all its jobs) there
    quiet_s: float = 1.0  # a job file (and its targets file) must not have changed for this long
    create: bool = False  # make the spool when it does not exist


class Watcher:
    """Claims, runs and settles the spool's jobs until told to stop (or idle, with once)."""

    def __init__(self, options: WatchOptions) -> None:
        self.options = options
        self.limiter: RateLimiter = limiter_for(options.limits)
        self.controls: dict[str, RunControl] = {}  # claimed name -> its run, while it runs
        self.draining = False
        self.settled: list[Settled] = []
        self._slots = anyio.Semaphore(options.jobs)
        self._mine: set[str] = set()  # claimed names this watcher has a task for
        self._broken: set[str] = set()  # could not even be settled here: not retried
        self._quota_until = 0.0  # epoch s: the application's quota is spent until then
        self._windows = Waiting()  # the windows of the job files in incoming/
        self.requests: deque[RequestResult] = deque(maxlen=20)  # worker ctl SPOOL, carried out
        self._wake = anyio.Event()
        self._spool = options.spool  # resolved once the spool is opened
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
        a drain left jobs in running/ to resume, 1 when a job could not be settled or (with
        once) went to failed/. UsageError when the spool does not exist (without create)."""
        open_spool(self.options.spool, create=self.options.create)
        self._spool = self.options.spool.resolve()
        if self.options.metrics is not None:
            self._serve_metrics(self.options.metrics)
        try:
            with watching(self._spool):  # worker ctl SPOOL sees a live watcher
                write_spool_status(self._spool, self.limiter, self.requests)
                return await self._run_watch()
        finally:
            if self.metrics is not None:
                self.metrics.close()

    async def _run_watch(self) -> int:
        async with anyio.create_task_group() as signals:
            signals.start_soon(self._signals)
            signals.start_soon(self._spool_requests)
            async with anyio.create_task_group() as jobs:
                await self._watch(jobs)
            signals.cancel_scope.cancel()  # every job has ended
        return self._exit_code()

    def _exit_code(self) -> int:
        """4 when a drain left jobs in running/ (resumable: the contract's "try again"); 1
        when a job could not be settled, or with once when one went to failed/ (a cron entry
        must see it); 4 with once when jobs wait for their window; else 0."""
        left = any(True for _ in claimed_files(self.options.spool))
        if (self.draining or self._quota_spent()) and left:
            return ExitCode.INTERRUPTED  # drained, or waiting for the gateway's quota
        failed = any(not settled.finished for settled in self.settled)
        if self._broken or (self.options.once and failed):
            return ExitCode.FAILED
        if self.options.once and self._window_waits():
            return ExitCode.INTERRUPTED  # jobs wait for their window: a later watcher runs them
        return ExitCode.OK

    async def _watch(self, jobs: TaskGroup) -> None:
        spool = self.options.spool
        while not self._stopping():
            for job_file in claimed_files(spool):  # left by a dead watcher, or just claimed
                if self._adoptable(job_file):
                    await self._start(jobs, job_file)
            self._windows.keep_only(waiting(spool))
            for name in self._claimable(spool, self.options.quiet_s):
                if self._stopping() or self._quota_spent():
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

    def _waits_for_quota(self, run: RunDir) -> bool:
        """Whether the job's run stopped for the gateway's spent quota, which has not reset
        yet: then it is neither settled nor resumed, and no other job is started, until the
        reset (every job of this watcher shares the application's quota)."""
        summary = read_summary(run) if run.summary.exists() else None
        if summary is None or summary.stopped != "quota" or not summary.quota_reset_at:
            return False
        reset = datetime.fromisoformat(summary.quota_reset_at.replace("Z", "+00:00")).timestamp()
        self._quota_until = max(self._quota_until, reset)
        return time.time() < reset

    def _quota_spent(self) -> bool:
        """The application's quota is spent until a reset a job reported."""
        return time.time() < self._quota_until

    def _stopping(self) -> bool:
        """A drain was asked for (a method: the flag changes while this task awaits)."""
        return self.draining

    def _adoptable(self, job_file: Path) -> bool:
        """A job in running/ this watcher may start now: not its own already, not broken, not
        waiting for the gateway's quota (also as its run directory says, after a restart)."""
        if job_file.name in self._mine | self._broken or self._stopping():
            return False
        run = run_dir_of(job_file)
        return not (self._quota_spent() or self._waits_for_quota(run) or closed(run, time.time()))

    def _idle(self) -> bool:
        """Nothing to claim, nothing running here, nothing left in running/ to adopt (with
        --once, a job waiting for the gateway's quota counts as left, not as work)."""
        spool = self.options.spool
        if self._mine or (self._claimable(spool, 0.0) and not self._quota_spent()):
            return False
        return all(
            f.name in self._broken
            or self._waits_for_quota(run_dir_of(f))
            or closed(run_dir_of(f), time.time())
            for f in claimed_files(spool)
        )

    def _claimable(self, spool: Path, quiet_s: float) -> list[str]:
        """The job files in incoming/ still for `quiet_s` seconds whose window (if any) lets
        them be claimed now: one waiting for its window holds no slot."""
        names = waiting(spool, quiet_s)
        return self._windows.claimable(spool / "incoming", names, time.time())

    def _window_waits(self) -> bool:
        """Whether a job waits for its window (in incoming/ or in running/)."""
        spool = self.options.spool
        if len(self._claimable(spool, 0.0)) < len(waiting(spool)):
            return True
        return any(closed(run_dir_of(f), time.time()) for f in claimed_files(spool))

    async def _start(self, jobs: TaskGroup, job_file: Path) -> None:
        await self._slots.acquire()
        self._mine.add(job_file.name)
        jobs.start_soon(self._adopt, job_file, Slot(self._slots))

    async def _adopt(self, job_file: Path, slot: Slot) -> None:
        """Run one claimed job (fresh, or resumed from its journal) and settle it; skip it
        when a live watcher holds its run directory. Only a job that cannot even be settled
        (failed/ cannot be written) stays in running/ without a reason: then the watcher
        exits 1 and its log says why."""
        try:
            await self._adopt_locked(job_file, slot)
        except RunDirBusy:
            pass  # a live watcher runs it
        except Exception:
            log.exception("worker.job_not_settled", job=job_file.name)
            self._broken.add(job_file.name)
        finally:
            self._mine.discard(job_file.name)
            slot.give_up()
            self._wake.set()
            self._wake = anyio.Event()

    async def _adopt_locked(self, job_file: Path, slot: Slot) -> None:
        """Under the run directory's lock: every end of the job but a finish or a drain files
        it under failed/ with why (a bad job 2, a crash 3)."""
        try:
            run = make_run_dir(job_file)
        except JobRefused as exc:
            self._fail(job_file, exc, ExitCode.USAGE)
            return
        with run_dir_lock(run):
            if not os.path.lexists(job_file):  # noqa: ASYNC240 (a stat: settled elsewhere)
                return
            try:
                await self._run(job_file, run, slot)
            except UsageError as exc:  # the job, its targets, a run that cannot be resumed
                self._fail(job_file, exc, ExitCode.USAGE)
            except Exception as exc:  # a bug or an OS failure: this job ends, the rest goes on
                log.exception("worker.job_crashed", job=job_file.name)
                self._fail(job_file, self._crash(job_file, run, exc), ExitCode.ABORTED)

    async def _run(self, job_file: Path, run: RunDir, slot: Slot) -> None:
        """Load and check the job, wait for its targets file to be still, run a segment and
        settle it; a drain leaves it in running/ (at any of these steps)."""
        control = RunControl(self.limiter, self.metrics, slot)
        self.controls[job_file.name] = control
        try:
            if self._stopping():
                return
            job = await anyio.to_thread.run_sync(lambda: self._load(job_file))
            if not await self._targets_still(job):
                return
            start = await anyio.to_thread.run_sync(lambda: self._segment(job, job_file, run))
            code = await execute(start, self._options_for(start, run), control=control)
            if code == ExitCode.INTERRUPTED and self._stopping():
                log.info("worker.job_left_resumable", job=job_file.name)
                return  # stays in running/: the next watcher resumes it
            if code == ExitCode.INTERRUPTED and self._waits_for_quota(run):
                log.info("worker.job_waits_for_quota", job=job_file.name)
                return  # stays in running/: resumed once the gateway's quota has reset
            if code == ExitCode.INTERRUPTED and reopens_at(run) is not None:
                log.info("worker.job_waits_for_window", job=job_file.name)
                return  # stays in running/: resumed when its window opens again
            self._settle_run(job_file, run, code)
        finally:
            del self.controls[job_file.name]

    def _load(self, job_file: Path) -> Job:
        """The job, read only when it is a file of its own, and refused before its targets
        are read when it reaches past the spool's trust (spoolcheck). Off the loop."""
        check_job_file(job_file)
        job = load_job(job_file)
        check_job(job, spool=self._spool, gateway=self.options.gateway)
        check_window(job, time.time())
        return job

    async def _targets_still(self, job: Job) -> bool:
        """Wait until the job's targets file is still (spoolcheck.still); False when a drain
        comes first."""
        if job.targets_file is None:
            return True
        options = self.options
        return await still(job.targets_file.path, options.quiet_s, options.poll_s, self._stopping)

    async def _spool_requests(self) -> None:
        """worker ctl SPOOL rate N: the requests in SPOOL/control/, twice a second."""
        while True:
            await anyio.to_thread.run_sync(
                carry_out_spool_requests, self._spool, self.limiter, self.requests
            )
            await anyio.sleep(0.5)

    def _segment(self, job: Job, job_file: Path, run: RunDir) -> SegmentStart:
        """The job's segment: a new run, or the run in `run` resumed. Off the loop."""
        if run.holds_run():
            try:
                start = start_resumed(job, run, None, retry_failed=False, force=False)
                check_recorded(run, start.manifest, gateway=self.options.gateway)  # its own
                return start
            except UsageError as exc:
                raise UsageError(
                    f"{job_file}: not resumed: {exc} (drop the job in again under a new name "
                    "to start a new run)"
                ) from None
        limits = self._limits_for(job)
        start = start_new(job, None, gateway=self.options.gateway, limits=limits)
        return snapshot_targets(start, run)

    def _limits_for(self, job: Job) -> Limits:
        """The job's limits, with the watcher's rate: --rate is the whole watcher's budget."""
        shared = self.options.limits
        return replace(job.limits, rate=shared.rate, adaptive=shared.adaptive)

    def _options_for(self, start: SegmentStart, run: RunDir) -> RunOptions:
        """A new or resumed segment's settings: the watcher's gateway, never the job's nor
        the one run.json recorded (a run directory is as writable as the spool)."""
        options, job = self.options, start.job
        resuming = bool(start.manifest.segments)
        log.info(
            "worker.job_starting",
            run_dir=str(run),
            resuming=resuming,
            targets=start.plan.total,
            already_final=len(start.finished.done),
        )
        return RunOptions(
            options.gateway,
            options.credentials,
            self._limits_for(job),
            run,
            resume=resuming,
            progress=False,
            ca_bundle=options.ca_bundle,
            backoff_base_s=options.backoff_base_s,
            backoff_cap_s=options.backoff_cap_s,
        )

    def _settle_run(self, job_file: Path, run: RunDir, code: int) -> None:
        """done/ when the run finished (every target final), else failed/ with why: an exit
        code of 0 or 1 alone does not prove it (a segment cut short must not pass)."""
        verdict = unfinished(run, code)
        if verdict is None:
            self.settled.append(settle(job_file, code, finished=True))
            return
        log.warning("worker.job_not_finished", job=job_file.name, stop_message=verdict.message)
        said = public_text(UsageError(verdict.message), self._roots()) if verdict.message else ""
        stopped = JobRefused(
            f"{job_file}: the run stopped before every target was done: {verdict.what}. It "
            f"is resumable: {resume_command(str(self._failed(job_file)), run)}"
            + (f"\nwhy it stopped: {said}" if said else "")
        )
        code = code if code not in (ExitCode.OK, ExitCode.FAILED) else ExitCode.ABORTED
        self._fail(job_file, stopped, code)

    def _crash(self, job_file: Path, run: RunDir, exc: Exception) -> JobRefused:
        """What the spool's users read about a crash: its kind, not its text (which may quote
        anything); the log has the traceback."""
        return JobRefused(
            f"{job_file}: the job could not be run: an internal error "
            f"({type(exc).__name__}); the watcher's log says more. If its run started, it is "
            f"resumable: {resume_command(str(self._failed(job_file)), run)}"
        )

    def _fail(self, job_file: Path, error: Exception, code: int) -> None:
        """File a job that did not finish under failed/: the whole message to the watcher's
        log, the public one (no file content) beside the job, naming it where it now is."""
        log.error("worker.job_failed", job=job_file.name, exit_code=int(code), why=str(error))
        text = public_text(error, self._roots()).replace(str(job_file), str(self._failed(job_file)))
        try:
            self.settled.append(settle(job_file, code, finished=False, error=text))
        except FileNotFoundError:  # another watcher refused it at the same moment
            log.info("worker.job_settled_elsewhere", job=job_file.name)

    def _failed(self, job_file: Path) -> Path:
        """Where a claimed job goes when it does not finish."""
        return self.options.spool / "failed" / job_file.name

    def _roots(self) -> tuple[Path, ...]:
        """Where a problem's location may be (kept in a public message): inside the spool."""
        return (self.options.spool, self._spool)

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
