"""The facts people ask first about a run, read cheaply from its directory: who ran it, where,
with which version, what it cancelled, whether a process holds it now, and the audit head to
keep in the ticket.

The audit log is the longest file of a run (a line per HTTP attempt: a million lines and more),
so it is never read whole here: its first line (the first segment's ``run_started``), its last
line (the chain's head, from the last megabyte), and, only when the run has several segments,
the last segment's ``run_started``, found by reading backwards from the end in blocks (the cost
is the last segment's length, not the file's).
"""

from __future__ import annotations

import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

import orjson

from worker.store.appendlog import last_line
from worker.store.layout import RunDir
from worker.store.lock import holder_of
from worker.store.records import ResultRecord, RunStartedRecord
from worker.store.state import Manifest

FIRST_LINE_MAX = 1 << 16  # a run_started record is a few hundred bytes (argv included)
BLOCK = 1 << 20
STARTED = b'\n{"type":"run_started"'  # how the audit log writes one (orjson keeps key order)


@dataclass(frozen=True)
class RunFacts:
    """What the top of a run's section says besides the counts."""

    first: RunStartedRecord | None = None  # the first segment's run_started
    last: RunStartedRecord | None = None  # the last segment's (the first's when one segment)
    head: str | None = None  # sha256 of the audit's last line: the chain's head
    holder: str | None = None  # "pid N on HOST" while another process runs the directory
    cancels: str = "not known (no result yet)"


def read_facts(run: RunDir, manifest: Manifest) -> RunFacts:
    """The facts of `run`; whatever a missing or damaged file cannot tell stays None."""
    first = _first_started(run.audit)
    last = _last_started(run.audit) if len(manifest.segments) > 1 else first
    tail = last_line(run.audit) if run.audit.exists() else None
    return RunFacts(
        first=first,
        last=last or first,
        head=hashlib.sha256(tail).hexdigest() if tail else None,
        holder=other_holder(run),
        cancels=what_it_cancels(run, manifest),
    )


def other_holder(run: RunDir) -> str | None:
    """Who holds the directory, unless it is this very process (a run writes its own report
    while it still holds its lock, after its segment ended)."""
    holder = holder_of(run)
    if holder == f"pid {os.getpid()} on {socket.gethostname()}":
        return None
    return holder


def _record(line: bytes) -> RunStartedRecord | None:
    """A run_started record from a line, or None when the line is not one."""
    try:
        record: RunStartedRecord = orjson.loads(line)  # the run's own JSON: checked below
    except orjson.JSONDecodeError:
        return None
    if not isinstance(record, dict) or record.get("type") != "run_started":
        return None
    return record


def _first_started(path: Path) -> RunStartedRecord | None:
    """The audit's first record: the first segment's run_started."""
    try:
        with path.open("rb") as stream:
            return _record(stream.readline(FIRST_LINE_MAX))
    except OSError:
        return None


def _last_started(path: Path) -> RunStartedRecord | None:
    """The last run_started in the audit, searched backwards block by block."""
    try:
        with path.open("rb") as stream:
            end = stream.seek(0, os.SEEK_END)
            carry = b""
            while end > 0:
                start = max(0, end - BLOCK)
                stream.seek(start)
                block = stream.read(end - start) + carry
                found = (b"\n" + block if start == 0 else block).rfind(STARTED)
                if found >= 0:
                    offset = start + found - (1 if start == 0 else 0) + 1
                    stream.seek(offset)
                    return _record(stream.readline(FIRST_LINE_MAX))
                carry, end = block[: len(STARTED)], start
    except OSError:
        return None
    return None


def what_it_cancels(run: RunDir, manifest: Manifest) -> str:
    """What the run cancelled, in words: the job's match rule, else what its first and last
    results name (run.json does not record a job's command_id; the journal does, per target)."""
    if manifest.match is not None:
        return f"the cached commands that match: {manifest.match.describe()}"
    named = {_command_of(line) for line in (_first_line(run.results), last_line(run.results))}
    named.discard("?")
    if not named:
        return "not known (no result yet)"
    if named == {""}:
        return "every cached command of each target (cancel-all)"
    if len(named) == 1:
        return f"one command: {named.pop()}"
    return "one command per target, or every cached one (the targets file says which)"


def _first_line(path: Path) -> bytes | None:
    try:
        with path.open("rb") as stream:
            line = stream.readline(FIRST_LINE_MAX)
    except OSError:
        return None
    return line if line.endswith(b"\n") else None


def _command_of(line: bytes | None) -> str:
    """A result line's command_id ("" for cancel-all, "?" when the line cannot be read)."""
    if not line:
        return "?"
    try:
        record: ResultRecord = orjson.loads(line)
    except orjson.JSONDecodeError:
        return "?"
    return str(record.get("command_id") or "")
