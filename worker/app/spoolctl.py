"""The spool watcher's side of ``worker ctl SPOOL rate N`` (for :mod:`worker.app.watch` to
call; the watcher owns when).

The rate of spooled jobs is the watcher's, shared by its jobs, so a request for it goes to
``SPOOL/control/``. A watcher holds ``SPOOL/watch.lock`` (shared: several watchers may run one
spool) while it runs, which is how ``worker ctl`` knows one is live; every half second it
carries out the requests there with :func:`carry_out_spool_requests` (a new rate for its
limiter, capped at a known budget), which also writes ``SPOOL/status.json`` with the result,
which ``worker ctl`` waits for. There is no spool audit log: each change is a log event.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import structlog

from worker.app.status import budget_of
from worker.core.ratelimit import RateLimiter
from worker.store.appendlog import iso
from worker.store.control import WATCH_LOCK, RequestResult, take_requests, write_status

log = structlog.get_logger("worker.watch")


@contextmanager
def watching(spool: Path) -> Iterator[None]:
    """Hold SPOOL/watch.lock (shared) while the watcher runs: worker ctl SPOOL sees a live
    watcher; the kernel lets go of it when the watcher dies."""
    fd = os.open(spool / WATCH_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def carry_out_spool_requests(
    spool: Path, limiter: RateLimiter, results: deque[RequestResult]
) -> None:
    """Carry out the requests in SPOOL/control/ (only ``rate`` is the watcher's: the others
    are refused, naming the run directory they belong to) and write SPOOL/status.json."""
    for taken in take_requests(spool / "control"):
        request, before = taken.request, limiter.rate
        if request is None:
            result, action = f"refused: the request cannot be read ({taken.problem})", "?"
        elif request["action"] != "rate":
            action = request["action"]
            result = f"refused: {action} acts on a job's run directory (SPOOL/runs/NAME)"
        else:
            action = "rate"
            applied = limiter.set_rate(float(request.get("value", 0)))
            result = "done"
            log.info(
                "worker.watch_rate_set",
                by=f"{request['by']}@{request['host']}",
                from_per_s=before,
                to_per_s=applied,
                note=request.get("note"),
            )
        results.append(
            {
                "id": taken.id,
                "action": action,
                "result": result,
                "at": iso(time.time()),
                "after": {"rate": limiter.rate},
            }
        )
        write_spool_status(spool, limiter, results)
        taken.done()


def write_spool_status(spool: Path, limiter: RateLimiter, results: deque[RequestResult]) -> None:
    """SPOOL/status.json: the watcher's shared rate and the requests it carried out."""
    write_status(
        spool / "status.json",
        {
            "pid": os.getpid(),
            "updated_at": iso(time.time()),
            "state": "watching",
            "rate": {"allowed": limiter.rate, "asked": limiter.asked, "cause": limiter.cause},
            "budget": budget_of(limiter),
            "requests": list(results),
        },
    )
