"""Append-only JSON-lines files, the primitive under the journal and the audit log.

Every line goes to the kernel with a single ``os.write`` on an ``O_APPEND`` descriptor, so a
crash of the process (even ``kill -9``) never loses a line already written, and lines never
interleave. A write that fails or comes back short (a full disk) is undone (the file cut back
to where the line began) and raises :class:`~worker.errors.StoreError`; from then on every
file sharing its :class:`WriteGuard` refuses to write, so no record that depends on the lost
one (a result after its attempt) is ever written. ``fdatasync`` (durability against a machine
crash) runs in batches, off the event loop. Files are opened without following a symbolic
link: a link planted in a run directory cannot make a run write elsewhere. The tail helpers
read only the last megabyte (further back only for a line longer than that).
"""

from __future__ import annotations

import contextlib
import errno
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import orjson
import structlog

from worker.errors import StoreError

log = structlog.get_logger("worker.journal")


class _IsoCache:
    """The last second's date text and the last millisecond's whole text."""

    __slots__ = ("millisecond", "second", "second_text", "text")

    def __init__(self) -> None:
        self.second, self.second_text, self.millisecond, self.text = -1, "", -1, ""


_iso_cache = _IsoCache()


def iso(moment: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-25T21:26:13.123Z.

    Called three times per request, mostly within one millisecond: the last millisecond's text
    and the date of the last second are kept, so most calls are one comparison.
    """
    cache = _iso_cache
    millisecond = int(moment * 1000)
    if cache.millisecond == millisecond:
        return cache.text
    second = millisecond // 1000
    if cache.second != second:
        cache.second = second
        cache.second_text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
    cache.millisecond, cache.text = millisecond, f"{cache.second_text}{millisecond % 1000:03d}Z"
    return cache.text


class WriteGuard:
    """The first write failure of a segment, shared by its files: after it, nothing more is
    written to any of them."""

    __slots__ = ("failed",)

    def __init__(self) -> None:
        self.failed: StoreError | None = None

    def check(self) -> None:
        """Raise the first failure again, if there was one."""
        if self.failed is not None:
            raise self.failed

    def fail(self, path: Path, cause: str) -> StoreError:
        """Remember (only) the first failure; return it to raise."""
        if self.failed is None:
            self.failed = StoreError(path, cause)
        return self.failed


def os_cause(exc: OSError) -> str:
    """An OS error as a cause people read ("No space left on device (disk full)")."""
    cause = exc.strerror or str(exc)
    return f"{cause} (disk full)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else cause


def open_nofollow(path: Path, flags: int) -> int:
    """A descriptor for `path`, never through a symbolic link; StoreError when it cannot be had."""
    try:
        return os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    except OSError as exc:
        why = "it is a symbolic link" if exc.errno == errno.ELOOP else os_cause(exc)
        raise StoreError(path, why) from None


class SyncedFile:
    """A file descriptor whose writes are made durable in batches, off the event loop."""

    def __init__(self, path: Path, flags: int, guard: WriteGuard | None = None) -> None:
        self.path = path
        self.guard = guard or WriteGuard()
        self._fd = open_nofollow(path, flags)
        self.unsynced = 0

    def sync(self) -> None:
        """Make what was written durable against a machine crash (called off the loop)."""
        if self.unsynced and self._fd >= 0:
            self.unsynced = 0
            try:
                os.fdatasync(self._fd)
            except OSError as exc:  # the kernel could not write it back: say so at the next write
                self.guard.fail(self.path, os_cause(exc))

    def close(self) -> None:
        """Sync and close; safe to call twice."""
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


class AppendLog(SyncedFile):
    """An append-only JSON-lines file written with one syscall per line, each complete or not
    at all."""

    def __init__(self, path: Path, guard: WriteGuard | None = None) -> None:
        super().__init__(path, os.O_WRONLY | os.O_APPEND, guard)
        self._size = os.fstat(self._fd).st_size  # one writer (run.lock): the file's end

    def append_line(self, line: bytes) -> None:
        """Write one line (without its newline); durable against a process crash at once.
        StoreError when it cannot be written whole (the file is left as it was)."""
        if self.guard.failed is not None:
            raise self.guard.failed
        data = line + b"\n"
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise self._undone(os_cause(exc)) from None
        if written != len(data):
            short = f"only {written:,} of {len(data):,} bytes of a line were written"
            raise self._undone(f"disk full ({short})")
        self._size += written
        self.unsynced += 1

    def _undone(self, cause: str) -> StoreError:
        """Cut a torn line back off (a full disk frees the space for it), and fail the guard."""
        with contextlib.suppress(OSError):  # if this fails too, the next resume cuts the tail
            os.ftruncate(self._fd, self._size)
        return self.guard.fail(self.path, cause)


TAIL_BYTES = 1 << 20


def _tail(path: Path) -> tuple[int, bytes]:
    """(offset, bytes) from the start of the file's last two lines to its end: the last
    megabyte, or further back when a line is longer than that (a result naming 5,000 matches)."""
    with _read_nofollow(path) as stream:
        size = stream.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_BYTES)
        stream.seek(start)
        tail = stream.read()
        while start > 0 and tail.count(b"\n", 0, len(tail) - 1) < 2:
            step = min(start, TAIL_BYTES)
            start -= step
            stream.seek(start)
            tail = stream.read(step) + tail
        return start, tail


def _read_nofollow(path: Path) -> BinaryIO:
    """`path` opened to read, never through a symbolic link."""
    return os.fdopen(os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC), "rb")


def last_line(path: Path) -> bytes | None:
    """The last complete line of a file, without its newline (None when there is none)."""
    if not path.exists():
        return None
    _, tail = _tail(path)
    end = tail.rfind(b"\n")
    if end < 0:
        return None
    return tail[tail.rfind(b"\n", 0, end) + 1 : end]


def repair_tail(path: Path) -> int:
    """Cut what a crash mid-write leaves at the end: an unterminated or unparsable last line.

    Only the tail is read, so this costs the same for ten lines or ten million. Returns the
    number of bytes removed.
    """
    if not path.exists():
        return 0
    start, tail = _tail(path)
    keep = tail.rfind(b"\n") + 1  # drop an unterminated tail
    if keep:
        previous = tail.rfind(b"\n", 0, keep - 1) + 1
        try:
            orjson.loads(tail[previous:keep])
        except orjson.JSONDecodeError:
            keep = previous
    removed = len(tail) - keep
    if removed:
        fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.ftruncate(fd, start + keep)
        finally:
            os.close(fd)
        log.warning("worker.torn_line_removed", path=str(path), bytes=removed)
    return removed
