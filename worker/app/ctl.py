"""``worker ctl DIR [DIR ...] ACTION [N]``: act on running runs through their run directories.

A request is a file in ``DIR/control/`` (see :mod:`worker.store.control`), carried out by the
process that holds the directory within a second; ``worker ctl`` waits until the request is
consumed and the status file shows its result (at most `timeout` seconds; then it takes its
request back if nobody took it). No port, no daemon: the directory's permissions say who may.

A rate given for several directories is split evenly between them (and says so). A spool
(``worker watch``'s directory) takes only ``rate``: the rate of spooled jobs is the watcher's,
shared by its jobs; the request goes to ``SPOOL/control/`` for the watcher to carry out (it
holds ``SPOOL/watch.lock`` while it runs). Pause, resume, stop, concurrency and promote act
on a job's own run directory (``SPOOL/runs/NAME``).
"""

from __future__ import annotations

import getpass
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import orjson

from worker.errors import ExitCode, UsageError
from worker.model import JsonObject
from worker.store.appendlog import iso
from worker.store.control import (
    ACTIONS,
    ControlRequest,
    pending,
    read_status,
    request_id,
    send_request,
    watcher_holds,
    withdraw,
)
from worker.store.layout import RunDir
from worker.store.lock import holder_of

WITH_VALUE = ("rate", "concurrency")
POLL_S = 0.1


@dataclass
class Place:
    """A directory worker ctl acts on: a run directory, or a spool (its watcher)."""

    path: Path
    spool: bool

    @property
    def control(self) -> Path:
        """Where its requests go (RUN/control or SPOOL/control)."""
        return self.path / "control"

    @property
    def status(self) -> Path:
        """Where its live state (and the results of its requests) is read."""
        return self.path / "status.json"

    def live(self) -> str | None:
        """Who runs it now ("pid N on HOST", "a watcher"), or None when nobody does."""
        if self.spool:
            return "a watcher" if watcher_holds(self.path) else None
        return holder_of(RunDir(self.path))


@dataclass
class Sent:
    """A request on its way: where, its file, what came of it."""

    place: Place
    request: ControlRequest
    path: Path
    result: str | None = None  # "done", "refused: ..."; None while unknown
    after: object = None
    note: str | None = None  # what the run said of it (a rate capped at the budget)


def parse_words(words: list[str]) -> tuple[list[Path], str, float | None]:
    """``DIR [DIR ...] ACTION [N]``: the directories, the action and its number."""
    value: float | None = None
    if len(words) >= 3 and words[-2] in WITH_VALUE:
        try:
            value = float(words[-1])
        except ValueError:
            raise UsageError(f"{words[-2]} needs a number, not {words[-1]!r}") from None
        if value <= 0:
            raise UsageError(f"{words[-2]} needs a number above zero")
        words = words[:-1]
    if len(words) < 2 or words[-1] not in (*ACTIONS, "status"):
        raise UsageError(
            "give DIR [DIR ...] then one of pause, resume, rate N, concurrency N, stop, "
            "promote, status"
        )
    action = words[-1]
    if action in WITH_VALUE and value is None:
        raise UsageError(f"{action} needs a number: worker ctl DIR {action} N")
    if action == "concurrency" and value is not None and value != int(value):
        raise UsageError("concurrency needs a whole number")
    return [Path(w) for w in words[:-1]], action, value


def place_of(path: Path, action: str) -> Place:
    """A run directory, or a spool (only for rate and status); UsageError otherwise."""
    if (path / "incoming").is_dir() and (path / "running").is_dir():
        if action not in ("rate", "status"):
            raise UsageError(
                f"{path} is a spool: {action} acts on a job's run directory "
                f"({path}/runs/NAME); only the rate is the watcher's"
            )
        return Place(path, spool=True)
    if not RunDir(path).holds_run():
        raise UsageError(f"{path} is not a run directory (no run.json) nor a spool")
    return Place(path, spool=False)


def control(
    paths: list[Path],
    action: str,
    value: float | None,
    *,
    timeout: float = 10.0,
    json: bool = False,
    out: TextIO | None = None,
) -> int:
    """Carry out `action` on every directory; the exit code (0 acknowledged, 1 no live run
    or no acknowledgement, 2 refused)."""
    stream = out or sys.stdout
    places = [place_of(path, action) for path in paths]
    if action == "status":
        return show_status(places, json=json, out=stream)
    note = None
    if action == "rate" and value is not None and len(places) > 1:
        share = value / len(places)
        note = f"{value:g}/s split evenly: {share:g}/s for each of {len(places)} runs"
        stream.write(f"{note}\n")
        value = share
    code: int = ExitCode.OK
    sent: list[Sent] = []
    for place in places:
        holder = place.live()
        if holder is None:
            stream.write(f"{place.path}: no live run holds it; nothing sent\n")
            code = ExitCode.FAILED
            continue
        request = _request(action, value, note)
        sent.append(Sent(place, request, send_request(place.control, request)))
    _await_results(sent, timeout)
    for item in sent:
        code = max(code, _tell(item, stream), key=_severity)
    return int(code)


def _severity(code: int) -> int:
    """No acknowledgement (1) outweighs a refusal (2), which outweighs success (0)."""
    order: dict[int, int] = {ExitCode.OK: 0, ExitCode.USAGE: 1, ExitCode.FAILED: 2}
    return order.get(code, 3)


def _request(action: str, value: float | None, note: str | None) -> ControlRequest:
    """A request signed with who and where this worker ctl runs."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    request: ControlRequest = {
        "id": request_id(),
        "action": action,
        "by": user,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "at": iso(time.time()),
    }
    if value is not None:
        request["value"] = value
    if note is not None:
        request["note"] = note
    return request


def _await_results(sent: list[Sent], timeout: float) -> None:
    """Until each request is consumed and its result is in the status file, or the timeout
    (then a request nobody took is taken back)."""
    deadline = time.monotonic() + timeout
    waiting = list(sent)
    while waiting and time.monotonic() < deadline:
        for item in list(waiting):
            if pending(item.path):
                if item.place.live() is None and withdraw(item.path):
                    waiting.remove(item)  # the run ended without taking it: nothing happened
                continue
            found = _result_in(item)
            if found is not None:
                item.result, item.after, item.note = found
                waiting.remove(item)
        if waiting:
            time.sleep(POLL_S)
    for item in waiting:
        if withdraw(item.path):
            item.result = None  # never taken: nothing happened


def _result_in(item: Sent) -> tuple[str, object, str | None] | None:
    """The request's result as the status file shows it (None: not yet)."""
    status = read_status(item.place.status) or {}
    for result in status.get("requests") or []:
        if isinstance(result, dict) and result.get("id") == item.request["id"]:
            note = result.get("note")
            return str(result.get("result")), result.get("after"), note and str(note)
    return None


def _tell(item: Sent, stream: TextIO) -> int:
    """One line per directory: what came of the request; its exit code."""
    action, where = item.request["action"], item.place.path
    if item.result is None:
        still = pending(item.path)
        stream.write(
            f"{where}: {action} not acknowledged in time"
            + (
                " (taken: it may still be carried out; see worker ctl DIR status)"
                if still
                else "; the request was taken back, nothing was done"
            )
            + "\n"
        )
        return ExitCode.FAILED
    if item.result != "done":
        stream.write(f"{where}: {action} {item.result}\n")
        return ExitCode.USAGE
    note = f" (warning: {item.note})" if item.note else ""
    stream.write(f"{where}: {action} done; now {_shown(item.after)}{note}\n")
    return ExitCode.OK


def _shown(after: object) -> str:
    """What a request left, in words: "paused True", "rate 40.0"."""
    if isinstance(after, dict):
        return ", ".join(f"{key} {value}" for key, value in after.items())
    return str(after)


def show_status(places: list[Place], *, json: bool, out: TextIO) -> int:
    """The status files (1 when one of the directories has no live run)."""
    code: int = ExitCode.OK
    found: list[JsonObject] = []
    for place in places:
        status = read_status(place.status) or {}
        live = place.live()
        status = {**status, "live": live is not None, "dir": str(place.path)}
        found.append(status)
        if live is None:
            code = ExitCode.FAILED
    if json:
        out.write(
            orjson.dumps(found if len(found) > 1 else found[0], option=orjson.OPT_INDENT_2).decode()
            + "\n"
        )
        return code
    for status in found:
        out.write("\n".join(status_lines(status)) + "\n")
    return code


def status_lines(status: JsonObject) -> list[str]:
    """A status file for people."""
    where = status.get("dir")
    if not status.get("live"):
        head = f"{where}: no live run holds it"
        if status.get("state"):
            head += f"; its last status ({status.get('updated_at')}): {status.get('state')}"
        return [head]
    counts, rate = status.get("counts") or {}, status.get("rate") or {}
    lines = [
        f"{where}: {status.get('state')} (pid {status.get('pid')} on {status.get('host')}, "
        f"updated {status.get('updated_at')})",
        f"  targets      {counts.get('final', 0):,} of {status.get('targets', 0):,} final: "
        f"{counts.get('cancelled', 0):,} cancelled, {counts.get('nothing_to_cancel', 0):,} "
        f"nothing to cancel, {counts.get('failed', 0):,} failed; {counts.get('in_flight', 0)} "
        f"in flight, {counts.get('waiting_retry', 0):,} waiting to retry",
        f"  rate         {rate.get('allowed') or 'unlimited'}/s allowed (asked "
        f"{rate.get('asked')}, {rate.get('cause')})"
        + (f"; the gateway's budget {status['budget']}/s" if status.get("budget") else ""),
    ]
    concurrency = status.get("concurrency") or {}
    lines.append(f"  concurrency  {concurrency.get('allowed')} of {concurrency.get('workers')}")
    if status.get("paused"):
        by = status.get("paused_by") or {}
        lines.append(f"  paused       by {by.get('by', '?')} at {by.get('at', '?')}")
    stage = status.get("stage")
    if stage:
        lines.append(
            f"  stage        {stage.get('current')} of {stage.get('of')}: {stage.get('state')}"
            + (f" (up to {stage['goes_to']})" if stage.get("goes_to") else "")
        )
    window = status.get("window")
    if window:
        when = (
            f"open, closes at {window.get('closes_at')}"
            if window.get("open")
            else f"closed, opens at {window.get('opens_at')}"
        )
        lines.append(f"  window       {window.get('window')}: {when}")
    for result in (status.get("requests") or [])[-3:]:
        lines.append(
            f"  request      {result.get('action')}: {result.get('result')} at {result.get('at')}"
        )
    return lines
