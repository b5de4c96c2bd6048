"""What a report shows beyond the summary, read from the run's journal and audit log once each.

Outcomes by org and by product key, a latency histogram, the failed and effect-unknown targets
(the first LISTED of each, and how many), requests abandoned in flight, the run's timeline
(segments, stops, rate cuts), and per-segment request counts for a segment that died before it
could record them. Memory stays bounded: counters, capped lists, and the failed targets (which
``failed.csv`` must list in full).

It also writes ``failed.csv`` (every target whose final outcome is failed, usable as the
``targets_file`` of a follow-up job) and ``followup.yaml`` (that job, ready to validate).
"""

from __future__ import annotations

import base64
import csv
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from worker.model import Outcome, gc_paused, key_digest
from worker.report.summary import JournalTally, Tally, build_summary
from worker.store import checkpoint
from worker.store.audit import AUDIT_FILE
from worker.store.journal import RESULTS_FILE, JournalCursor, read_journal, record_key
from worker.store.rundir import (
    Finished,
    finished_targets,
    line_flags,
    read_manifest,
    read_verify_counts,
)
from worker.store.state import ExitCode, Manifest, Summary

LISTED = 1000
LATENCY_EDGES_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
FAILED_FILE, FOLLOWUP_FILE = "failed.csv", "followup.yaml"
_COLUMNS = ("asset_id", "product_key", "device_key", "command_id", "org_id")


@dataclass(frozen=True)
class RunReport:
    """One run directory, read for a report."""

    run_dir: Path
    manifest: Manifest
    summary: Summary
    details: Details


class RunTally:
    """The summary's tally and the report's counts of a journal, as one fold that a resume
    starts while it reads its done set (or loads from the last checkpoint) and the end of the
    segment finishes with the new lines; it also keeps each line's done.bin record."""

    def __init__(self) -> None:
        self.tally = Tally()
        self.found = Details()
        self.cursor = JournalCursor()
        self.done = bytearray()  # done.bin: a record per line read

    @classmethod
    def from_checkpoint(cls, run_dir: Path) -> RunTally:
        """The fold as the last checkpoint left it when it matches the journal, else empty."""
        loaded = checkpoint.load(run_dir)
        return cls() if loaded is None else cls.resumed(*loaded)

    def add(
        self, record: dict[str, Any], digest: int | None = None, flags: int | None = None
    ) -> None:
        """Count one journal record (in journal order)."""
        _count_result(self.found, record)
        self.tally.add(record)
        if digest is None:
            digest = key_digest(record_key(record))
        flags = line_flags(record) if flags is None else flags
        self.done += checkpoint.done_record(digest, flags)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the fold."""
        tally, found = self.tally, self.found
        return {
            "outcomes": dict(tally.outcomes), "errors": dict(tally.errors),
            "attempts": tally.attempts, "unknown": tally.unknown,
            "latencies": base64.b64encode(tally.latencies.tobytes()).decode(),
            "commands": dict(tally.commands), "failed_earlier": tally.failed_earlier,
            "groups": [[*key, count] for key, count in found.groups.items()],
            "latency": found.latency,
            "failed": {f"{d:032x}": row for d, row in found.failed.items()},
            "unknown_rows": found.unknown, "unknown_total": found.unknown_total,
        }  # fmt: skip

    @classmethod
    def resumed(cls, cursor: JournalCursor, state: dict[str, Any], done: bytes) -> RunTally:
        """The fold as a checkpoint left it, for the journal before `cursor`."""
        counted = cls()
        counted.cursor = cursor
        counted.done += done
        tally, found = counted.tally, counted.found
        tally.outcomes.update(state["outcomes"])
        tally.errors.update(state["errors"])
        tally.attempts, tally.unknown = state["attempts"], state["unknown"]
        tally.latencies.frombytes(base64.b64decode(state["latencies"]))
        tally.commands.update(state["commands"])
        tally.failed_earlier.update(state["failed_earlier"])
        found.groups.update({(o, p, x): n for o, p, x, n in state["groups"]})
        found.latency = list(state["latency"])
        found.failed = {int(d, 16): row for d, row in state["failed"].items()}
        found.unknown, found.unknown_total = state["unknown_rows"], state["unknown_total"]
        return counted

    def read_rest(self, run_dir: Path) -> tuple[JournalTally, Details]:
        """Count the lines after the cursor; the counts of the whole journal."""
        with gc_paused():
            for record in read_journal(run_dir / RESULTS_FILE, self.cursor):
                self.add(record)
        return self.tally.result(), self.found


def read_for_resume(run_dir: Path, *, retry_failed: bool) -> tuple[RunTally, Finished]:
    """What is final, and the counts so far: from the last checkpoint when it matches the
    journal (then only the lines after it are parsed), else from the whole journal."""
    counted = RunTally.from_checkpoint(run_dir)
    found = checkpoint.replay(bytes(counted.done), retry_failed=retry_failed)
    finished = finished_targets(run_dir, retry_failed=retry_failed, cursor=counted.cursor,
                                visit=counted.add, found=found)  # fmt: skip
    return counted, finished


def tally_with_details(run_dir: Path) -> tuple[JournalTally, Details]:
    """The summary's tally and the report's counts: from the checkpoint when it matches the
    journal, then the lines after it (`worker report` of a million-line run reads little)."""
    return RunTally.from_checkpoint(run_dir).read_rest(run_dir)


def load_run(run_dir: Path, read: tuple[JournalTally, Details] | None = None) -> RunReport:
    """Read a run directory for a report (`read`: what :func:`tally_with_details` just gave,
    when the caller has it). A last segment that died (kill -9, OOM) recorded neither its
    requests nor its duration: they are taken from its audit records."""
    manifest = read_manifest(run_dir)
    counts, found = read if read is not None else tally_with_details(run_dir)
    verify = read_verify_counts(run_dir)
    summary = build_summary(manifest, counts, exit_code=manifest.last_exit_code or 0,
                            verify=verify)  # fmt: skip
    complete_details(found, run_dir, summary, manifest)
    last = manifest.segments[-1] if manifest.segments else None
    if last is not None and last.finished_at is None and found.segment_requests:
        last.requests = found.segment_requests[-1]
        last.duration_s = max(0.0, _seconds(found.segment_last_at[-1]) - _seconds(last.started_at))
        summary = build_summary(manifest, counts, exit_code=int(ExitCode.ABORTED),
                                verify=verify)  # fmt: skip
    return RunReport(run_dir, manifest, summary, found)


def _seconds(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


@dataclass
class Details:
    """The report's detail of one run directory."""

    groups: Counter[tuple[str, str, str]] = field(default_factory=Counter)  # org, product, outcome
    latency: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1))
    failed: dict[int, dict[str, Any]] = field(default_factory=dict)  # digest -> row, in order
    unknown: list[dict[str, Any]] = field(default_factory=list)
    unknown_total: int = 0
    abandoned: list[dict[str, Any]] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (ISO time, what happened)
    segment_requests: list[int] = field(default_factory=list)  # counted from the audit
    segment_last_at: list[str] = field(default_factory=list)

    @property
    def by_org(self) -> dict[str, Counter[str]]:
        """Outcomes by org."""
        return self._by(0)

    @property
    def by_product(self) -> dict[str, Counter[str]]:
        """Outcomes by product key ("(by asset id)" for targets named by asset)."""
        return self._by(1)

    def _by(self, part: int) -> dict[str, Counter[str]]:
        grouped: dict[str, Counter[str]] = {}
        for key, count in self.groups.items():
            if count:
                grouped.setdefault(key[part], Counter())[key[2]] += count
        return grouped


def complete_details(found: Details, run_dir: Path, summary: Summary, manifest: Manifest) -> None:
    """Add the timeline; read the audit log only when the report needs what only it holds
    (requests abandoned in flight, a segment that died): at a million targets it is the
    longest file of the run, and most runs end cleanly."""
    died = bool(manifest.segments) and manifest.segments[-1].finished_at is None
    if summary.abandoned or died:
        with gc_paused():
            _read_audit(found, run_dir / AUDIT_FILE)
    _segment_events(found, manifest)
    _rate_cuts(found, summary)


def _segment_events(found: Details, manifest: Manifest) -> None:
    """The timeline's segments, from run.json (the audit's run records hold the same facts)."""
    for number, segment in enumerate(manifest.segments, start=1):
        limits = segment.limits
        asked = "auto" if limits.adaptive else limits.rate or "unlimited"
        found.events.append(
            (
                segment.started_at,
                f"segment {number} started: {manifest.targets:,} targets, rate {asked}",
            )
        )
        if segment.finished_at is not None:
            why = f": {segment.message}" if segment.message else ""
            found.events.append(
                (
                    segment.finished_at,
                    f"segment {number} ended ({segment.reason}, exit {segment.exit_code}){why}",
                )
            )


def _row(record: dict[str, Any]) -> dict[str, Any]:
    target = record["target"]
    return {
        "asset_id": target.get("asset_id") or "",
        "product_key": target.get("product_key") or "",
        "device_key": target.get("device_key") or "",
        "command_id": record.get("command_id") or "",
        "org_id": record.get("org_id") or "",
        "code": record.get("code")
        if record.get("code") not in (None, 0)
        else record.get("http_status"),
        "msg": (record.get("msg") or record.get("error") or "")[:200],
        "attempts": record.get("attempts"),
        "outcome": record.get("outcome"),
    }


def _count_result(found: Details, record: dict[str, Any]) -> None:
    """Count one journal line; rows and digests are built only for the few lines that need
    them (failed, effect unknown), since this runs once per target at the end of every run."""
    outcome = record.get("outcome", "")
    failed = outcome == Outcome.FAILED
    if found.failed or failed:  # a --retry-failed line may supersede a failed one
        digest = key_digest(record_key(record))
        earlier = found.failed.pop(digest, None)
        if earlier is not None:
            found.groups[earlier["org_id"], _product(earlier), Outcome.FAILED.value] -= 1
        if failed:
            found.failed[digest] = _row(record)
    product = record["target"].get("product_key") or _BY_ASSET
    found.groups[record.get("org_id") or "", product, outcome] += 1
    latency = record.get("latency_ms")
    if latency is not None:
        found.latency[_bucket(latency)] += 1
    if record.get("effect_unknown"):
        found.unknown_total += 1
        if len(found.unknown) < LISTED:
            found.unknown.append(_row(record))


_BY_ASSET = "(by asset id)"


def _product(row: dict[str, Any]) -> str:
    return str(row["product_key"]) or _BY_ASSET


def _bucket(latency_ms: float) -> int:
    """The histogram bucket: the first edge above the latency (the last bucket past them)."""
    return bisect_right(LATENCY_EDGES_MS, latency_ms)


def _read_audit(found: Details, path: Path) -> None:
    """Segments, stops and abandoned requests from the audit log."""
    if not path.exists():
        return
    last = b""
    with path.open("rb") as stream:
        for line in stream:
            if b'"type":"attempt"' in line and b'"abandoned"' not in line:
                if found.segment_requests:
                    found.segment_requests[-1] += 1
                    last = line
                continue
            if last and found.segment_last_at:  # a new segment starts: the last one ended there
                found.segment_last_at[-1] = _at(last)
                last = b""
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            _audit_record(found, record)
    if last and found.segment_last_at:
        found.segment_last_at[-1] = _at(last)


def _at(line: bytes) -> str:
    start = line.find(b'"at":"') + 6
    return line[start : line.find(b'"', start)].decode(errors="replace")


def _audit_record(found: Details, record: dict[str, Any]) -> None:
    """Per segment: its requests and its last moment (a segment that died recorded neither);
    and the requests abandoned in flight."""
    kind, at = record.get("type"), str(record.get("at", ""))
    if kind == "run_started":
        found.segment_requests.append(0)
        found.segment_last_at.append(at)
    elif kind == "attempt" and record.get("decision") == "abandoned":
        if found.segment_requests:
            found.segment_requests[-1] += 1
        if len(found.abandoned) < LISTED:
            found.abandoned.append({**_row({**record, "outcome": "abandoned"}), "at": at})


def _rate_cuts(found: Details, summary: Summary) -> None:
    """Where the allowed rate fell, from the summary's timeline."""
    previous: dict[int, float] = {}
    for segment, seconds, _, allowed in summary.rate.timeline:
        if allowed is None:
            continue
        before = previous.get(segment)
        if before is not None and allowed < 0.95 * before:
            found.events.append(
                (
                    f"segment {segment} +{seconds:.0f} s",
                    f"allowed rate lowered {before:.0f} -> {allowed:.0f}/s",
                )
            )
        previous[segment] = allowed


def write_followup(directory: Path, manifest: Manifest, found: Details) -> Path | None:
    """failed.csv and followup.yaml for the targets still failed; None when there are none."""
    if not found.failed:
        for name in (FAILED_FILE, FOLLOWUP_FILE):
            (directory / name).unlink(missing_ok=True)
        return None
    with (directory / FAILED_FILE).open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(_COLUMNS)
        for row in found.failed.values():
            writer.writerow([row[name] for name in _COLUMNS])
    limits = manifest.limits
    rate = "auto" if limits.adaptive else (limits.rate or "unlimited")
    lines = [
        f"# Follow-up of run {manifest.run_id}: the {len(found.failed):,} targets that failed.",
        "# Read why in report.html (failed targets) before you run it; fix the cause first.",
        "version: 1",
        f"name: {manifest.job_name}-followup",
        *_match_lines(manifest.match),
        f"limits: {{rate: {rate}, concurrency: {limits.concurrency}, attempts: "
        f"{limits.attempts}, timeout: {limits.timeout:g}}}",
        f"targets_file: {FAILED_FILE}",
    ]
    path = directory / FOLLOWUP_FILE
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _match_lines(match: dict[str, Any] | None) -> list[str]:
    if not match:
        return []
    lines = ["match:"]
    for key, value in match.items():
        if value is None:
            continue
        if key.endswith("_ms"):
            moment = datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lines.append(f"  {key.removesuffix('_ms')}: {moment}")
        else:
            lines.append(f"  {key}: {orjson.dumps(value).decode()}")
    return lines
