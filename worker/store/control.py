"""Live control through the run directory: request files (``control/``) and the status file
(``status.json``).

No network port: whoever may write in the run directory may control the run, and whoever may
read it may watch it. ``worker ctl`` writes one request per file, beside and renamed in (a
reader never sees half of one), named by the time in nanoseconds and a random suffix, so two
sent within a second are both there and sort in the order they were sent. The running process
takes a request by renaming it to a hidden name (so a ``worker ctl`` that gave up, and removes
its request, and the run that carries it out cannot both win), carries it out, records it, and
removes it; a request taken by a process that died is carried out by the next one.
The status file is replaced (written beside, renamed) every second by the running process.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from pathlib import Path
from typing import NotRequired, TypedDict

import orjson

from worker.errors import StoreError
from worker.model import JsonObject
from worker.store.appendlog import os_cause
from worker.store.layout import write_atomically

REQUEST_MAX = 4096  # bytes: a request is a few fields
STATUS_MAX = 1 << 20
ACTIONS = ("pause", "resume", "rate", "concurrency", "stop", "promote")


class ControlRequest(TypedDict):
    """One request file: what to do, with which value, who asked (user and host of the
    worker ctl process), when."""

    id: str
    action: str
    value: NotRequired[float]
    note: NotRequired[str]  # e.g. "60/s split evenly between 3 runs"
    by: str
    host: str
    pid: int
    at: str


class RequestResult(TypedDict):
    """A request as carried out, in status.json (what worker ctl waits for)."""

    id: str
    action: str
    result: str  # "done", or why it was refused
    at: str
    after: object
    note: NotRequired[str]  # e.g. a rate capped at the gateway's budget: said to the sender


class Taken:
    """A request the running process has taken (renamed to a hidden name)."""

    def __init__(self, path: Path, request: ControlRequest | None, problem: str | None) -> None:
        self.path = path
        self.request = request
        self.problem = problem  # the request could not be read: what is wrong with it

    @property
    def id(self) -> str:
        """The request's id (its file name without the suffix)."""
        return self.path.name.lstrip(".").removesuffix(".taken").removesuffix(".json")

    def done(self) -> None:
        """Remove the request: it has been carried out (or refused) and recorded."""
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request_id() -> str:
    """A new request's id: the time in nanoseconds (sortable) and a random suffix."""
    return f"{time.time_ns():020d}-{secrets.token_hex(4)}"


def send_request(directory: Path, request: ControlRequest) -> Path:
    """Write a request into `directory` (made if missing), beside and renamed in; its path.
    StoreError when it cannot be written."""
    path = directory / f"{request['id']}.json"
    try:
        directory.mkdir(exist_ok=True)
    except OSError as exc:
        raise StoreError(directory, os_cause(exc)) from None
    write_atomically(path, orjson.dumps(request))  # beside, fsync, renamed in
    return path


def withdraw(path: Path) -> bool:
    """Remove a request nobody has taken yet; False when the run has taken it meanwhile."""
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def pending(path: Path) -> bool:
    """Whether a request is still there or being carried out (not yet finished)."""
    taken = path.with_name(f".{path.stem}.taken")
    return path.exists() or taken.exists()


def take_requests(directory: Path) -> list[Taken]:
    """The requests waiting in `directory`, oldest first, each taken (renamed hidden) before
    it is read; requests a dead process had taken come first, to be carried out again."""
    try:
        names = sorted(os.listdir(directory))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = [_read(directory / name) for name in names if name.endswith(".taken")]
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue  # taken already, or still being written
        taken = directory / f".{name.removesuffix('.json')}.taken"
        try:
            os.rename(directory / name, taken)
        except FileNotFoundError:
            continue  # withdrawn by its worker ctl
        found.append(_read(taken))
    return found


def _read(path: Path) -> Taken:
    """A taken request, read (a regular file of at most REQUEST_MAX bytes, never through a
    link); what is wrong with it when it cannot be used."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return Taken(path, None, "not a regular file")
            raw = os.read(fd, REQUEST_MAX + 1)
        finally:
            os.close(fd)
    except OSError as exc:
        return Taken(path, None, os_cause(exc))
    if len(raw) > REQUEST_MAX:
        return Taken(path, None, f"more than {REQUEST_MAX} bytes")
    try:
        data: JsonObject = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return Taken(path, None, "not JSON")
    problem = _request_problem(data)
    if problem is not None:
        return Taken(path, None, problem)
    request: ControlRequest = data  # type: ignore[assignment]  # its shape checked above
    return Taken(path, request, None)


def _request_problem(data: object) -> str | None:
    """What makes a request unusable, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    if data.get("action") not in ACTIONS:
        return f"an unknown action (one of {', '.join(ACTIONS)})"
    for key in ("id", "by", "host", "at"):
        if not isinstance(data.get(key), str):
            return f"no {key}"
    value = data.get("value")
    if data["action"] in ("rate", "concurrency") and (
        isinstance(value, bool) or not isinstance(value, int | float) or value <= 0
    ):
        return f"{data['action']} needs a number above zero"
    return None


def write_status(path: Path, status: JsonObject) -> None:
    """Replace the status file (beside, renamed; never through a planted link). A live view,
    not a record: not fsynced. StoreError when it cannot be written."""
    data = orjson.dumps(status, option=orjson.OPT_INDENT_2) + b"\n"
    write_atomically(path, data, durable=False, mode=0o644)


def read_status(path: Path) -> JsonObject | None:
    """The status file as last written (None: none, or unreadable)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            raw = os.read(fd, STATUS_MAX)
        finally:
            os.close(fd)
        loaded = orjson.loads(raw)
    except (OSError, orjson.JSONDecodeError):
        return None
    return loaded if isinstance(loaded, dict) else None


WATCH_LOCK = "watch.lock"


def watcher_holds(spool: Path) -> bool:
    """Whether a watcher runs the spool: each holds SPOOL/watch.lock (flock, shared) while it
    runs, and the kernel lets go of it when the watcher dies."""
    try:
        fd = os.open(spool / WATCH_LOCK, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
