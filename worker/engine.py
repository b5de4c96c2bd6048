"""The fan-out: K workers pull targets from one shared iterator, pace on the shared limiter,
call the gateway, retry after failures, and hand every attempt and every final result to the
recorder. The engine knows no HTTP, YAML or files: only the small protocols below.

Why workers and a shared iterator: admission happens before any work exists, so memory stays
flat however many targets stream in, and there is no per-item channel cost (an anyio memory
stream costs ~45 us per item when every send and receive yields).

Stopping: :meth:`Engine.stop` (a signal, a deadline, an abort rule, a fatal error) ends
admission and wakes workers that are waiting for the limiter or a backoff; requests in flight
finish (each bounded by the attempt timeout). :meth:`Engine.cancel` also cancels those.
A target that did not reach a final result is simply not in the journal: it is resumable.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

import anyio
import structlog

from worker.errors import EnOSError, RateLimitedError, RetryableError
from worker.model import AbortRule, Attempt, CancelReply, Command, Outcome, Target, TargetResult
from worker.ratelimit import RateLimiter
from worker.retry import RetryPolicy, Verdict

log = structlog.get_logger("worker.engine")


class Canceller(Protocol):
    """What the engine needs from an EnOS client."""

    async def cancel(self, target: Target) -> CancelReply:
        """Cancel the target's command(s); raise a classified EnOSError on failure."""
        ...

    async def get_command(self, target: Target, command_id: str) -> Command:
        """Read one command's current state."""
        ...


class Recorder(Protocol):
    """Where attempts and results go (the audit log and the journal)."""

    def attempt(self, attempt: Attempt, action: str) -> None:
        """Record one HTTP attempt."""

    def result(self, result: TargetResult) -> None:
        """Record one final result."""


class StopReason(StrEnum):
    """Why a run ended."""

    FINISHED = "finished"
    FATAL = "fatal"  # credentials, permission, wrong gateway: exit 3
    ABORTED = "aborted"  # the failure-ratio rule: exit 3
    INTERRUPTED = "interrupted"  # SIGINT/SIGTERM: exit 4
    DEADLINE = "deadline"  # limits.deadline reached: exit 4


@dataclass
class Progress:
    """Live counters, read by the progress display and the abort rule."""

    outcomes: Counter[Outcome] = field(default_factory=Counter)
    in_flight: int = 0
    requests: int = 0

    @property
    def finished(self) -> int:
        """Targets with a final result in this segment."""
        return sum(self.outcomes.values())


class Engine:
    """Runs targets through a Canceller with shared pacing, retries and stop rules."""

    def __init__(
        self,
        client: Canceller,
        recorder: Recorder,
        limiter: RateLimiter,
        *,
        concurrency: int,
        policy: RetryPolicy,
        abort: AbortRule | None = None,
        deadline_at: float | None = None,
        attempt_timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._client = client
        self.recorder = recorder
        self._limiter = limiter
        self._concurrency = concurrency
        self._policy = policy
        self._abort = abort or AbortRule()
        self._deadline_at = deadline_at
        self._attempt_timeout = attempt_timeout
        self._clock = clock
        self._rng = rng or random.Random()
        self._idle_scopes: set[anyio.CancelScope] = set()
        self._group_scope: anyio.CancelScope | None = None
        self.progress = Progress()
        self.stop_reason = StopReason.FINISHED
        self.stop_message = ""
        # An outage, not bad luck: this many transient failures in a row, with no success in
        # between, stop the run before the outage marks many targets `failed` (about one
        # worker's worth of attempts each, so few have used them all); the rest stay resumable.
        self._outage_after = max(10, min(256, concurrency * (policy.attempts - 1)))
        self._failures_in_a_row = 0

    @property
    def rate_limit(self) -> float | None:
        """The limiter's current rate (it moves with 429s, and with rate: auto)."""
        return self._limiter.rate

    @property
    def stopping(self) -> bool:
        """True once a stop was asked for: no new target is admitted."""
        return self.stop_reason is not StopReason.FINISHED

    def stop(self, reason: StopReason, message: str) -> None:
        """Admit nothing more; wake idle workers; let requests in flight finish. First wins."""
        if self.stopping:
            return
        self.stop_reason, self.stop_message = reason, message
        log.warning("worker.stopping", reason=reason.value, why=message)
        for scope in list(self._idle_scopes):
            scope.cancel()

    def cancel(self) -> None:
        """Stop at once: requests in flight are abandoned (their targets stay resumable)."""
        if self._group_scope is not None:
            self._group_scope.cancel()

    async def run(self, targets: Iterator[Target]) -> StopReason:
        """Process every target (or until stopped); returns why the run ended."""
        async with anyio.create_task_group() as group:
            self._group_scope = group.cancel_scope
            workers = anyio.create_task_group()
            if self._deadline_at is not None:
                group.start_soon(self._deadline_timer)
            async with workers:
                for _ in range(self._concurrency):
                    workers.start_soon(self._worker, targets)
            group.cancel_scope.cancel()  # the deadline timer, if any
        return self.stop_reason

    async def _deadline_timer(self) -> None:
        """Stop admitting when the deadline leaves only one attempt's time for what is in flight."""
        assert self._deadline_at is not None
        await anyio.sleep(max(0.0, self._deadline_at - self._attempt_timeout - self._clock()))
        self.stop(StopReason.DEADLINE, "the deadline was reached; the rest is resumable")

    async def _worker(self, targets: Iterator[Target]) -> None:
        while not self.stopping:
            if self._deadline_near():
                self.stop(StopReason.DEADLINE, "the deadline was reached; the rest is resumable")
                return
            target = next(targets, None)
            if target is None:
                return
            await self._process(target)

    def _deadline_near(self, extra_s: float = 0.0) -> bool:
        if self._deadline_at is None:
            return False
        return self._clock() + extra_s + self._attempt_timeout >= self._deadline_at

    async def _sleep_unless_stopped(self, seconds: float) -> bool:
        """Sleep (waiting for a slot or a backoff) unless a stop cuts it short; False if cut."""
        with anyio.CancelScope() as scope:
            self._idle_scopes.add(scope)
            try:
                if self.stopping:
                    scope.cancel()
                await anyio.sleep(seconds)
            finally:
                self._idle_scopes.discard(scope)
        return not scope.cancel_called and not self.stopping

    def _slot_now(self) -> bool:
        """The hot path: a slot free right now, taken without a coroutine (False: go slow)."""
        if self.stopping:
            return False
        wait, held = self._limiter.reserve()
        if held and wait == 0:
            return True
        if held:
            self._limiter.release()  # give it back; _slot() reserves it again and waits
        return False

    async def _slot(self) -> bool:
        """Wait for the shared limiter's next slot; False if the run stopped meanwhile."""
        while True:
            wait, held = self._limiter.reserve()
            if wait > 0 and not await self._sleep_unless_stopped(wait):
                return False
            if held and (wait == 0 or not self._limiter.paused()):
                return not self.stopping

    async def _process(self, target: Target) -> None:
        """Attempt one target until it has a final result, or the run stops."""
        state = _TargetState(started=self._clock())
        while self._slot_now() or await self._slot():
            state.sent += 1
            self.progress.in_flight += 1
            self.progress.requests += 1
            began = time.perf_counter()
            try:
                reply = await self._client.cancel(target)
            except anyio.get_cancelled_exc_class():
                self.recorder.attempt(
                    Attempt(target, state.sent, self._clock(), _ms_since(began), None, None, None,
                            "abandoned", error="cancelled in flight by a second stop signal"),
                    "cancel",
                )  # fmt: skip
                raise
            except EnOSError as error:
                state.latency_ms = _ms_since(began)
                if not await self._after_failure(target, state, error):
                    return
                continue
            finally:
                self.progress.in_flight -= 1
            state.latency_ms = _ms_since(began)
            self._limiter.succeeded()
            self._failures_in_a_row = 0
            if reply.commands or not state.maybe_applied or target.command_id is None:
                self._finish_success(target, state, reply)
            else:
                await self._finish_after_lost_answer(target, state, reply)
            return

    async def _after_failure(self, target: Target, state: _TargetState, error: EnOSError) -> bool:
        """Record a failed attempt and decide; True to try again."""
        if isinstance(error, RetryableError):
            state.maybe_applied |= error.maybe_applied
            if error.http_status == 503:
                self._limiter.slow_down()
            if not isinstance(error, RateLimitedError):
                self._count_outage(error)
        failures = state.sent - state.throttles
        decision = self._policy.decide(
            error, failures=failures, throttles=state.throttles, rng=self._rng
        )
        verdict = decision.verdict
        if verdict is Verdict.RETRY and (
            self.stopping or self._deadline_near(decision.wait_s or 0)
        ):
            verdict = Verdict.FAILED if self._deadline_at is None and not self.stopping else verdict
        self._record_attempt(target, state, error, verdict.value, decision.wait_s)
        if verdict is Verdict.FATAL:
            self.stop(StopReason.FATAL, str(error))
            return False
        if verdict is Verdict.FAILED:
            self._finish(target, state, Outcome.FAILED, error=error)
            return False
        if verdict is Verdict.THROTTLED:
            state.throttles += 1
            self._limiter.throttle(decision.wait_s)
            return True
        return await self._sleep_unless_stopped(decision.wait_s or 0.0)

    def _record_done(self, target: Target, state: _TargetState, reply: CancelReply) -> None:
        self.recorder.attempt(
            Attempt(target, state.sent, self._clock(), state.latency_ms, reply.http_status,
                    reply.code, reply.request_id, "done"),
            "cancel",
        )  # fmt: skip

    def _finish_success(self, target: Target, state: _TargetState, reply: CancelReply) -> None:
        """code 0: cancelled with the ids seen, or nothing to cancel (effect unknown if an
        earlier attempt's answer was lost)."""
        self._record_done(target, state, reply)
        if reply.commands:
            ids = tuple(command.command_id for command in reply.commands)
            self._finish(target, state, Outcome.CANCELLED, ids=ids, reply=reply)
        else:
            unknown = state.maybe_applied
            self._finish(target, state, Outcome.NOTHING_TO_CANCEL, reply=reply, unknown=unknown)

    def _count_outage(self, error: RetryableError) -> None:
        self._failures_in_a_row += 1
        if self._failures_in_a_row >= self._outage_after:
            self.stop(
                StopReason.FATAL,
                f"the gateway failed {self._failures_in_a_row} requests in a row (last: {error}); "
                "stopped before an outage marks targets failed; resume (with --retry-failed) when "
                "it answers again",
            )

    async def _finish_after_lost_answer(
        self, target: Target, state: _TargetState, reply: CancelReply
    ) -> None:
        """Nothing left to cancel after a lost answer, for one command id: ask Get Command."""
        self._record_done(target, state, reply)
        assert target.command_id is not None
        if await self._verify_cancelled(target, target.command_id):
            ids = (target.command_id,)
            self._finish(target, state, Outcome.CANCELLED, ids=ids, reply=reply)
        else:
            self._finish(target, state, Outcome.NOTHING_TO_CANCEL, reply=reply, unknown=True)

    async def _verify_cancelled(self, target: Target, command_id: str) -> bool:
        """After a lost answer: did our earlier attempt cancel the command? (state 2 means yes)

        Get Command is retried like a cancel (transient failures, up to `attempts`); anything
        else leaves the question open (the caller records effect_unknown)."""
        for number in range(1, self._policy.attempts + 1):
            if not await self._slot():
                return False
            began = time.perf_counter()
            self.progress.requests += 1
            try:
                command = await self._client.get_command(target, command_id)
            except EnOSError as error:
                again = isinstance(error, RetryableError) and number < self._policy.attempts
                self.recorder.attempt(
                    Attempt(target, number, self._clock(), _ms_since(began), error.http_status,
                            error.code, error.request_id, "retry" if again else "unverified",
                            error=str(error)),
                    "get",
                )  # fmt: skip
                if not again:
                    return False
                if isinstance(error, RateLimitedError):
                    self._limiter.throttle(error.retry_after)
                elif not await self._sleep_unless_stopped(self._policy.backoff(number, self._rng)):
                    return False
                continue
            self._failures_in_a_row = 0
            self.recorder.attempt(
                Attempt(target, number, self._clock(), _ms_since(began), 200, 0, None,
                        f"state {command.state}"),
                "get",
            )  # fmt: skip
            return command.state == 2
        return False

    def _record_attempt(
        self,
        target: Target,
        state: _TargetState,
        error: EnOSError,
        decision: str,
        wait_s: float | None,
    ) -> None:
        self.recorder.attempt(
            Attempt(target, state.sent, self._clock(), state.latency_ms, error.http_status,
                    error.code, error.request_id, decision, wait_s, str(error)),
            "cancel",
        )  # fmt: skip

    def _finish(
        self,
        target: Target,
        state: _TargetState,
        outcome: Outcome,
        *,
        ids: tuple[str, ...] = (),
        reply: CancelReply | None = None,
        error: EnOSError | None = None,
        unknown: bool = False,
    ) -> None:
        self.recorder.result(
            TargetResult(
                target=target,
                outcome=outcome,
                cancelled_command_ids=ids,
                attempts=state.sent,
                http_status=reply.http_status if reply else error.http_status if error else None,
                code=reply.code if reply else error.code if error else None,
                msg=reply.msg if reply else None,
                request_id=reply.request_id if reply else error.request_id if error else None,
                error=str(error) if error else None,
                started_at=state.started,
                finished_at=self._clock(),
                latency_ms=state.latency_ms,
                effect_unknown=unknown,
            )
        )
        self.progress.outcomes[outcome] += 1
        self._check_abort_rule()

    def _check_abort_rule(self) -> None:
        ratio = self._abort.failure_ratio
        finished = self.progress.finished
        if ratio is None or finished < self._abort.min_finished:
            return
        failed = self.progress.outcomes[Outcome.FAILED]
        if failed / finished >= ratio:
            self.stop(
                StopReason.ABORTED,
                f"{failed} of {finished} finished targets failed ({failed / finished:.0%}), "
                f"at or above abort.failure_ratio {ratio:g}",
            )


@dataclass(slots=True)
class _TargetState:
    """What the engine knows about one target while it is being attempted."""

    started: float
    sent: int = 0
    throttles: int = 0
    maybe_applied: bool = False
    latency_ms: float | None = None


def _ms_since(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 2)
