"""audit.jsonl: an append-only, hash-chained record of the run and of every HTTP attempt.

Each record carries ``prev``, the sha256 of the previous record's line (without its newline);
the first record's ``prev`` is the sha256 of the run id. Removing, reordering or editing a record
breaks the chain. No secret, token or signature is ever written here.
"""

from __future__ import annotations

import getpass
import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import NamedTuple

import orjson

from worker.model import Attempt
from worker.store.appendlog import AppendLog, WriteGuard, iso, last_line
from worker.store.layout import RunDir
from worker.store.records import AttemptRecord, AuditRecord, RunStartedRecord


class AuditLog:
    """Writes audit records and keeps the hash chain."""

    def __init__(self, run: RunDir, run_id: str, guard: WriteGuard | None = None) -> None:
        self.run = run
        path = run.audit
        self._prev = _last_line_hash(path) or hashlib.sha256(run_id.encode()).hexdigest()
        self.log = AppendLog(path, guard)

    @property
    def head(self) -> str:
        """The sha256 of the last line written: the chain's head, to record in a ticket."""
        return self._prev

    def write(self, record: AuditRecord) -> None:
        """Append one record, chained to the previous one (the chain moves on only once the
        line is written)."""
        record["prev"] = self._prev
        line = orjson.dumps(record)
        self.log.append_line(line)
        self._prev = hashlib.sha256(line).hexdigest()

    def attempt(self, attempt: Attempt, action: str = "cancel") -> None:
        """One HTTP attempt: target (or targets, for a list), number, status, code, request
        id, latency, decision."""
        self.write(attempt_record(attempt, action))


class Operator(NamedTuple):
    """Who started a segment, where: for its run_started record."""

    operator: str
    host: str
    pid: int
    argv: list[str]


def who_and_where() -> Operator:
    """The operator, host, process and command line for a run_started record."""
    try:
        operator = getpass.getuser()
    except (KeyError, OSError):
        operator = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return Operator(operator, socket.gethostname(), os.getpid(), list(sys.argv))


def _last_line_hash(path: Path) -> str | None:
    """The sha256 of the last complete line, to continue the chain when appending."""
    line = last_line(path)
    return hashlib.sha256(line).hexdigest() if line else None


def attempt_record(attempt: Attempt, action: str) -> AttemptRecord:
    """The audit record of one HTTP attempt; a call naming several assets names each target."""
    target, batch = attempt.target, attempt.batch
    record: AttemptRecord = {
        "type": "attempt",
        "at": iso(attempt.at),
        "action": action,
        "org_id": target.org_id,
        "command_id": target.command_id,
        "attempt": attempt.number,
        "http_status": attempt.http_status,
        "code": attempt.code,
        "request_id": attempt.request_id,
        "latency_ms": attempt.latency_ms,
        "decision": attempt.decision,
        "wait_s": attempt.wait_s,
        "error": attempt.error,
    }
    if batch:
        record["targets"] = [t.selector() for t in batch]
    else:
        record["target"] = target.selector()
    if attempt.subject is not None:
        record["subject"] = attempt.subject
    return record


_STARTED = b'{"type":"run_started"'
_RESOLVED = b'{"type":"targets_resolved"'
_SEARCH = b'"action":"search_devices"'
_CHUNK = 1 << 20


def last_run_started(run: RunDir) -> RunStartedRecord | None:
    """The last segment's run_started record: what the audit says the run last ran as (its
    run id, job and targets hashes, gateway), read backwards from the end, a megabyte at a
    time; a targets_query resolved in that segment (a targets_resolved record right after its
    searches) stands for its targets hash. None when the audit holds none."""
    found = _last_started(run.audit)
    if found is None:
        return None
    offset, line = found
    loaded: RunStartedRecord = orjson.loads(line)  # a line of the run's own audit
    resolved = _resolved_after(run.audit, offset + len(line) + 1)
    if resolved is not None:
        loaded["targets_sha256"] = resolved
    return loaded


def _last_started(path: Path) -> tuple[int, bytes] | None:
    """(offset, line) of the last run_started record."""
    if not path.exists():
        return None
    with path.open("rb") as stream:
        end = stream.seek(0, os.SEEK_END)
        tail = b""
        while end > 0:
            start = max(0, end - _CHUNK)
            stream.seek(start)
            tail = stream.read(end - start) + tail
            found = _started_line(tail, at_file_start=start == 0)
            if found is not None:
                return start + found[0], found[1]
            end = start
            cut = tail.find(b"\n")  # the chunk's first line may go on in the chunk before
            tail = tail if cut < 0 else tail[: cut + 1]
    return None


def _resolved_after(path: Path, offset: int) -> str | None:
    """The targets hash of a targets_resolved record that follows the searches after
    `offset` (a segment's start), if one does and kept a snapshot."""
    with path.open("rb") as stream:
        stream.seek(offset)
        for line in stream:
            if line.startswith(_RESOLVED):
                digest = orjson.loads(line).get("targets_sha256")
                return digest if isinstance(digest, str) else None
            if _SEARCH not in line:
                return None  # past the searches: the segment resolved nothing
    return None


def _started_line(data: bytes, *, at_file_start: bool) -> tuple[int, bytes] | None:
    """(index, line) of the last complete run_started line in `data` (which may begin
    mid-line)."""
    index = data.rfind(b"\n" + _STARTED)
    if index >= 0:
        line_end = data.find(b"\n", index + 1)
        return (index + 1, data[index + 1 : line_end]) if line_end > 0 else None
    if at_file_start and data.startswith(_STARTED):
        line_end = data.find(b"\n")
        return (0, data[:line_end]) if line_end > 0 else None
    return None
