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

import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TextIO

import anyio
import orjson
import structlog

from worker.app.beside import drive
from worker.app.wiring import RunOptions, build_engine, client_for, proven
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.enos.client import EnOSClient
from worker.errors import ExitCode
from worker.model import Attempt, Match, Outcome, Target, TargetResult, key_digest
from worker.report.details import load_run
from worker.report.html import write_report
from worker.store.appendlog import AppendLog, iso
from worker.store.journal import read_journal, record_key
from worker.store.layout import (
    RunDir,
    read_manifest,
    read_summary,
    write_summary,
    write_verify_counts,
)
from worker.store.records import ResultRecord, VerifyCountsRecord

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

    def to_json(self) -> VerifyCountsRecord:
        """As in verify.json and summary.json's ``verify``."""
        return {
            "checked": self.checked,
            "verified": self.verified,
            "still_pending": self.still_pending,
            "commands_pending": self.commands_pending,
            "unverified": self.unverified,
            "other_pending": self.other_pending,
            "finished_at": self.finished_at,
            "complete": self.complete,
        }


@dataclass(slots=True)
class _Asked:
    """Per target: its outcome, and what its result says the job asked for."""

    outcome: str
    matched: frozenset[str] | None = None  # selective: the matched ids; None: the rule does
    unknown: bool = False  # selective, failed before its search was read: no matched ids


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
        unknown = asked.unknown and target.match is None  # no rule to judge the search by
        if asked.matched is not None:
            pending = sorted(found & asked.matched)
            other = len(found) - len(pending)
        elif unknown:
            pending, other = [], len(found)
        else:
            pending, other = sorted(found), len(result.kept_command_ids)
        failed = result.outcome is Outcome.FAILED
        verified = None if failed or unknown else not pending
        self._count(verified, pending, other)
        self.out.append_line(
            orjson.dumps(
                {
                    "target": target.selector(),
                    "org_id": target.org_id,
                    "command_id": target.command_id,
                    "outcome": asked.outcome,
                    "verified": verified,
                    "still_pending": pending,
                    "other_pending": other,
                    "error": result.error if failed else _UNKNOWN if unknown else None,
                    "request_id": result.request_id,
                    "checked_at": iso(result.finished_at),
                }
            )
        )

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


_UNKNOWN = (
    "its search failed during the run, so what its match selected is not known; with no "
    "job-level match in run.json there is nothing to check it against"
)


def sweep_targets(
    run: RunDir, match: Match | None = None
) -> tuple[Iterator[tuple[int, Target]], dict[int, _Asked]]:
    """What each finished target asked for (read once), and its searches, built as the engine
    takes them (a second pass: a million targets are never all held as objects).

    A selective target that failed before its search was read knows no matched ids: it is
    searched with the job's `match` (run.json), whose matches are then what it asked for;
    without one (an inline target's own rule) it is searched for nothing and stays unverified.
    """
    path = run.results
    asked: dict[int, _Asked] = {}
    later: dict[int, int] = {}  # targets with more than one line: lines left before the last
    for line in read_journal(path):
        digest = key_digest(record_key(line))
        if digest in asked:
            later[digest] = later.get(digest, 1) + 1
        matched = line.get("matched_command_ids")
        selection = frozenset(matched) if matched is not None else None
        if _unknown_matches(line):
            selection = None  # the job's rule decides (or, without one, nothing is known)
        asked[digest] = _Asked(line.get("outcome", ""), selection, unknown=_unknown_matches(line))
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
                yield ordinal, _probe_target(line, match)

    return searches(), asked


def _unknown_matches(line: ResultRecord) -> bool:
    """A selective target that failed without knowing what its rule matched."""
    return line.get("outcome") == Outcome.FAILED and line.get("matched_command_ids") == []


def _probe_target(line: ResultRecord, job_match: Match | None) -> Target:
    """The search to make for a result line: for cancel-all, what was cached before it; for a
    selective target that failed before its search was read, the job's rule."""
    selector = line["target"]
    command_id = line.get("command_id")
    match = job_match if _unknown_matches(line) else None
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


async def verify_run(options: RunOptions, out: TextIO | None = None) -> int:
    """`worker verify DIR` (and `run --verify`): the sweep, then summary.json and the report
    updated; exit 0 when every searched target is verified, 1 when some are still pending or
    could not be searched (or the sweep was stopped), 3 when the gateway cannot be used."""
    client = client_for(options)
    async with proven(client, options) as problem:
        if problem is not None:
            (out or sys.stderr).write(f"worker: verify stopped: {problem}\n")
            return ExitCode.ABORTED
        counts, engine = await _sweep(client, options, out)
    _record_sweep(options.run, counts, out)
    if engine.stop_reason is StopReason.FATAL:
        return ExitCode.ABORTED
    clean = counts.complete and not counts.still_pending and not counts.unverified
    return ExitCode.OK if clean else ExitCode.FAILED


async def _sweep(
    client: EnOSClient, options: RunOptions, out: TextIO | None
) -> tuple[VerifyCounts, Engine]:
    """Wait the settle delay, search every finished target (with signals and, when asked, the
    progress line: a 200,000-target sweep at 100 searches/s takes half an hour), write
    verify.jsonl and verify.json; returns the counts and the engine."""
    run = options.run
    targets, asked = sweep_targets(run, read_manifest(run).match)
    total = len(asked)
    run.verify_lines.unlink(missing_ok=True)  # each sweep says what is true now
    recorder = _Sweep(AppendLog(run.verify_lines), asked)
    engine = build_engine(client, recorder, options, dry_run=True)
    settle_s = options.verify_settle_s
    log.info("worker.verify_starting", targets=total, settle_s=settle_s)
    await anyio.sleep(settle_s)
    try:
        reason = await drive(
            engine, targets, total=total, out=out, progress=options.progress, searching=True
        )
    finally:
        recorder.out.close()
    counts = recorder.counts
    counts.complete = reason is StopReason.FINISHED and not asked
    counts.finished_at = iso(time.time())
    write_verify_counts(run, counts.to_json())
    log.info("worker.verify_finished", **counts.to_json())
    return counts, engine


def _record_sweep(run: RunDir, counts: VerifyCounts, out: TextIO | None) -> None:
    """The counts into summary.json (which keeps everything else) and the report page."""
    summary = read_summary(run)
    if summary is not None:
        write_summary(run, replace(summary, verify=counts.to_json()))
    write_report([load_run(run)], run.report)
    stream = out or sys.stdout
    stream.write(
        f"Verify sweep of {run}: {counts.verified:,} of {counts.checked:,} targets verified"
        f", {counts.still_pending:,} still pending ({counts.commands_pending:,} commands), "
        f"{counts.unverified:,} could not be searched; details in {run.verify_lines}\n"
    )
    if not counts.complete:
        stream.write("The sweep did not search every target; run worker verify again.\n")
    stream.flush()
