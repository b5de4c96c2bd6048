"""The verify sweep (``worker verify DIR``, ``worker run --verify``): after the cancels, search
each finished target's device (Search Command, ``state = 1``, every page) and record whether
anything the job asked to cancel is still pending.

What "asked" means comes from the target's own line in results.jsonl, so the sweep needs no
job file: for a cancel-all target, every cached command created before its result; for one
``command_id``, that command; for a selective target, the commands its match selected
(``matched_command_ids``). A pending command the job did not ask for (created after the
cancel, or not matched) is counted as ``other_pending``, never as a failure.

It is read-only: its searches go through the run's engine in dry-run mode (the same limiter,
retries and stop rules), at the run's rate, after EnOS's settle delay. Its record is
``verify.jsonl`` (one line per checked target, rewritten by each sweep) and ``verify.json``
(the counts, also in summary.json and the report); audit.jsonl stays the record of what was
sent to change things.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
import orjson
import structlog

from worker.core.engine import Engine
from worker.core.ports import Recorder, StopReason
from worker.model import Attempt, Match, Outcome, Target, TargetResult, key_digest
from worker.store.appendlog import AppendLog, iso
from worker.store.journal import RESULTS_FILE, read_journal, record_key
from worker.store.rundir import VERIFY_COUNTS_FILE, write_atomically

VERIFY_FILE = "verify.jsonl"
SETTLE_S = 2.0  # EnOS applies a cancel within about 2 s; searching sooner may see it pending
log = structlog.get_logger("worker.verify")


@dataclass
class VerifyCounts:
    """What a sweep found, for summary.json and the report."""

    checked: int = 0  # targets with a final result that were searched
    verified: int = 0  # nothing the job asked to cancel is pending
    still_pending: int = 0  # targets with at least one such command pending
    commands_pending: int = 0  # those commands in all
    unverified: int = 0  # the search failed: not known
    other_pending: int = 0  # pending commands the job did not ask for (newer, not matched)
    finished_at: str | None = None
    complete: bool = False  # False: the sweep was stopped before every target was searched

    def to_json(self) -> dict[str, Any]:
        """As in verify.json and summary.json's ``verify``."""
        return dict(self.__dict__)


@dataclass(slots=True)
class _Asked:
    """Per target: its outcome, and what its result says the job asked for."""

    outcome: str
    matched: frozenset[str] | None = None  # selective: the matched ids; None: the rule does


@dataclass
class _Sweep:
    """The engine's Recorder for a sweep: each probe's result becomes a verify.jsonl line."""

    out: AppendLog
    asked: dict[int, _Asked]
    counts: VerifyCounts = field(default_factory=VerifyCounts)

    def attempt(self, attempt: Attempt, action: str) -> None:
        """Searches are not audited: the sweep changes nothing (its lines carry request ids)."""

    def result(self, result: TargetResult) -> None:
        target = result.target
        asked = self.asked.pop(target.digest())
        found = set(result.found_command_ids)
        if asked.matched is not None:
            pending = sorted(found & asked.matched)
            other = len(found) - len(pending)
        else:
            pending, other = sorted(found), len(result.kept_command_ids)
        failed = result.outcome is Outcome.FAILED
        verified = None if failed else not pending
        self._count(verified, pending, other)
        self.out.append_line(orjson.dumps({
            "target": target.selector(), "org_id": target.org_id,
            "command_id": target.command_id, "outcome": asked.outcome, "verified": verified,
            "still_pending": pending, "other_pending": other,
            "error": result.error if failed else None, "request_id": result.request_id,
            "checked_at": iso(result.finished_at),
        }))  # fmt: skip

    def _count(self, verified: bool | None, pending: list[str], other: int) -> None:
        counts = self.counts
        counts.checked += 1
        counts.other_pending += other
        if verified is None:
            counts.unverified += 1
        elif verified:
            counts.verified += 1
        else:
            counts.still_pending += 1
            counts.commands_pending += len(pending)


def sweep_targets(run_dir: Path) -> tuple[Iterator[tuple[int, Target]], dict[int, _Asked]]:
    """What each finished target asked for (read once), and its searches, built as the engine
    takes them (a second pass: a million targets are never all held as objects)."""
    path = run_dir / RESULTS_FILE
    asked: dict[int, _Asked] = {}
    later: dict[int, int] = {}  # targets with more than one line: lines left before the last
    for line in read_journal(path):
        digest = key_digest(record_key(line))
        if digest in asked:
            later[digest] = later.get(digest, 1) + 1
        matched = line.get("matched_command_ids")
        selection = frozenset(matched) if matched is not None else None
        asked[digest] = _Asked(line.get("outcome", ""), selection)
    for digest in [d for d, a in asked.items() if a.matched is not None and not a.matched]:
        del asked[digest]  # a match that selected nothing asked for nothing: no search

    def searches() -> Iterator[tuple[int, Target]]:
        for ordinal, line in enumerate(read_journal(path)):
            digest = key_digest(record_key(line))
            left = later.get(digest)
            if left is not None:
                later[digest] = left - 1
                if left > 1:
                    continue  # a --retry-failed line follows: that one is final
            if digest in asked:
                yield ordinal, _probe_target(line)

    return searches(), asked


def _probe_target(line: dict[str, Any]) -> Target:
    """The search to make for a result line: for cancel-all, what was cached before it."""
    selector = line["target"]
    command_id = line.get("command_id")
    match = None
    if command_id is None and "matched_command_ids" not in line:
        before = int(datetime.fromisoformat(line["finished_at"]).timestamp() * 1000)
        match = Match(created_before_ms=before)
    return Target(
        org_id=line["org_id"],
        asset_id=selector.get("asset_id"),
        product_key=selector.get("product_key"),
        device_key=selector.get("device_key"),
        command_id=command_id,
        match=match,
    )


Drive = Callable[[Engine, Iterator[tuple[int, Target]], int], Awaitable[StopReason]]
EngineFor = Callable[[Recorder], Engine]  # the sweep's engine (dry run) around its recorder


async def sweep(
    run_dir: Path,
    engine_for: EngineFor,
    drive: Drive,
    *,
    settle_s: float = SETTLE_S,
) -> tuple[VerifyCounts, Engine]:
    """Wait the settle delay, search every finished target (`drive` runs the engine, with
    signals), write verify.jsonl and verify.json; returns the counts and the engine."""
    targets, asked = sweep_targets(run_dir)
    total = len(asked)
    path = run_dir / VERIFY_FILE
    path.unlink(missing_ok=True)  # each sweep says what is true now
    recorder = _Sweep(AppendLog(path), asked)
    engine = engine_for(recorder)
    log.info("worker.verify_starting", targets=total, settle_s=settle_s)
    await anyio.sleep(settle_s)
    try:
        reason = await drive(engine, targets, total)
    finally:
        recorder.out.close()
    counts = recorder.counts
    counts.complete = reason is StopReason.FINISHED and not asked
    counts.finished_at = iso(time.time())
    write_atomically(run_dir / VERIFY_COUNTS_FILE, orjson.dumps(counts.to_json()))
    log.info("worker.verify_finished", **counts.to_json())
    return counts, engine
