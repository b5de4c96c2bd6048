"""A call, apart from the engine's flow: sending one that is not the plain cancel through the
canceller, what the audit log says of it (its action, its subject, the decision that
followed: :class:`~worker.model.Decided`, the text of an answer that could not be read), and
the run's list calls when the job asked for them."""

from __future__ import annotations

import time
from dataclasses import replace

import structlog

from worker import redact
from worker.core.actions import Action, Finish, Kind, Leave, Send, StopRun, Wait
from worker.core.batching import LIST_CANCEL, BatchPlan, Fanout
from worker.core.ports import Answer, Canceller, EngineSettings
from worker.enos import protocol as p
from worker.model import Attempt, Decided, Outcome, Target

log = structlog.get_logger("worker.engine")


def decision_after(  # noqa: PLR0911 (one word per kind of action)
    action: Action | Fanout, kind: Kind
) -> tuple[Decided, float | None]:
    """The audit's word for what follows a failed attempt (and the wait, for a retry)."""
    if isinstance(action, Fanout):
        return (Decided.SPLIT if action.parts else Decided.FAILED), None
    if isinstance(action, Wait):
        return (Decided.THROTTLED if action.throttled else Decided.RETRY), action.seconds
    if isinstance(action, Finish):
        if kind is Kind.GET:
            return Decided.UNVERIFIED, None
        failed = action.result.outcome is Outcome.FAILED
        return (Decided.FAILED if failed else Decided.DONE), None
    if isinstance(action, StopRun):
        return Decided.FATAL, None
    if isinstance(action, Leave):
        return Decided.LEFT, None
    return Decided.DONE, None


def action_name(send: Send) -> str:
    """The audit's name of a call: a list's is a cancel too."""
    return "cancel" if send is LIST_CANCEL else send.kind.value


def subject_of(send: Send) -> str | None:
    if send.command_id is not None:
        return send.command_id
    return f"page {send.page}" if send.kind is Kind.SEARCH else None


def ms_since(began: float) -> float:
    return round((time.perf_counter() - began) * 1000, 2)


async def ask(client: Canceller, send: Send, target: Target) -> Answer:
    """Send a call that is not the plain cancel (one command of a selective target, a Get for
    evidence, a search page)."""
    if send.kind is Kind.CANCEL:
        return await client.cancel(replace(target, command_id=send.command_id))
    if send.kind is Kind.GET:
        assert target.command_id is not None
        return await client.get_command(target, target.command_id)
    return await client.search_page(target, p.PENDING_EXPRESSION, send.page)


def attempt_of(
    target: Target,
    batch: tuple[Target, ...],
    send: Send,
    *,
    number: int,
    at: float,
    latency: float,
    decision: Decided,
    status: int | None = None,
    code: int | None = None,
    request_id: str | None = None,
    wait_s: float | None = None,
    error: str | None = None,
) -> Attempt:
    """The audit's record of one call (its target, or every target of a list: `batch`)."""
    subject = subject_of(send)
    return Attempt(
        target,
        number,
        at,
        latency,
        status,
        code,
        request_id,
        decision,
        wait_s,
        error,
        subject,
        batch,
    )


def unreadable_text(exc: Exception) -> str:
    """What an answer the client failed on is recorded with: the exception may quote the
    gateway's text, so it is masked like the gateway's text (before the cut), and capped."""
    text = f"the answer could not be read: {exc!r}"
    return redact.scrub_text(text[: 500 + redact.reach()])[:500]


def batch_plan(settings: EngineSettings) -> BatchPlan | None:
    """The run's lists, when the job asked for them (never in a dry run, which only searches)."""
    if settings.assets_per_call <= 1 or settings.dry_run:
        return None
    return BatchPlan(
        settings.assets_per_call,
        trial_batches=settings.trial_batches,
        settle_s=settings.batch_settle_s,
        on_change=_log_batching,
    )


def _log_batching(event: str, why: str) -> None:
    (log.info if event == "batching_trusted" else log.warning)(f"worker.{event}", why=why)
