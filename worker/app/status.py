"""status.json: the running process's live state, replaced every second (and at once after a
``worker ctl`` request), for ``worker ctl DIR status``, dashboards and scripts.

It is a view, not a record: the audit log and the journal are the record. Its keys (extend,
never rename): ``run_id``, ``job``, ``pid``, ``host``, ``updated_at``, ``state`` (what the
run is doing, in words), ``paused`` (and ``paused_by``), ``targets``, ``counts``
(``final``, ``cancelled``, ``nothing_to_cancel``, ``failed``, ``in_flight``,
``waiting_retry``, ``requests``), ``rate`` (``allowed``, ``asked``, ``cause``), ``budget``
(the gateway's stated budget when the limiter knows one: ``allows_per_s``, ``stated``),
``concurrency`` (``allowed``, ``workers``), ``stage``, ``window``, ``deadline_at``,
``requests`` (the last requests carried out, with their results) and, once the segment
ended, ``exit_code`` and ``stopped``.
"""

from __future__ import annotations

import os
import socket
import time

import anyio
import structlog

from worker.app.conducting import Conduct
from worker.core.ratelimit import RateLimiter
from worker.model import JsonObject, Outcome
from worker.store.appendlog import iso
from worker.store.control import write_status
from worker.store.state import Summary

log = structlog.get_logger("worker.status")
EVERY_S = 1.0


async def status_loop(conductor: Conduct) -> None:
    """Replace status.json every second while the segment runs."""
    while True:
        write_status_now(conductor)
        await anyio.sleep(EVERY_S)


def write_status_now(conductor: Conduct, last: JsonObject | None = None) -> None:
    """Write the status file now; a status that cannot be written is logged, never a stop
    (it is a view: the run's records are elsewhere)."""
    status = status_of(conductor)
    if last is not None:
        status.update(last)
    try:
        write_status(conductor.run.status, status)
    except Exception as exc:  # a full disk: the journal and the audit say what happened
        if not conductor.status_failing:  # said once, not every second
            log.warning("worker.status_not_written", why=str(exc))
        conductor.status_failing = True
    else:
        conductor.status_failing = False


def write_last_status(conductor: Conduct, summary: Summary) -> None:
    """The segment ended: the status file says how (what ``worker ctl status`` then shows)."""
    write_status_now(
        conductor,
        {
            "state": f"ended: {summary.stopped}"
            + (f" ({summary.stop_message})" if summary.stop_message else ""),
            "exit_code": summary.exit_code,
            "stopped": summary.stopped,
        },
    )


def status_of(conductor: Conduct) -> JsonObject:
    """The live state (status.json's content)."""
    engine, manifest = conductor.engine, conductor.manifest
    progress, limiter = engine.progress, engine.limiter
    earlier = conductor.earlier
    outcomes = {o.value: earlier.get(o.value, 0) + progress.outcomes[o] for o in Outcome}
    stages = conductor.stages
    return {
        "run_id": manifest.run_id,
        "job": manifest.job_name,
        "run_dir": str(conductor.run),
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "updated_at": iso(time.time()),
        "state": _state(conductor),
        "paused": conductor.paused,
        "paused_by": manifest.paused,
        "targets": manifest.targets,
        "counts": {
            "final": len(conductor.done) + progress.finished,
            **outcomes,
            "in_flight": progress.in_flight,
            "waiting_retry": progress.waiting,
            "requests": progress.requests,
        },
        "rate": {
            "allowed": _rounded(limiter.rate),
            "asked": "auto" if limiter.adaptive else _rounded(limiter.asked),
            "cause": limiter.cause,
            "shared_with_the_watcher": conductor.spooled,
        },
        "budget": budget_of(limiter),
        "concurrency": {
            "allowed": 0 if conductor.paused else conductor.concurrency,
            "workers": conductor.options.limits.concurrency,
        },
        "stage": stages.status() if stages is not None else None,
        "window": conductor.window.status() if conductor.window is not None else None,
        "deadline_at": _deadline(conductor),
        "requests": list(conductor.results),
        "exit_code": None,
    }


def _state(conductor: Conduct) -> str:
    """What the run is doing, in words."""
    engine = conductor.engine
    if engine.stopping and conductor.phase not in ("ended",):
        return f"stopping: {engine.stop_message or engine.stop_reason.value}"
    if conductor.paused and conductor.phase == "running":
        return "paused by operator"
    return conductor.phase


def _deadline(conductor: Conduct) -> str | None:
    """When the segment's deadline stops it (as the engine counts it from its start)."""
    deadline = conductor.options.limits.deadline
    if deadline is None or conductor.started_at is None:
        return None
    return iso(conductor.started_at + deadline)


def budget_of(limiter: RateLimiter) -> JsonObject | None:
    """The gateway's stated budget as the limiter keeps it: what it allows now (requests/s)
    and what was stated, in words; None when the gateway stated none."""
    if limiter.stated is None:
        return None
    return {"allows_per_s": _rounded(limiter.budget_rate), "stated": limiter.stated.describe()}


def _rounded(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 2)
