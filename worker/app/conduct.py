"""A segment run like a change: its window, an operator's live hand, and its stages.

The conductor wraps what the engine does in a segment. Its body (in place of one
``engine.run``) waits for the job's window to open, proves the gateway, and runs the targets,
all at once or stage by stage behind verify gates (:mod:`worker.app.staged`). Beside the
engine it keeps three tasks: the control loop (``worker ctl`` requests, within a second:
:mod:`worker.app.controls`), the status file (every second: :mod:`worker.app.status`) and
the window's closing (:mod:`worker.app.windowed`).

Every decision it takes is an audit record (``control``, ``window``, ``stage``, ``gate``),
and what a resume must know is in run.json (the pause, the stages, the window), written
before the segment goes on: a ``kill -9`` in any wait loses nothing and claims nothing.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from functools import partial
from typing import Any, TextIO

import anyio

from worker.app.conducting import Conduct, JobSlot
from worker.app.controls import control_loop
from worker.app.staged import StagedRun
from worker.app.status import status_loop, write_last_status
from worker.app.windowed import WindowWatch
from worker.app.wiring import RunOptions, proven
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.enos.client import EnOSClient
from worker.errors import StoreError
from worker.jobs.plan import Plan, run_targets
from worker.model import Job, Target
from worker.store.audit import AuditLog
from worker.store.done import Finished
from worker.store.state import Manifest, Summary
from worker.store.tally import JournalFold

Helper = Callable[[], Coroutine[Any, Any, None]]
Resolve = Callable[[], Awaitable[tuple[Job, Plan] | None]]  # a targets_query into its snapshot


class Conductor(Conduct):
    """One segment's change control: the window, the operator's requests, the stages."""

    def __init__(
        self,
        segment: tuple[Job, Plan, Manifest, Finished, JournalFold],
        options: RunOptions,
        engine: Engine,
        client: EnOSClient,
        audit: AuditLog,
        *,
        out: TextIO | None = None,
        spooled: bool = False,
        clock: Callable[[], float] = time.time,
        resolve: Resolve | None = None,
        slot: JobSlot | None = None,
    ) -> None:
        job, plan, manifest, finished, fold = segment
        super().__init__(
            options,
            engine,
            client,
            audit,
            job=job,
            plan=plan,
            manifest=manifest,
            done=finished.done,
            earlier=fold.counts.outcomes,
            out=out,
            spooled=spooled,
            clock=clock,
            slot=slot,
        )
        self.watch = WindowWatch(self) if job.window is not None else None
        self.resolve = resolve  # a targets_query: its targets are found once the window opens
        staged = (job.stages or manifest.stages) and resolve is None
        self.staged = StagedRun(self) if staged else None
        self.window, self.stages = self.watch, self.staged
        if manifest.paused is not None:  # paused before: a resumed run waits for resume
            self.hold(paused=True)

    def helpers(self) -> list[Helper]:
        """The tasks beside the engine: requests, the status file, the window's closing."""
        found: list[Helper] = [partial(control_loop, self), partial(status_loop, self)]
        if self.watch is not None:
            found.append(self.watch.close_loop)
        if self.options.limits.deadline is not None:
            found.append(self._deadline_loop)
        return found

    async def _deadline_loop(self) -> None:
        """The deadline holds in every wait too (for the window, a gate, a promotion), not
        only while the engine sends (its own timer stops it an attempt's time earlier)."""
        deadline = self.options.limits.deadline
        assert deadline is not None
        await anyio.sleep(max(0.0, self.started_at + deadline - time.time()))
        self.engine.stop(StopReason.DEADLINE, "the deadline was reached; the rest is resumable")

    async def body(self, targets: Iterator[tuple[int, Target]]) -> StopReason:
        """The segment's work in place of one engine.run: the window, the gateway proof, then
        the targets (stage by stage for a staged job); returns why it ended."""
        engine = self.engine
        if self.staged is not None and not self.staged.ready():
            return engine.stop_reason
        if self.watch is not None and not await self.watch.wait_open():
            return engine.stop_reason
        if not await self.unpaused():
            return engine.stop_reason
        async with proven(self.client, self.options) as refused:
            if refused is not None:
                engine.stop(StopReason.FATAL, refused)
                return engine.stop_reason
            return await self._proven(targets)

    async def _proven(self, targets: Iterator[tuple[int, Target]]) -> StopReason:
        """The gateway proven: the query resolved (if the job has one), then the targets."""
        if self.resolve is not None:
            if not await self._resolved():
                return self.engine.stop_reason
            targets = run_targets(self.job, self.plan, self.done)
        self.phase = "running"
        if self.staged is not None:
            return await self.staged.run()
        return await self.engine.run(targets)

    async def _resolved(self) -> bool:
        """The job's query resolved into the run's snapshot: the segment goes on over it (its
        stages planned on what was found). False: nothing to send (the engine says why)."""
        assert self.resolve is not None
        self.phase = "resolving the targets query"
        try:
            ready = await self.resolve()
        except StoreError as error:  # the run directory can no longer be written
            self.engine.stop(StopReason.FATAL, str(error))
            return False
        if ready is None:
            return False
        self.job, self.plan = ready
        self.engine.progress.targets = self.plan.total
        if self.job.stages:
            self.staged = self.stages = StagedRun(self)
            return self.staged.ready()
        return True

    def ended(self, summary: Summary) -> None:
        """The status file's last word: the segment ended, how, and its exit code."""
        self.phase = "ended"
        write_last_status(self, summary)
