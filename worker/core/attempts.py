"""What the audit log says of a call: its action, its subject, and the decision that followed
it (:class:`~worker.model.Decided`), from the action a core answered. Pure."""

from __future__ import annotations

import time

from worker.core.actions import Action, Finish, Kind, Leave, Send, StopRun, Wait
from worker.core.batching import LIST_CANCEL, Fanout
from worker.model import Decided, Outcome


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
