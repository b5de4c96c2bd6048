"""Append-only JSON-lines files, the primitive under the journal and the audit log.

Every line goes to the kernel with a single ``os.write`` on an ``O_APPEND`` descriptor, so a
crash of the process (even ``kill -9``) never loses a line already written, and lines never
interleave. ``fdatasync`` (durability against a machine crash) runs in batches, off the event
loop. The tail helpers read only the last megabyte, so they cost the same at any size.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path

import orjson
import structlog

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


class SyncedFile:
    """A file descriptor whose writes are made durable in batches, off the event loop."""

    def __init__(self, path: Path, flags: int) -> None:
        self.path = path
        self._fd = os.open(path, flags | os.O_CREAT, 0o640)
        self.unsynced = 0

    def sync(self) -> None:
        """Make what was written durable against a machine crash (called off the loop)."""
        if self.unsynced and self._fd >= 0:
            self.unsynced = 0
            os.fdatasync(self._fd)

    def close(self) -> None:
        """Sync and close; safe to call twice."""
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1


class AppendLog(SyncedFile):
    """An append-only JSON-lines file written with one syscall per line."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, os.O_WRONLY | os.O_APPEND)

    def append_line(self, line: bytes) -> None:
        """Write one line (without its newline); durable against a process crash at once."""
        os.write(self._fd, line + b"\n")
        self.unsynced += 1


TAIL_BYTES = 1 << 20


def _tail(path: Path) -> tuple[int, bytes]:
    """(offset, bytes) of the last megabyte of a file: enough to hold its last lines."""
    with path.open("rb") as stream:
        size = stream.seek(0, os.SEEK_END)
        start = max(0, size - TAIL_BYTES)
        stream.seek(start)
        return start, stream.read()


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
        with path.open("r+b") as stream:
            stream.truncate(start + keep)
        log.warning("worker.torn_line_removed", path=str(path), bytes=removed)
    return removed
