"""The async driver of the per-target core: K workers, one shared limiter, parked retries.

Every decision is :mod:`worker.core.decide`'s; this module only carries the actions out. A worker
takes the next piece of work (a parked target whose wait is over, else a new target from the
shared iterator), waits for a slot of the shared limiter, sends the call, tells the target's
core what came back and does what it answers: send again, park the target, record its
result, or stop the run. The engine knows no HTTP, YAML or files: only the protocols below.

Why workers and a shared iterator: admission happens before any work exists, so memory stays
flat however many targets stream in, and there is no per-item channel cost (an anyio memory
stream costs ~45 us per item when every send and receive yields).

Why parked retries: a target waiting out its backoff holds no worker, so the concurrency bounds
the requests in flight, not the targets that are waiting. With one in five answers a 5xx, a
worker asleep in each backoff would otherwise leave too few to keep the rate.

The gateway's budget: what an answer's headers state goes to the limiter (which paces to it);
a 429 met while the run waits for a spent quota is the run's wait, not the target's (it uses
none of its throttles); a quota wait that does not fit the run (past the deadline, or over an
hour) ends the segment with :attr:`StopReason.QUOTA` and :attr:`Engine.quota_reset_at`.

Stopping: :meth:`Engine.stop` (a signal, a deadline, an abort rule, a fatal error) ends
admission and wakes idle workers; requests in flight finish (each bounded by the attempt
timeout); parked targets are left without a result. :meth:`Engine.cancel` also cancels the
requests in flight. A target without a final result is not in the journal: it is resumable.
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable, Iterator

import anyio
import structlog

from worker.core.actions import (
    PLAIN_CANCEL,
    Action,
    Finish,
    Send,
    Situation,
    StopRun,
    Wait,
)
from worker.core.admission import Admission
from worker.core.batching import LIST_CANCEL, BatchCore, Fanout
from worker.core.calls import (
    action_name,
    ask,
    attempt_of,
    batch_plan,
    decision_after,
    ms_since,
    unreadable_text,
)
from worker.core.decide import TargetCore
from worker.core.pacing import Pacer
from worker.core.ports import (
    Admissions,
    Answer,
    Canceller,
    EngineSettings,
    Progress,
    Recorder,
    StopReason,
)
from worker.core.ratelimit import RateLimiter
from worker.core.stops import QuotaWatch, Stop, StopRules
from worker.errors import (
    EnOSError,
    RateLimitedError,
    RetryableError,
    StoreError,
    UnreadableAnswerError,
)
from worker.model import Attempt, CancelReply, Decided, SearchPage, Target, TargetResult

log = structlog.get_logger("worker.engine")


Core = TargetCore | BatchCore
Work = tuple[Core, Action | Fanout]


class Engine:
    """Runs targets through a Canceller with shared pacing, retries and stop rules."""

    def __init__(
        self,
        client: Canceller,
        recorder: Recorder,
        limiter: RateLimiter,
        settings: EngineSettings,
        *,
        admissions: Admissions | None = None,
        sent_before: Callable[[int, Target], bool] | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self.recorder = recorder
        self._limiter = limiter
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self._max_waiting = settings.max_waiting or max(4096, 64 * settings.concurrency)
        self._pacer = Pacer(limiter, lambda: self.stopping)
        self._group_scope: anyio.CancelScope | None = None
        self._parked: list[tuple[float, int, Core]] = []
        self._parked_seq = 0
        self._busy = 0
        self._allowed = settings.concurrency  # workers that may drive at once (worker ctl)
        self.batching = batch_plan(settings)
        self._admission = Admission(
            settings,
            self.batching,
            admissions=admissions,
            sent_before=sent_before,
            clock=clock,
            stop=self.stop,
        )
        self._wake: anyio.Event | None = None
        self.progress = Progress()
        self.stop_reason = StopReason.FINISHED
        self.stop_message = ""
        self._quota = QuotaWatch(limiter, settings, self._clock, self.stop)
        self._rules = StopRules(settings)

    @property
    def limiter(self) -> RateLimiter:
        """The shared limiter (its rate moves with 429s, overload, and rate: auto)."""
        return self._limiter

    @property
    def quota_reset_at(self) -> float | None:
        """When the gateway's quota resets (epoch s), if the run stopped for it."""
        return self._quota.reset_at

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for: no new target is admitted."""
        return self.stop_reason is not StopReason.FINISHED

    def must_stop(self) -> bool:
        """For calls made beside the engine's own (a query's searches): whether to send nothing
        more. A quota wait that does not fit the run stops it here, as it stops the engine's."""
        self._quota.check()
        return self.stopping

    def heard(self, error: EnOSError) -> EnOSError:
        """A failed call beside the engine's own (a query's search), heard by the limiter as
        theirs are (a 429 during a quota pause is the run's wait)."""
        return self._quota.heard(error, self.progress.in_flight)

    def stop(self, reason: StopReason, message: str) -> None:
        """Admit nothing more; wake idle workers; let requests in flight finish. First wins."""
        if self.stopping:
            return
        self.stop_reason, self.stop_message = reason, message
        log.warning("worker.stopping", reason=reason.value, why=message)
        self._pacer.wake()
        self._notify()

    def set_concurrency(self, workers: int) -> int:
        """At most `workers` targets driven at once from now on, up to the workers this run
        started (0: none is admitted, a pause); returns the number in force (worker ctl)."""
        self._allowed = max(0, min(workers, self._settings.concurrency))
        self._notify()
        return self._allowed

    def cancel(self) -> None:
        """Stop at once: requests in flight are abandoned (their targets stay resumable)."""
        if self._group_scope is not None:
            self._group_scope.cancel()

    async def run(self, targets: Iterator[tuple[int, Target]]) -> StopReason:
        """Process every (ordinal, target) (or until stopped); returns why the run ended."""
        self._admission.start(targets)  # a staged run runs the engine again for each stage
        self._wake = anyio.Event()
        async with anyio.create_task_group() as group:
            self._group_scope = group.cancel_scope
            if self._settings.deadline_at is not None:
                group.start_soon(self._deadline_timer)
            async with anyio.create_task_group() as workers:
                for _ in range(self._settings.concurrency):
                    workers.start_soon(self._worker)
            group.cancel_scope.cancel()  # the deadline timer, if any
        for _, _, core in self._parked:  # a list answered but not yet verified keeps its results
            self._settle(core, core.stopped())
        return self.stop_reason

    # -- finding work -------------------------------------------------------------------------

    async def _worker(self) -> None:
        while (work := await self._next_work()) is not None:
            await self._drive(*work)

    async def _next_work(self) -> Work | None:
        """A parked target whose wait is over, else a new one; None when all is done."""
        while not self.stopping:
            if self._busy >= self._allowed:  # an operator lowered the concurrency
                await self._idle(math.inf)
                continue
            parked = self._parked
            if parked and parked[0][0] <= time.monotonic():
                due = heapq.heappop(parked)[2]
                self.progress.waiting -= 1
                return due, due.waited(self._situation())
            if self._admission.open and len(parked) < self._max_waiting and not self._verifying():
                admitted = self._admit()
                if admitted is not None:
                    return admitted, admitted.start()
                continue
            if not parked and not self._busy and not self._admission.open:
                self._notify()  # the other idle workers end too
                return None
            await self._idle(parked[0][0] - time.monotonic() if parked else math.inf)
        return None

    def _verifying(self) -> bool:
        """A trial list's assets are being searched: they have the rate to themselves (new
        targets would otherwise queue before them at the limiter and stretch the trial)."""
        plan = self.batching
        return plan is not None and plan.searching > 0

    def _admit(self) -> Core | None:
        """The next target (or list), unless the deadline leaves no time for it."""
        if self._settings.deadline_at is not None and self._deadline_near():
            self.stop(StopReason.DEADLINE, "the deadline was reached; the rest is resumable")
            return None
        return self._admission.next()

    async def _idle(self, seconds: float) -> None:
        """Wait until work may be there: a parked target is due, or something changed."""
        assert self._wake is not None
        event = self._wake
        with anyio.move_on_after(seconds):
            await event.wait()

    def _notify(self) -> None:
        """Wake every idle worker (a target was parked, the last one finished, a stop)."""
        if self._wake is not None:
            self._wake.set()
            self._wake = anyio.Event()

    # -- carrying out a target's actions ------------------------------------------------------

    async def _drive(self, core: Core, action: Action | Fanout) -> None:
        """Send as the core asks until it finishes, waits, leaves or stops the run."""
        self._busy += 1
        try:
            while isinstance(action, Send):
                if not (self._pacer.slot_now() or await self._pacer.slot(self._quota.check)):
                    action = core.stopped()
                    break
                action = await self._call(core, action)
            self._settle(core, action)
        finally:
            self._busy -= 1
            lowered = self._allowed < self._settings.concurrency
            if lowered or (not self._busy and not self._admission.open and not self._parked):
                self._notify()

    async def _call(self, core: Core, send: Send) -> Action | Fanout:
        """One HTTP call; the core's answer to what came back. Never raises for an answer."""
        target, progress = core.target, self.progress
        number = core.sent  # the core may hand out the next call before this one is recorded
        progress.in_flight += 1
        progress.requests += 1
        began = time.perf_counter()
        try:
            if send is PLAIN_CANCEL:  # the hot path: no extra coroutine frame
                answer: Answer = await self._client.cancel(target)
            elif send is LIST_CANCEL:
                assert isinstance(core, BatchCore)
                answer = await self._client.cancel_assets([m.target for m in core.members])
            else:
                answer = await ask(self._client, send, core.target)
        except anyio.get_cancelled_exc_class():
            progress.abandoned += 1
            error = "cancelled in flight by a second stop signal"
            record = attempt_of(
                core.target,
                core.batch,
                send,
                number=number,
                at=self._clock(),
                latency=ms_since(began),
                decision=Decided.ABANDONED,
                error=error,
            )
            self._audit(record, action_name(send))
            if isinstance(core, BatchCore):  # a list's answer already obtained is kept
                self._settle(core, core.stopped())
            raise
        except EnOSError as error:
            return self._after_error(core, send, number, error, began)
        except Exception as exc:  # the client failed on an answer: the target, not the run
            log.exception("worker.unreadable_answer", target=target.describe())
            unreadable = UnreadableAnswerError(unreadable_text(exc))
            return self._after_error(core, send, number, unreadable, began)
        finally:
            progress.in_flight -= 1
        return self._after_answer(core, send, number, answer, began)

    def _after_answer(
        self, core: Core, send: Send, number: int, answer: Answer, began: float
    ) -> Action | Fanout:
        latency, now = ms_since(began), self._clock()
        self._limiter.accepted()
        self._rules.answered()
        status, code, request_id, stated = 200, 0, None, None
        batch = core.batch  # as the call named it (a list's verification changes it)
        action: Action | Fanout
        if isinstance(answer, CancelReply):
            action = core.cancelled(answer, now, latency)
            status, code, request_id = answer.http_status, answer.code, answer.request_id
            stated = answer.budget
        elif isinstance(answer, SearchPage):
            action = core.searched(answer, now, latency)
            request_id, stated = answer.request_id, answer.budget
        else:
            assert isinstance(core, TargetCore)
            action = core.got_command(answer, now, latency)
        if stated is not None:  # the limiter paces to it, less what the answer could not count
            self._limiter.budget(stated, self.progress.in_flight)
        record = attempt_of(
            core.target,
            batch,
            send,
            number=number,
            at=now,
            latency=latency,
            decision=Decided.DONE,
            status=status,
            code=code,
            request_id=request_id,
        )
        self._audit(record, action_name(send))
        return action

    def _after_error(
        self, core: Core, send: Send, number: int, error: EnOSError, began: float
    ) -> Action | Fanout:
        latency = ms_since(began)
        error = self.heard(error)
        if isinstance(error, RateLimitedError):
            pass  # flow control (or the run's quota wait): no stop rule reads it
        elif isinstance(error, RetryableError):
            self._stop_if(self._rules.transient(error))
        else:
            error, stop = self._rules.refused(error)  # a held refusal comes back retryable
            self._stop_if(stop)
        now, batch = self._clock(), core.batch
        action = core.failed(error, now, latency, self._rng, self._situation())
        decision, wait_s = decision_after(action, send.kind)
        record = attempt_of(
            core.target,
            batch,
            send,
            number=number,
            at=now,
            latency=latency,
            decision=decision,
            status=error.http_status,
            code=error.code,
            request_id=error.request_id,
            wait_s=wait_s,
            error=str(error),
        )
        self._audit(record, action_name(send))
        return action

    def _settle(self, core: Core, action: Action | Fanout) -> None:
        """Carry out where a target's turn ended: a result, a wait, a stop, or nothing."""
        if isinstance(action, Finish):
            self._finish(action.result)
        elif isinstance(action, Wait):
            self._park(core, action.seconds if action.seconds is not None else 1.0)
        elif isinstance(action, Fanout):
            for result in action.results:
                self._finish(result)
            for part in action.parts:
                self._park(part, 0.0)
            self._notify()  # admission may go on (a trial's searches ended)
        elif isinstance(action, StopRun):
            self.stop(StopReason.FATAL, action.why)

    def _park(self, core: Core, seconds: float) -> None:
        heapq.heappush(self._parked, (time.monotonic() + seconds, self._parked_seq, core))
        self._parked_seq += 1
        self.progress.waiting += 1
        self._notify()

    def _situation(self) -> Situation:
        deadline = self._settings.deadline_at
        return Situation(
            stopping=self.stopping,
            time_left_s=None if deadline is None else deadline - self._clock(),
            attempt_timeout_s=self._settings.attempt_timeout,
        )

    # -- stop rules -----------------------------------------------------------------------------

    async def _deadline_timer(self) -> None:
        """Stop admitting when the deadline leaves only one attempt's time for what is in flight."""
        deadline = self._settings.deadline_at
        assert deadline is not None
        await anyio.sleep(max(0.0, deadline - self._settings.attempt_timeout - self._clock()))
        self.stop(StopReason.DEADLINE, "the deadline was reached; the rest is resumable")

    def _deadline_near(self) -> bool:
        deadline = self._settings.deadline_at
        return deadline is not None and self._clock() + self._settings.attempt_timeout >= deadline

    def _stop_if(self, stop: Stop | None) -> None:
        if stop is not None:
            self.stop(*stop)

    def _audit(self, attempt: Attempt, action: str) -> None:
        """Record an attempt; a record that cannot be written stops the run."""
        try:
            self.recorder.attempt(attempt, action)
        except StoreError as error:
            self.stop(StopReason.FATAL, str(error))

    def _finish(self, result: TargetResult) -> None:
        """Record a final result (unless the records can no longer be written: then the target
        stays without one, resumable) and apply the stop rules."""
        try:
            self.recorder.result(result)
        except StoreError as error:
            self.stop(StopReason.FATAL, str(error))
            return
        self.progress.outcomes[result.outcome] += 1
        self._stop_if(self._rules.finished(self.progress))
