"""One worker per run directory: ``run.lock``, flock'ed while a process runs the directory.

Two workers appending to one journal would break the one-line-per-target rule. The kernel
drops the lock when the process dies (even by ``kill -9``), so a lock never outlives its holder;
the file keeps the holder's pid and host, which a refused second worker names.
"""

from __future__ import annotations

import fcntl
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

from worker.errors import UsageError
from worker.store.layout import RunDir


class RunDirBusy(UsageError):
    """The run directory is held by another live process."""

    def __init__(self, run: RunDir, holder: str) -> None:
        self.run = run
        self.holder = holder  # "pid N on HOST" as the holder wrote it
        super().__init__(
            f"{run} is in use by another worker ({holder}); wait for it to end, or stop it "
            "(Ctrl-C / SIGTERM) and resume"
        )


def holder_of(run: RunDir) -> str | None:
    """Who holds the directory now ("pid N on HOST"), or None when nobody does."""
    try:
        fd = os.open(run.lock, os.O_RDWR | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _written_holder(fd)
    finally:
        os.close(fd)
    return None


def _written_holder(fd: int) -> str:
    text = os.pread(fd, 300, 0).decode(errors="replace").split()
    if len(text) >= 2:
        return f"pid {text[0]} on {text[1]}"
    return f"pid {text[0]}" if text else "pid ?"


@contextmanager
def run_dir_lock(run: RunDir) -> Iterator[None]:
    """Hold the run directory for this process; RunDirBusy when another process holds it."""
    fd = os.open(run.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _written_holder(fd)
        os.close(fd)
        raise RunDirBusy(run, holder) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
        yield
    finally:
        os.close(fd)
