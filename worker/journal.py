"""results.jsonl: one final line per target, written as it happens; also the resume journal.

Every line goes to the kernel with a single ``os.write`` on an ``O_APPEND`` descriptor, so a
crash of the process (even ``kill -9``) never loses a line already written, and lines never
interleave. ``fdatasync`` (durability against a machine crash) runs in batches, off the event
loop. Reading back tolerates a torn last line, which only a machine crash can leave.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
import structlog

from worker.model import TargetResult, identity_key

RESULTS_FILE = "results.jsonl"
log = structlog.get_logger("worker.journal")


_iso_second: list[object] = [None, ""]  # (whole second, "YYYY-MM-DDTHH:MM:SS.") of the last call


def iso(moment: float) -> str:
    """ISO 8601 UTC with milliseconds, e.g. 2026-11-25T21:26:13.123Z.

    Called several times per request; formatting the date once per second keeps it cheap.
    """
    second = int(moment)
    if _iso_second[0] != second:
        stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        _iso_second[0], _iso_second[1] = second, stamp
    millis = min(999, int((moment - second) * 1000))
    return f"{_iso_second[1]}{millis:03d}Z"


class AppendLog:
    """An append-only JSON-lines file written with one syscall per line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
        self.unsynced = 0

    def append_line(self, line: bytes) -> None:
        """Write one line (without its newline); durable against a process crash at once."""
        os.write(self._fd, line + b"\n")
        self.unsynced += 1

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


def result_record(result: TargetResult) -> dict[str, Any]:
    """The results.jsonl fields of one result (design.md, Outputs)."""
    target = result.target
    return {
        "target": target.selector(),
        "org_id": target.org_id,
        "command_id": target.command_id,
        "outcome": result.outcome.value,
        "cancelled_command_ids": list(result.cancelled_command_ids),
        "attempts": result.attempts,
        "http_status": result.http_status,
        "code": result.code,
        "msg": result.msg,
        "request_id": result.request_id,
        "error": result.error,
        "effect_unknown": result.effect_unknown,
        "get_state": result.get_state,
        "started_at": iso(result.started_at),
        "finished_at": iso(result.finished_at),
        "duration_ms": round((result.finished_at - result.started_at) * 1000, 1),
        "latency_ms": result.latency_ms,
    }


class ResultJournal:
    """Appends result lines to results.jsonl."""

    def __init__(self, run_dir: Path) -> None:
        self.log = AppendLog(run_dir / RESULTS_FILE)

    def write(self, result: TargetResult) -> None:
        """Record one final result."""
        self.log.append_line(orjson.dumps(result_record(result)))


def record_key(record: dict[str, Any]) -> str:
    """The identity key of the target a results.jsonl record is about (see Target.key)."""
    selector = record["target"]
    return identity_key(
        record["org_id"],
        selector.get("asset_id"),
        selector.get("product_key"),
        selector.get("device_key"),
        record.get("command_id"),
    )


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """Every readable line of a JSON-lines file.

    An unterminated last line (a torn write) ends the file. A damaged line in the middle is
    skipped with a warning: its target has no result, so a resume runs it again.
    """
    if not path.exists():
        return
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.endswith(b"\n"):
                return
            try:
                yield orjson.loads(line)
            except orjson.JSONDecodeError:
                log.warning("worker.journal_line_unreadable", path=str(path), line=number)


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
