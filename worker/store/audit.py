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
from typing import Any

import orjson

from worker.model import Attempt
from worker.store.appendlog import AppendLog, iso, last_line

AUDIT_FILE = "audit.jsonl"


class AuditLog:
    """Writes audit records and keeps the hash chain."""

    def __init__(self, run_dir: Path, run_id: str) -> None:
        path = run_dir / AUDIT_FILE
        self._prev = _last_line_hash(path) or hashlib.sha256(run_id.encode()).hexdigest()
        self.log = AppendLog(path)

    @property
    def head(self) -> str:
        """The sha256 of the last line written: the chain's head, to record in a ticket."""
        return self._prev

    def write(self, record: dict[str, Any]) -> None:
        """Append one record, chained to the previous one."""
        record["prev"] = self._prev
        line = orjson.dumps(record)
        self._prev = hashlib.sha256(line).hexdigest()
        self.log.append_line(line)

    def attempt(self, attempt: Attempt, action: str = "cancel") -> None:
        """One HTTP attempt: target (or targets, for a list), number, status, code, request
        id, latency, decision."""
        target, batch = attempt.target, attempt.batch
        if batch:  # one record for a call naming several assets: each of its targets
            where: tuple[str, Any] = ("targets", [t.selector() for t in batch])
        else:
            where = ("target", target.selector())
        self.write(
            {
                "type": "attempt",
                "at": iso(attempt.at),
                "action": action,
                where[0]: where[1],
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
                **({"subject": attempt.subject} if attempt.subject is not None else {}),
            }
        )


def who_and_where() -> dict[str, Any]:
    """The operator, host, process and command line for a run_started record."""
    try:
        operator = getpass.getuser()
    except (KeyError, OSError):
        operator = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    return {
        "operator": operator,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "argv": list(sys.argv),
    }


def _last_line_hash(path: Path) -> str | None:
    """The sha256 of the last complete line, to continue the chain when appending."""
    line = last_line(path)
    return hashlib.sha256(line).hexdigest() if line else None
