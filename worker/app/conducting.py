"""What a segment's change control shares: the state its parts read and the few acts they
all need (wait while held, pause, append an audit record, save run.json, tell the operator).

:mod:`worker.app.conduct` assembles the parts on it (the window, the stages, the requests,
the status file); the parts import this module only, so none imports another's assembly.
"""

from __future__ import annotations

import sys
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Protocol, TextIO

import anyio
import structlog

from worker.app.wiring import RunOptions
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.enos.client import EnOSClient
from worker.errors import StoreError
from worker.jobs.plan import Plan
from worker.model import Job
from worker.store.audit import AuditLog
from worker.store.control import RequestResult
from worker.store.layout import write_manifest
from worker.store.records import AuditRecord, WindowState
from worker.store.state import Manifest

log = structlog.get_logger("worker.run")
POLL_S = 0.2  # how often a wait looks at its clock and at a stop


class StagesView(Protocol):
    """What the requests and the status file need of a staged run."""

    def waiting(self) -> int | None:
        """The stage waiting for a promotion, if one is."""
        ...

    def promote(self, stage: int, who: str) -> None:
        """Promote the waiting stage."""
        ...

    def where(self) -> str:
        """The stage the run is in, in words."""
        ...

    def status(self) -> dict[str, object]:
        """The current stage for the status file."""
        ...


class WindowView(Protocol):
    """What the status file needs of the job's window."""

    def status(self) -> WindowState:
        """The window as the segment last saw it."""
        ...


class JobSlot(Protocol):
    """A spooled job's place among its watcher's --jobs: lent while the job waits for its
    window or a promotion (another job may run meanwhile), taken back before it goes on."""

    def lend(self) -> None:
        """Give the place up for the wait."""
        ...

    async def take_back(self) -> None:
        """Wait for a place again."""
        ...


class Conduct:
    """The state of one segment's change control and the acts its parts share."""

    def __init__(
        self,
        options: RunOptions,
        engine: Engine,
        client: EnOSClient,
        audit: AuditLog,
        *,
        job: Job,
        plan: Plan,
        manifest: Manifest,
        done: set[int],
        earlier: Counter[str],
        out: TextIO | None,
        spooled: bool,
        clock: Callable[[], float],
        slot: JobSlot | None = None,
    ) -> None:
        self.job, self.plan, self.manifest = job, plan, manifest
        self.options, self.engine, self.client, self.audit = options, engine, client, audit
        self.done = done  # final before this segment (digests)
        self.earlier = earlier  # and their outcomes
        self.run = options.run
        self.out = out
        self.spooled = spooled  # the watcher's job: the rate is the watcher's
        self.slot = slot  # the watcher's job: its place among the watcher's --jobs
        self.clock = clock
        self.started_at = time.time()  # as the engine's deadline counts
        self.phase = "starting"
        self.concurrency = options.limits.concurrency  # allowed now (worker ctl concurrency)
        self.results: deque[RequestResult] = deque(maxlen=32)  # requests carried out
        self.gate_engine: Engine | None = None  # a gate's searches, while they run
        self._held_s = 0.0  # waited for a window, a promotion or a resume: not working time
        self._paused_at: float | None = None  # monotonic time of the pause in force
        self.paused = False
        self.status_failing = False  # the status file could not be written (said once)
        self.stages: StagesView | None = None
        self.window: WindowView | None = None

    async def hold_until(self, done: Callable[[], bool], phase: str, *, held: bool = True) -> bool:
        """Wait until `done()` or a stop (True when done); `held`: the wait is not working
        time (a window, a promotion, a pause), so the segment's rate is not diluted by it."""
        began, before = time.monotonic(), self.phase
        self.phase = phase
        slot = self.slot if held and not done() else None  # a window, a promotion: lent
        if slot is not None:
            slot.lend()
        try:
            while not done():
                if self.engine.stopping:
                    return False  # the slot stays lent: the watcher knows
                await anyio.sleep(POLL_S)
            if slot is not None:
                self.phase = f"{phase}: waiting for one of the watcher's job slots"
                await slot.take_back()
            return not self.engine.stopping
        finally:
            if held:
                self._held_s += time.monotonic() - began
            if self.phase == phase:
                self.phase = before

    def hold(self, *, paused: bool) -> None:
        """An operator's pause (or its end): the engines admit no target (so a crash during a
        pause leaves none in doubt), and the run's own limiter hands out no slot (a target
        mid-way, a gate's search, waits too; the progress line says "paused by operator"). A
        spooled job shares the watcher's limiter: its pause is its own engines' alone."""
        now = time.monotonic()
        if paused and self._paused_at is None:
            self._paused_at = now
        elif not paused and self._paused_at is not None:
            self._held_s += now - self._paused_at
            self._paused_at = None
        self.paused = paused
        self.engine.set_concurrency(0 if paused else self.concurrency)
        if self.gate_engine is not None:
            self.gate_engine.set_concurrency(0 if paused else self.concurrency)
        if not self.spooled:
            self.engine.limiter.hold(paused)

    async def unpaused(self) -> bool:
        """Wait while an operator's pause holds; False when the run stops meanwhile."""
        if not self.paused:
            return not self.engine.stopping
        self.say(f"paused by operator: worker ctl {self.run} resume to go on")
        return await self.hold_until(lambda: not self.paused, "paused by operator", held=False)

    @property
    def held_s(self) -> float:
        """Seconds the segment was held (a window, a promotion, a pause, one in force now):
        not working time, so not in its duration (the achieved rate is the rate sent at)."""
        ongoing = 0.0 if self._paused_at is None else time.monotonic() - self._paused_at
        return self._held_s + ongoing

    def record(self, record: AuditRecord) -> bool:
        """Append an audit record; one that cannot be written stops the run (False)."""
        try:
            self.audit.write(record)
        except StoreError as error:
            self.engine.stop(StopReason.FATAL, str(error))
            return False
        return True

    def save(self) -> bool:
        """Write run.json now (what a resume must know); False (and a stop) when it cannot."""
        try:
            write_manifest(self.run, self.manifest)
        except StoreError as error:
            self.engine.stop(StopReason.FATAL, str(error))
            return False
        return True

    def say(self, text: str) -> None:
        """A line for the operator on the run's output (the log has it as an event too)."""
        if self.options.progress:
            stream = self.out or sys.stderr
            stream.write(f"\n{text}\n")
            stream.flush()
        log.info("worker.change", what=text)
