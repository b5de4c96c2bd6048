"""results.jsonl: one final line per target, written as it happens; also the resume journal.

Lines are written through :class:`worker.store.appendlog.AppendLog` (one ``os.write`` each, so
``kill -9`` loses nothing written). Reading back tolerates a torn last line, which only a
machine crash can leave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from worker.model import Target, TargetResult, identity_key
from worker.store.records import AttemptRecord, ResultRecord

if TYPE_CHECKING:
    from worker.store.layout import RunDir
from worker.store.appendlog import AppendLog, WriteGuard, iso

log = structlog.get_logger("worker.journal")


def result_record(result: TargetResult) -> ResultRecord:
    """The results.jsonl fields of one result (design.md, Outputs); a selective target's line
    also says what its match selected, what was gone, and how many cached commands it kept."""
    target = result.target
    record = _plain_record(result, target)
    if target.match is not None:
        record["matched_command_ids"] = list(result.matched_command_ids)
        record["missed_command_ids"] = list(result.missed_command_ids)
        record["kept"] = len(result.kept_command_ids)
        record["kept_command_ids"] = list(result.kept_command_ids)  # what a stage gate checks
    return record


def _plain_record(result: TargetResult, target: Target) -> ResultRecord:
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
        "batch_size": result.batch_size,
    }


class ResultJournal:
    """Appends result lines to results.jsonl."""

    def __init__(self, run: RunDir, guard: WriteGuard | None = None) -> None:
        self.log = AppendLog(run.results, guard)

    def write(self, result: TargetResult) -> None:
        """Record one final result."""
        self.log.append_line(orjson.dumps(result_record(result)))


def record_key(record: ResultRecord | AttemptRecord) -> str:
    """The identity key of the target a results.jsonl record is about (see Target.key)."""
    selector = record.get("target") or {}
    return identity_key(
        record["org_id"],
        selector.get("asset_id"),
        selector.get("product_key"),
        selector.get("device_key"),
        record.get("command_id"),
    )


class JournalCursor:
    """Where a reader of a journal stopped: just past its last complete line. A reader given
    it goes on from there (the end of a resumed segment reads only the lines it added)."""

    __slots__ = ("offset", "sha256")

    def __init__(self) -> None:
        self.offset = 0
        self.sha256: Any = hashlib.sha256()  # of every byte before `offset` (the checkpoint's)


def read_journal(path: Path, cursor: JournalCursor | None = None) -> Iterator[ResultRecord]:
    """Every readable line of a JSON-lines file (from `cursor`, which it moves on).

    An unterminated last line (a torn write) ends the file. A damaged line in the middle is
    skipped with a warning: its target has no result, so a resume runs it again.
    """
    if not path.exists():
        return
    with path.open("rb") as stream:
        if cursor is not None:
            stream.seek(cursor.offset)
        for number, line in enumerate(stream, start=1):
            if not line.endswith(b"\n"):
                return
            if cursor is not None:
                cursor.offset += len(line)
                cursor.sha256.update(line)
            try:
                yield orjson.loads(line)  # the run's own file: its lines are ResultRecords
            except orjson.JSONDecodeError:
                log.warning("worker.journal_line_unreadable", path=str(path), line=number)
