"""A run directory read for a report: its manifest, the journal's counts (the fold of
:mod:`worker.store.tally`, from the checkpoint when it matches), the summary built from them,
the facts of its header (:mod:`worker.report.facts`), and what only the audit log and run.json
hold: requests abandoned in flight, the timeline (segments, stops, rate cuts, a run of cuts
folded into one row), and per-segment request counts for a segment that died before it could
record them. Memory stays bounded: counters and capped lists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import orjson

from worker.errors import ExitCode
from worker.model import gc_paused
from worker.report.facts import RunFacts, read_facts
from worker.report.summary import build_summary
from worker.store.appendlog import iso
from worker.store.layout import RunDir, read_manifest, read_verify_counts
from worker.store.records import AttemptRecord, AuditRecord, FailedRow
from worker.store.resume import counts_of
from worker.store.state import Manifest, Summary
from worker.store.tally import LISTED, Counts


@dataclass
class Details:
    """What a report shows beyond the journal's counts (from the audit log and run.json)."""

    abandoned: list[FailedRow] = field(default_factory=list)
    events: list[tuple[str, str]] = field(default_factory=list)  # (ISO time, what happened)
    segment_requests: list[int] = field(default_factory=list)  # counted from the audit
    segment_last_at: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class RunReport:
    """One run directory, read for a report."""

    run: RunDir
    manifest: Manifest
    summary: Summary
    counts: Counts
    details: Details
    facts: RunFacts = field(default_factory=RunFacts)  # a page made without them says less


def load_run(run: RunDir, counts: Counts | None = None) -> RunReport:
    """Read a run directory for a report (`counts`: the journal's, when the caller just folded
    them). A last segment that died (kill -9, OOM) recorded neither its requests nor its
    duration: they are taken from its audit records."""
    manifest = read_manifest(run)
    counts = counts if counts is not None else counts_of(run)
    verify = read_verify_counts(run)
    summary = build_summary(manifest, counts, exit_code=manifest.last_exit_code or 0, verify=verify)
    details = Details()
    _read_details(details, run, summary, manifest)
    last = manifest.segments[-1] if manifest.segments else None
    if last is not None and last.finished_at is None and details.segment_requests:
        last.requests = details.segment_requests[-1]
        last_at = _seconds(details.segment_last_at[-1])
        last.duration_s = max(0.0, last_at - _seconds(last.started_at))
        summary = build_summary(manifest, counts, exit_code=int(ExitCode.ABORTED), verify=verify)
    return RunReport(run, manifest, summary, counts, details, read_facts(run, manifest))


def _seconds(iso: str) -> float:
    try:
        return datetime.fromisoformat(iso).timestamp()
    except ValueError:
        return 0.0


def _read_details(details: Details, run: RunDir, summary: Summary, manifest: Manifest) -> None:
    """The timeline; the audit log is read only when the report needs what only it holds
    (requests abandoned in flight, a segment that died): at a million targets it is the
    longest file of the run, and most runs end cleanly."""
    died = bool(manifest.segments) and manifest.segments[-1].finished_at is None
    changed = run.control.exists() or manifest.stages is not None or manifest.window is not None
    if summary.abandoned or died or changed:  # changed: worker ctl, window, stage records
        with gc_paused():
            _read_audit(details, run)
    details.events += timeline(manifest, summary.rate.timeline)


def timeline(manifest: Manifest, rates: list[list[Any]]) -> list[tuple[str, str]]:
    """Each segment's start, where its allowed rate fell, and its end, in that order (from
    run.json: the audit's run records hold the same facts); consecutive rate cuts of a segment
    are one row (a fixed rate above the gateway's limit cut it 41 times in two minutes)."""
    cuts = rate_cuts(rates)
    events: list[tuple[str, str]] = []
    for number, segment in enumerate(manifest.segments, start=1):
        limits = segment.limits
        asked = "auto" if limits.adaptive else limits.rate or "unlimited"
        started = f"segment {number} started: {manifest.targets:,} targets, rate {asked}"
        events.append((segment.started_at, started))
        events += fold_cuts(number, segment.started_at, cuts.get(number, []))
        if segment.finished_at is not None:
            why = f": {segment.message}" if segment.message else ""
            ended = f"segment {number} ended ({segment.reason}, exit {segment.exit_code}){why}"
            events.append((segment.finished_at, ended))
    return events


def rate_cuts(rates: list[list[Any]]) -> dict[int, list[tuple[float, float, float]]]:
    """Per segment, (seconds, before, after) where the allowed rate fell by over 5 %, from
    the summary's rate timeline ([segment, s, achieved, allowed])."""
    cuts: dict[int, list[tuple[float, float, float]]] = {}
    previous: dict[int, float] = {}
    for segment, seconds, _, allowed in rates:
        if allowed is None:
            continue
        before = previous.get(segment)
        if before is not None and allowed < 0.95 * before:
            cuts.setdefault(segment, []).append((float(seconds), before, float(allowed)))
        previous[segment] = float(allowed)
    return cuts


def fold_cuts(
    segment: int, started_at: str, cuts: list[tuple[float, float, float]]
) -> list[tuple[str, str]]:
    """One row for a lone cut, one row for a run of them: how many, between when, from what
    rate, down to which lowest; dated from the segment's start (to a second or so: the rate
    is sampled from when the first request could go)."""
    if not cuts:
        return []
    first, last = cuts[0], cuts[-1]
    start = _seconds(started_at)
    when = iso(start + first[0]) if start else f"segment {segment} +{first[0]:.0f} s"
    if len(cuts) == 1:
        what = f"segment {segment} +{first[0]:.0f} s: allowed rate lowered {first[1]:,.0f} -> "
        return [(when, f"{what}{first[2]:,.0f}/s")]
    lowest = min(after for _, _, after in cuts)
    return [
        (
            when,
            f"segment {segment}: allowed rate lowered {len(cuts)} times between "
            f"+{first[0]:.0f} s and +{last[0]:.0f} s, from {first[1]:,.0f}/s, "
            f"lowest {lowest:,.0f}/s",
        )
    ]


def _read_audit(details: Details, run: RunDir) -> None:
    """Segments, stops and abandoned requests from the audit log."""
    if not run.audit.exists():
        return
    last = b""
    with run.audit.open("rb") as stream:
        for line in stream:
            if b'"type":"attempt"' in line and b'"abandoned"' not in line:
                if details.segment_requests:
                    details.segment_requests[-1] += 1
                    last = line
                continue
            if last and details.segment_last_at:  # a new segment: the last one ended there
                details.segment_last_at[-1] = _at(last)
                last = b""
            try:
                record = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            _audit_record(details, record)
    if last and details.segment_last_at:
        details.segment_last_at[-1] = _at(last)


def _at(line: bytes) -> str:
    start = line.find(b'"at":"') + 6
    return line[start : line.find(b'"', start)].decode(errors="replace")


def _audit_record(details: Details, record: AuditRecord) -> None:
    """Per segment: its requests and its last moment (a segment that died recorded neither);
    and the requests abandoned in flight."""
    kind, at = record.get("type"), str(record.get("at", ""))
    if kind == "run_started":
        details.segment_requests.append(0)
        details.segment_last_at.append(at)
    elif record["type"] == "attempt" and record.get("decision") == "abandoned":
        if details.segment_requests:
            details.segment_requests[-1] += 1
        if len(details.abandoned) < LISTED:
            details.abandoned.append(_abandoned_row(record, at))
    elif (event := change_event(record)) is not None:
        details.events.append((at, event))


def _change_text(before: object, after: object) -> str:
    """ "; paused False -> True" for what a request changed ("" when nothing did)."""
    if not isinstance(after, dict) or before == after:
        return ""
    was = before if isinstance(before, dict) else {}
    return "; " + ", ".join(f"{key} {was.get(key)} -> {value}" for key, value in after.items())


def change_event(record: AuditRecord) -> str | None:
    """The timeline's line for a change record: an operator's request (worker ctl), the
    window, a stage, a gate's decision; None for any other record."""
    if record["type"] == "control":
        note = f" ({record['note']})" if record.get("note") else ""
        return (
            f"worker ctl {record['action']} by {record['by']}@{record['host']}: "
            f"{record['result']}{_change_text(record['before'], record['after'])}{note}"
        )
    if record["type"] == "window":
        if record["event"] in ("open", "opened"):
            when = f"closes at {record['closes_at'] or 'no set time'}"
        else:
            when = f"opens at {record['opens_at']}" if record["opens_at"] else "no further opening"
        return f"window {record['event']} ({record['window']}): {when}"
    if record["type"] == "stage":
        note = f" ({record['note']})" if record.get("note") else ""
        return f"stage {record['stage']} of {record['of']} {record['event']}{note}"
    if record["type"] == "gate":
        verdict = "passed" if record["passed"] else "failed: " + "; ".join(record["reasons"])
        return f"stage {record['stage']} gate {verdict} (evidence {record['evidence']})"
    return None


def _abandoned_row(record: AttemptRecord, at: str) -> FailedRow:
    """A request cut off in flight, as the report lists it."""
    target = record.get("target") or {}
    return {
        "asset_id": target.get("asset_id") or "",
        "product_key": target.get("product_key") or "",
        "device_key": target.get("device_key") or "",
        "command_id": record.get("command_id") or "",
        "org_id": record.get("org_id") or "",
        "code": record.get("code") or record.get("http_status"),
        "msg": (record.get("error") or "")[:200],
        "attempts": None,
        "outcome": "abandoned",
        "at": at,
    }


SUCCESS_WORDS = frozenset({"", "ok", "success", "succeed", "succeeded", "successful"})


def why_unknown(row: FailedRow, *, resumed: bool) -> str:
    """Why a target's effect is unknown, in words. The row keeps the reply's message, else the
    error; a success message says nothing, so the why follows from the attempts: a retry means
    an earlier call's answer was lost; a single call after an earlier segment means that
    segment may have sent it before it died."""
    said = (row["msg"] or "").strip()
    problem = (row.get("error") or "").strip()
    if problem and row["outcome"] != "failed":
        return problem  # the result says what of the reply could not be read
    silent = said.lower() in SUCCESS_WORDS
    if not silent and row["outcome"] != "failed":
        return said  # the reply's own problem (a command it listed could not be read)
    if (row["attempts"] or 0) > 1:
        cause = "answer lost: no reply read after a call that may have taken effect"
    elif resumed:
        cause = "may have been sent before a crash or a stop (an earlier segment admitted it)"
    elif row["outcome"] == "failed":
        cause = "the call may have taken effect before its answer was lost"
    else:
        cause = "the reply could not be read in full (a command in it was unreadable)"
    return f"{said or 'failed'}; {cause}" if row["outcome"] == "failed" else cause
