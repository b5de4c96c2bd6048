"""The per-target decisions as a pure state machine (sans-IO): an event in, the next action out.

The engine's async code only carries actions out (send a call, park the target for a while,
record a result, stop the run) and tells the machine what happened. Every rule about retries,
lost answers, stops and what a result may claim lives here, where a test drives it with plain
values and no event loop.

The truth rules (design.md, "Lost responses"):

- A result lists a command as cancelled only when a cancel reply of this run listed it.
- After an attempt that may have taken effect without an answer (timeout, dropped connection,
  cut-off body, 5xx), or when an earlier segment may have sent the target before it died, a
  retry that finds nothing is ``nothing_to_cancel`` with ``effect_unknown``. For one
  ``command_id`` a Get Command may then be asked: its state is kept as evidence
  (``get_state``), never as proof.
- A target that fails after such an attempt is ``failed`` with ``effect_unknown`` too.

::

    start() ──> Send(first) ──reply──> Finish | Send(GET) ──reply/error──> Finish
                    │
                    └─error──> Wait(s) ──waited()──> Send(same) ...
                           └─> Finish(failed) | StopRun(fatal) | Leave(stopping, deadline)
"""

from __future__ import annotations

import random

from worker.core.actions import (
    RUNNING,
    SENDS,
    Action,
    Finish,
    Kind,
    Leave,
    Send,
    Situation,
    after_failure,
)
from worker.core.retry import Retrying, RetryPolicy
from worker.errors import EnOSError
from worker.model import CancelReply, Command, Outcome, SearchPage, Target, TargetResult


class TargetCore:
    """One target from its first call to its final result (or to being left resumable).

    `sent_before`: an earlier segment may have sent this target before it died (or a
    ``--retry-failed`` target failed after an answer was lost). `verify`: after a lost answer
    and an empty retry for one command id, ask Get Command for evidence.
    """

    batch: tuple[Target, ...] = ()  # one target per call (a BatchCore lists several)

    __slots__ = (
        "_get",
        "_pending_reply",
        "_phase",
        "_policy",
        "_retry",
        "_selection",
        "earlier_ids",
        "last_latency_ms",
        "last_request_id",
        "maybe_applied",
        "sent",
        "started",
        "target",
        "verify",
    )

    def __init__(
        self,
        target: Target,
        policy: RetryPolicy,
        *,
        started: float,
        probe: bool = False,
        sent_before: bool = False,
        verify: bool = True,
    ) -> None:
        self.target = target
        # A selective target finds its commands first; a probe (dry run) only searches.
        searching = probe or target.match is not None
        self._selection = _Selection(target, cancel=not probe) if searching else None
        self.started = started
        self.verify = verify
        self.maybe_applied = sent_before
        self.sent = 0
        self.earlier_ids: tuple[str, ...] = ()  # listed by an earlier call of this run (a list)
        self.last_latency_ms: float | None = None
        self.last_request_id: str | None = None  # of the last search page (results from searches)
        self._phase = Kind.SEARCH if searching else Kind.CANCEL
        self._policy = policy
        self._retry: Retrying | None = None  # made at the first failure: success costs nothing
        self._get: Retrying | None = None
        self._pending_reply: CancelReply | None = None

    def start(self) -> Send:
        """The first call."""
        return self._send()

    def _send(self) -> Send:
        self.sent += 1
        selection = self._selection
        if selection is None:
            return SENDS[self._phase]
        if self._phase is Kind.SEARCH:
            return Send(Kind.SEARCH, page=selection.page)
        return Send(Kind.CANCEL, command_id=selection.current)

    def waited(self, situation: Situation = RUNNING) -> Send | Leave:
        """The wait is over: call again, unless the run is stopping."""
        if situation.stopping:
            return Leave("the run is stopping")
        return self._send()

    def stopped(self) -> Leave:
        """The run stopped while the target waited for a slot or a retry."""
        return Leave("the run is stopping")

    # -- answers ----------------------------------------------------------------------------

    def cancelled(self, reply: CancelReply, now: float, latency_ms: float | None) -> Action:
        """A code-0 answer to a cancel."""
        self.last_latency_ms = latency_ms
        if self._selection is not None:
            self._selection.answered(reply)
            return self._next_match(now, reply)
        ids = tuple(command.command_id for command in reply.commands)
        unknown = self.maybe_applied or reply.unreadable > 0
        if ids:
            # For one command id the reply shows this attempt did it; for cancel-all an earlier
            # lost attempt may have cancelled others, which no reply listed.
            single = self.target.command_id is not None
            unknown = reply.unreadable > 0 or (self.maybe_applied and not single)
            return self._finish(Outcome.CANCELLED, now, reply=reply, ids=ids, unknown=unknown)
        if self.maybe_applied and self.verify and self.target.command_id is not None:
            self._phase, self._get = Kind.GET, Retrying(self._policy)
            self._pending_reply = reply
            return self._send()
        return self._finish(Outcome.NOTHING_TO_CANCEL, now, reply=reply, unknown=unknown)

    def got_command(self, command: Command, now: float, latency_ms: float | None) -> Finish:
        """Get Command's answer after a lost answer: evidence beside nothing_to_cancel."""
        return self._finish(
            Outcome.NOTHING_TO_CANCEL,
            now,
            reply=self._pending_reply,
            unknown=True,
            get_state=command.state,
        )

    def searched(self, page: SearchPage, now: float, latency_ms: float | None) -> Action:
        """A page of Search Command: sort its cached commands into matched and kept; read the
        next page, then cancel each match by id (a dry run stops at what it found)."""
        self.last_latency_ms = latency_ms
        self.last_request_id = page.request_id
        selection = self._selection
        assert selection is not None
        selection.sort(page)
        if page.more(selection.page):
            selection.page += 1
            return self._send()
        if not selection.cancel:
            return self._finish(Outcome.NOTHING_TO_CANCEL, now, found=tuple(selection.matched))
        self._phase = Kind.CANCEL
        selection.queue = list(reversed(selection.matched))  # cancelled in the order found
        return self._next_match(now, None)

    def _next_match(self, now: float, reply: CancelReply | None) -> Action:
        """Cancel the next match by id, or finish: cancelled if any was, else nothing."""
        selection = self._selection
        assert selection is not None
        if selection.advance():
            self._retry = None  # each command id has its own attempts
            return self._send()
        outcome = Outcome.CANCELLED if selection.cancelled else Outcome.NOTHING_TO_CANCEL
        unknown = self.maybe_applied or bool(selection.unknown)
        return self._finish(
            outcome, now, reply=reply, ids=tuple(selection.cancelled), unknown=unknown
        )

    def failed(
        self,
        error: EnOSError,
        now: float,
        latency_ms: float | None,
        rng: random.Random,
        situation: Situation = RUNNING,
    ) -> Action:
        """A classified failure of the current call."""
        self.last_latency_ms = latency_ms
        if self._phase is Kind.GET:
            return self._get_failed(error, now, rng, situation)
        selection = self._selection
        if self._phase is Kind.CANCEL:  # a search that fails changed nothing
            if selection is not None:
                selection.current_maybe_applied |= error.maybe_applied
            else:
                self.maybe_applied |= error.maybe_applied
        if self._retry is None:
            self._retry = Retrying(self._policy)
        decision = self._retry.failed(error, rng)
        return after_failure(
            decision, error, situation, give_up=lambda: self._failed_for_good(error, now)
        )

    def _failed_for_good(self, error: EnOSError, now: float) -> Finish:
        selection = self._selection
        if selection is None:
            return self._finish(Outcome.FAILED, now, error=error, unknown=self.maybe_applied)
        # what was cancelled so far is kept in the record
        unknown = self.maybe_applied or selection.failing_unknown()
        ids = tuple(selection.cancelled)
        return self._finish(Outcome.FAILED, now, error=error, unknown=unknown, ids=ids)

    def _get_failed(
        self, error: EnOSError, now: float, rng: random.Random, situation: Situation
    ) -> Action:
        """Evidence could not be had: the result stands without it. Even a fatal answer ends
        only this question; the next cancel meets it and stops the run."""
        assert self._get is not None
        decision = self._get.failed(error, rng)

        def without_evidence() -> Finish:
            reply = self._pending_reply
            return self._finish(Outcome.NOTHING_TO_CANCEL, now, reply=reply, unknown=True)

        return after_failure(
            decision,
            error,
            situation,
            give_up=without_evidence,
            leave=without_evidence,
            fatal_stops=False,
        )

    def give_up(self, error: EnOSError, now: float) -> TargetResult:
        """The call this target was part of failed for good (a list's last attempt)."""
        return self._finish(Outcome.FAILED, now, error=error, unknown=self.maybe_applied).result

    # -- for a list call this target is part of (worker.core.batching) -----------------------

    def count_call(self) -> None:
        """A call naming this target (a list's cancel, a verifying search) is about to go."""
        self.sent += 1

    def note_latency(self, latency_ms: float | None) -> None:
        """The latency of the last call naming this target."""
        self.last_latency_ms = latency_ms

    def may_have_applied(self, maybe: bool) -> None:
        """A call naming this target may have taken effect without a usable answer."""
        self.maybe_applied |= maybe

    def listed_earlier(self, reply: CancelReply) -> None:
        """A list's answer listed these commands for this target before it goes alone: they
        are claimed with its own result (and an unreadable one makes its effect unknown)."""
        self.earlier_ids = tuple(command.command_id for command in reply.commands)
        self.maybe_applied |= reply.unreadable > 0

    # -- the result -------------------------------------------------------------------------

    def _finish(
        self,
        outcome: Outcome,
        now: float,
        *,
        reply: CancelReply | None = None,
        error: EnOSError | None = None,
        ids: tuple[str, ...] = (),
        unknown: bool = False,
        get_state: int | None = None,
        found: tuple[str, ...] = (),
    ) -> Finish:
        status: int | None
        code: int | None
        if reply is not None:
            status, code, request_id = reply.http_status, reply.code, reply.request_id
            msg, problem = reply.msg, reply.problem
        elif error is not None:
            status, code, request_id = error.http_status, error.code, error.request_id
            msg, problem = None, str(error)
        else:  # a result from searches alone (a dry run, a match that found nothing)
            status, code, msg, problem = 200, 0, None, None
            request_id = self.last_request_id
        if self.earlier_ids:  # a list's answer listed these before this call
            ids = self.earlier_ids + tuple(i for i in ids if i not in self.earlier_ids)
            if outcome is Outcome.NOTHING_TO_CANCEL:
                outcome = Outcome.CANCELLED
        selection = self._selection
        if selection is not None:
            matched, missed = tuple(selection.matched), tuple(selection.missed)
            kept = tuple(selection.kept)
        else:
            matched = missed = kept = ()
        return Finish(
            TargetResult(
                target=self.target,
                outcome=outcome,
                cancelled_command_ids=ids,
                attempts=self.sent,
                http_status=status,
                code=code,
                msg=msg,
                request_id=request_id,
                error=problem,
                started_at=self.started,
                finished_at=now,
                latency_ms=self.last_latency_ms,
                effect_unknown=unknown,
                get_state=get_state,
                found_command_ids=found,
                matched_command_ids=matched,
                missed_command_ids=missed,
                kept_command_ids=kept,
            )
        )


class _Selection:
    """A selective target's bookkeeping: what the search found, and each match's fate."""

    __slots__ = (
        "cancel",
        "cancelled",
        "current",
        "current_maybe_applied",
        "kept",
        "match",
        "matched",
        "missed",
        "page",
        "queue",
        "unknown",
        "wanted_id",
    )

    def __init__(self, target: Target, *, cancel: bool) -> None:
        self.match = target.match
        self.wanted_id = target.command_id  # a dry run of a one-command target
        self.cancel = cancel  # False: a dry run, which only searches
        self.page = 1
        self.matched: list[str] = []
        self.kept: list[str] = []
        self.queue: list[str] = []
        self.current: str | None = None
        self.current_maybe_applied = False
        self.cancelled: list[str] = []
        self.missed: list[str] = []
        self.unknown: list[str] = []

    def sort(self, page: SearchPage) -> None:
        """Matched or kept, for every cached command of the page (unreadable ones are kept)."""
        for command in page.commands:
            if command.state not in (None, 1):
                continue  # not cached: neither to cancel nor kept
            if self._wanted(command):
                self.matched.append(command.command_id)
            else:
                self.kept.append(command.command_id)

    def _wanted(self, command: Command) -> bool:
        if self.match is not None:
            return self.match.matches(command)
        return self.wanted_id is None or command.command_id == self.wanted_id

    def advance(self) -> bool:
        """Move to the next match to cancel; False when none is left."""
        self.current = self.queue.pop() if self.queue else None
        self.current_maybe_applied = False
        return self.current is not None

    def answered(self, reply: CancelReply) -> None:
        """The cancel of `current` answered code 0: cancelled, gone, or not known."""
        current = self.current
        assert current is not None
        if any(c.command_id == current for c in reply.commands):
            self.cancelled.append(current)
        elif reply.unreadable or self.current_maybe_applied:
            self.unknown.append(current)  # an earlier try of it may have done it
        else:
            self.missed.append(current)  # delivered or expired since the search

    def failing_unknown(self) -> bool:
        """Whether a target that fails now may have had more effect than it lists."""
        return bool(self.unknown) or self.current_maybe_applied
