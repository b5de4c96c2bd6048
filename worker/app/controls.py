"""Carrying out ``worker ctl``'s requests in the running process: pause, resume, rate,
concurrency, stop, promote.

A task beside the engine takes the requests in ``control/`` twice a second, oldest first,
and for each: changes the run, writes what a resume must know into run.json first (a pause
or a rate outlives a crash: a restarted pod does not start sending at a rate the operator
turned down), then the audit record (who: the user and host of the ``worker ctl`` process,
from the request; what; before and after), then the result into the status file, and only
then removes the request. A crash in between leaves the request taken but not removed: the
next process carries it out again (the audit then shows the same request id twice, never
none).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from typing import NamedTuple

import anyio
import structlog

from worker.app.conducting import Conduct
from worker.app.status import write_status_now
from worker.core.ports import StopReason
from worker.store.appendlog import iso
from worker.store.control import ControlRequest, RequestResult, Taken, take_requests
from worker.store.records import ControlRecord

log = structlog.get_logger("worker.ctl")
PICK_UP_S = 0.5  # requests are carried out within this (and the status file shows them)


class Done(NamedTuple):
    """What a request did: the state before and after, "done" or why it was refused, and a
    note for the operator."""

    before: object
    after: object
    result: str = "done"
    note: str | None = None


async def control_loop(conductor: Conduct) -> None:
    """Carry out the waiting requests, in the order they were sent, twice a second."""
    while True:
        for taken in take_requests(conductor.run.control):
            carry_out(conductor, taken)
        await anyio.sleep(PICK_UP_S)


def carry_out(conductor: Conduct, taken: Taken) -> None:
    """One request: carried out (or refused), recorded, shown, removed."""
    request = taken.request
    if request is None:
        done = Done(None, None, f"refused: the request cannot be read ({taken.problem})")
        request = {
            "id": taken.id,
            "action": "unreadable",
            "by": "?",
            "host": "?",
            "pid": 0,
            "at": iso(time.time()),
        }
    else:
        done = _ACTIONS[request["action"]](conductor, request)
    record = _record(request, done)
    note = record.get("note")
    if not conductor.record(record):
        return  # the run stops: the request stays, for the next process to carry out
    shown: RequestResult = {
        "id": request["id"],
        "action": request["action"],
        "result": done.result,
        "at": record["at"],
        "after": done.after,
    }
    if done.note:
        shown["note"] = done.note
    conductor.results.append(shown)
    (log.info if done.result == "done" else log.warning)(
        "worker.control",
        action=request["action"],
        by=_who(request),
        result=done.result,
        after=done.after,
        note=note or None,
    )
    write_status_now(conductor)
    taken.done()


def _record(request: ControlRequest, done: Done) -> ControlRecord:
    """The audit record of a request carried out: who (from the request), what, the state
    before and after, the result, and the notes of both sides."""
    record: ControlRecord = {
        "type": "control",
        "at": iso(time.time()),
        "request": request["id"],
        "action": request["action"],
        "by": request["by"],
        "host": request["host"],
        "asked_at": request["at"],
        "before": done.before,
        "after": done.after,
        "result": done.result,
    }
    note = "; ".join(n for n in (request.get("note"), done.note) if n)
    if note:
        record["note"] = note
    return record


def _who(request: ControlRequest) -> str:
    """user@host of the worker ctl that sent the request (the audit's and the log's who)."""
    return f"{request['by']}@{request['host']}"


def _pause(conductor: Conduct, request: ControlRequest) -> Done:
    """Nothing new is sent (requests in flight finish); a resume of the run starts paused."""
    if conductor.paused:
        return Done({"paused": True}, {"paused": True}, note="already paused")
    conductor.hold(paused=True)
    conductor.manifest.paused = {"by": _who(request), "at": request["at"], "request": request["id"]}
    conductor.save()
    conductor.say(f"paused by operator ({_who(request)}): worker ctl {conductor.run} resume")
    return Done({"paused": False}, {"paused": True})


def _resume(conductor: Conduct, request: ControlRequest) -> Done:
    """Sending goes on (run.json first: a crash now no longer starts paused)."""
    if not conductor.paused:
        return Done({"paused": False}, {"paused": False}, note="not paused")
    conductor.manifest.paused = None
    conductor.save()
    conductor.hold(paused=False)
    conductor.say(f"resumed by operator ({_who(request)})")
    return Done({"paused": True}, {"paused": False})


def _rate(conductor: Conduct, request: ControlRequest) -> Done:
    """A fixed rate from now on (and for a resume), capped at the gateway's stated budget."""
    limiter = conductor.engine.limiter
    before = {"rate": limiter.rate, "asked": "auto" if limiter.adaptive else limiter.asked}
    if conductor.spooled:
        return Done(
            before,
            before,
            "refused: the rate of a spooled job is the watcher's "
            "(shared by its jobs): worker ctl SPOOL rate N",
        )
    asked = float(request.get("value", 0))
    applied = limiter.set_rate(asked)
    note = None
    if applied is not None and applied < asked:
        note = f"capped at the gateway's stated budget, {applied:g}/s (asked {asked:g}/s)"
        log.warning("worker.rate_capped", asked=asked, budget=applied)
    limits = conductor.manifest.limits
    conductor.manifest.limits = replace(limits, rate=applied, adaptive=False)
    conductor.save()
    return Done(before, {"rate": limiter.rate, "asked": applied}, note=note)


def _concurrency(conductor: Conduct, request: ControlRequest) -> Done:
    """At most N requests in flight; above the workers this segment started, the rest
    follows at the next segment (run.json keeps N)."""
    asked = int(request.get("value", 0))
    before = {"concurrency": conductor.concurrency}
    conductor.concurrency = min(asked, conductor.options.limits.concurrency)
    if not conductor.paused:  # a paused run takes it when resumed
        conductor.engine.set_concurrency(conductor.concurrency)
        if conductor.gate_engine is not None:
            conductor.gate_engine.set_concurrency(conductor.concurrency)
    note = None
    if asked > conductor.concurrency:
        note = (
            f"this segment started {conductor.concurrency} workers: {conductor.concurrency} "
            f"now, {asked} from the next segment"
        )
    conductor.manifest.limits = replace(conductor.manifest.limits, concurrency=asked)
    conductor.save()
    return Done(before, {"concurrency": conductor.concurrency}, note=note)


def _stop(conductor: Conduct, request: ControlRequest) -> Done:
    """As a first Ctrl-C: nothing new, requests in flight finish, exit 4, resumable."""
    engine = conductor.engine
    before = {"stopping": engine.stopping}
    engine.stop(StopReason.INTERRUPTED, f"worker ctl stop by {_who(request)}")
    note = None if not before["stopping"] else f"already stopping ({engine.stop_reason})"
    return Done(before, {"stopping": True}, note=note)


def _promote(conductor: Conduct, request: ControlRequest) -> Done:
    """Let a stage that passed its gate and waits for a promotion go on."""
    stages = conductor.stages
    waiting = stages.waiting() if stages is not None else None
    if stages is None or waiting is None:
        where = stages.where() if stages is not None else "the job has no stages"
        return Done(None, None, f"refused: no stage is waiting for promotion ({where})")
    stages.promote(waiting, _who(request))
    before = {"stage": waiting, "state": "waiting for promotion"}
    return Done(before, {"stage": waiting, "state": "promoted"})


_ACTIONS: dict[str, Callable[[Conduct, ControlRequest], Done]] = {
    "pause": _pause,
    "resume": _resume,
    "rate": _rate,
    "concurrency": _concurrency,
    "stop": _stop,
    "promote": _promote,
}
