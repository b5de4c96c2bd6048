"""`worker audit verify DIR`: is the run's record whole, in order, and consistent?

It checks, reading each file once (memory: a few dozen bytes per target):

1. **The hash chain** of audit.jsonl across all segments: every line is complete JSON, its
   ``prev`` is the sha256 of the line before (the first: of the run id in run.json), the
   segments are in order (``run_started``, attempts and change records (``control``,
   ``window``, ``stage``, ``gate``), ``run_finished``; a segment that died has
   no ``run_finished``), nothing follows the last ``run_finished`` but a new ``run_started``, and
   there are as many segments as run.json lists. An edited, removed, reordered, truncated or
   appended line breaks one of these.
2. **The journal against the audit**: every result has attempt records for its target (at least
   as many as it counts) and one with its request id; one result per target, except one that a
   ``--retry-failed`` segment superseded.
3. **A stage gate's evidence**: each ``gate`` record names its searches' file
   (gate-N-T.jsonl, outside the chain as the verify sweep's are) and its sha256; the file,
   when there, must still hash so.
4. **The summary**: summary.json says what the journal says (outcomes, not attempted, effect
   unknown, attempts), and the last ``run_finished`` record carries the same summary.

A chain proves order and completeness up to its last line, not against someone who rewrites
the whole file: record the chain head the run prints (``audit head``) in the ticket, and pass it
as ``--head`` to prove the file still ends there.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import orjson

from worker.model import JsonObject, Outcome, gc_paused, key_digest
from worker.report.summary import build_summary
from worker.store.journal import record_key
from worker.store.layout import RunDir, read_manifest
from worker.store.records import (
    AttemptRecord,
    AuditRecord,
    GateEventRecord,
    ResultRecord,
    RunStartedRecord,
    TargetsResolvedRecord,
)
from worker.store.state import Manifest
from worker.store.tally import count_journal

CHANGE_RECORDS = ("control", "window", "stage", "gate")


class AuditBroken(Exception):
    """The first thing found wrong: the file, its line, and what."""

    def __init__(self, path: Path, line: int | None, what: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {what}")


@dataclass
class Verified:
    """What a verification read (when nothing was wrong)."""

    records: int = 0
    segments: int = 0
    attempts: int = 0
    results: int = 0
    head: str = ""
    died: bool = False  # the last segment has no run_finished
    last_started: RunStartedRecord | None = None
    notes: list[str] = field(default_factory=list)
    changes: int = 0  # control, window, stage and gate records
    gates: list[tuple[int, str, str]] = field(default_factory=list)  # stage, file, sha256


@dataclass
class _Attempts:
    """Per target (by digest): how many attempt records, and which (target, request id) pairs."""

    counts: Counter[int] = field(default_factory=Counter)
    request_ids: set[int] = field(default_factory=set)


def verify(run: RunDir, *, head: str | None = None) -> Verified:
    """Check the run directory; raise AuditBroken at the first problem."""
    manifest = read_manifest(run)
    found = Verified()
    with gc_paused():
        attempts = _check_chain(run.audit, manifest.run_id, found)
        if found.segments != len(manifest.segments):
            raise AuditBroken(
                run.audit,
                None,
                f"{found.segments} segments started, run.json lists {len(manifest.segments)}",
            )
        _check_results(run.results, attempts, found)
    _check_manifest(run, manifest, found)
    _check_gates(run, found)
    if head is not None and head.lower() != found.head:
        raise AuditBroken(
            run.audit,
            found.records,
            f"the chain ends at {found.head}, "
            f"not at the head given ({head}): records were removed or rewritten",
        )
    _check_summary(run, found)
    return found


def _check_manifest(run: RunDir, manifest: Manifest, found: Verified) -> None:
    """run.json says what the audit's last run_started says (run id, job and targets hashes,
    gateway): an edited run.json (a gateway pointed elsewhere) is found."""
    started = found.last_started
    if started is None:
        return
    for key, value in (
        ("run_id", manifest.run_id),
        ("job_sha256", manifest.job_sha256),
        ("targets_sha256", manifest.targets_sha256),
        ("gateway", manifest.gateway),
    ):
        if started.get(key) != value:
            raise AuditBroken(
                run.manifest,
                None,
                f"its {key} is {value!r:.80}, the audit's last run_started says "
                f"{started.get(key)!r:.80}: run.json was changed outside worker",
            )
    if manifest.query is not None and manifest.targets_file is not None:
        _check_snapshot(run.path / manifest.targets_file, manifest.targets_sha256)


def _check_snapshot(path: Path, expected: str) -> None:
    """A targets_query's snapshot still hashes as run.json and the audit say."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        why = f"the targets snapshot cannot be read: {exc.strerror}"
        raise AuditBroken(path, None, why) from None
    if digest.hexdigest() != expected:
        raise AuditBroken(path, None, "the targets snapshot no longer hashes as recorded: edited")


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    if not path.exists():
        raise AuditBroken(path, None, "missing")
    with path.open("rb") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.endswith(b"\n"):
                raise AuditBroken(path, number, "the last line is incomplete (cut off)")
            yield number, line[:-1]


def _check_chain(path: Path, run_id: str, found: Verified) -> _Attempts:
    """The chain and the segment structure; collects the attempts by target."""
    prev = hashlib.sha256(run_id.encode()).hexdigest()
    attempts = _Attempts()
    in_segment = False
    for number, line in _lines(path):
        try:
            record: AuditRecord = orjson.loads(line)  # any audit record; checked below
        except orjson.JSONDecodeError:
            raise AuditBroken(path, number, "not JSON") from None
        if record.get("prev") != prev:
            raise AuditBroken(
                path,
                number,
                "the chain is broken: its prev is not the sha256 of "
                "the line before (a record was edited, removed or reordered)",
            )
        prev = hashlib.sha256(line).hexdigest()
        kind: object = record.get("type")
        if kind == "run_started":
            found.segments += 1
            found.last_started = cast("RunStartedRecord", record)
            if record.get("segment") != found.segments or record.get("run_id") != run_id:
                raise AuditBroken(path, number, "a run_started out of order or of another run")
            in_segment = True
        elif not in_segment:
            raise AuditBroken(
                path,
                number,
                f"a {kind} record outside a segment (after "
                "run_finished, or before run_started): forged or misplaced",
            )
        elif kind == "run_finished":
            in_segment = False
        else:
            _in_segment(record, found, attempts, path, number)
        found.records += 1
    if not found.records:
        raise AuditBroken(path, None, "empty")
    if in_segment:
        found.died = True
        found.notes.append("the last segment has no run_finished: it died (kill -9, OOM, power)")
    found.head = prev
    return attempts


def _in_segment(
    record: AuditRecord, found: Verified, attempts: _Attempts, path: Path, number: int
) -> None:
    """A record inside a segment: an attempt (counted by target), a targets_query's
    resolution, or a change record (worker ctl, the window, a stage, a gate: a gate's evidence
    file noted); anything else is unknown."""
    kind: object = record.get("type")
    if kind == "attempt":
        for digest in _attempt_digests(cast("AttemptRecord", record)):
            attempts.counts[digest] += 1
            attempts.request_ids.add(hash((digest, record.get("request_id"))))
        found.attempts += 1
    elif kind == "targets_resolved":
        _resolved(cast("TargetsResolvedRecord", record), found, path, number)
    elif kind in CHANGE_RECORDS:
        found.changes += 1
        if kind == "gate":
            gate = cast("GateEventRecord", record)
            found.gates.append((gate["stage"], gate["evidence"], gate["evidence_sha256"]))
    else:
        raise AuditBroken(path, number, f"an unknown record type {kind!r:.40}")


def _resolved(record: TargetsResolvedRecord, found: Verified, path: Path, number: int) -> None:
    """A targets_query resolved in this segment: its snapshot's hash stands for the segment's
    targets from here on (run.json then says it)."""
    started = found.last_started
    if started is None or record.get("segment") != found.segments:
        raise AuditBroken(path, number, "a targets_resolved record of another segment")
    digest = record.get("targets_sha256")
    if isinstance(digest, str):
        found.last_started = cast("RunStartedRecord", {**started, "targets_sha256": digest})


def _check_gates(run: RunDir, found: Verified) -> None:
    """Each gate record against its evidence file (gate-N-T.jsonl), when the file is there:
    the searches stay outside the chain, and this sha256 is what ties them to it."""
    for stage, name, digest in found.gates:
        path = run.path / name
        if not path.exists():
            found.notes.append(f"the evidence of stage {stage}'s gate ({name}) is missing")
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise AuditBroken(path, None, f"does not hash as stage {stage}'s gate record says")


def _attempt_digests(record: AttemptRecord) -> list[int]:
    """The targets an attempt record is about: one, or every target of a list call."""
    listed = record.get("targets")
    if not isinstance(listed, list):
        return [key_digest(record_key(record))]
    return [key_digest(record_key({**record, "target": selector})) for selector in listed]


def _check_results(path: Path, attempts: _Attempts, found: Verified) -> None:
    """Every result has its attempts and request id; one result per target."""
    final: dict[int, str] = {}  # digest -> outcome of its line so far
    if not path.exists():
        return
    for number, line in _lines(path):
        try:
            record: ResultRecord = orjson.loads(line)  # its fields are checked below
        except orjson.JSONDecodeError:
            raise AuditBroken(path, number, "not JSON") from None
        digest = key_digest(record_key(record))
        seen = attempts.counts.get(digest, 0)
        if not seen:
            raise AuditBroken(path, number, "a result with no attempt record in audit.jsonl")
        if (record.get("attempts") or 0) > seen:
            raise AuditBroken(
                path,
                number,
                f"the result counts {record.get('attempts')} attempts, audit.jsonl has {seen}",
            )
        request_id = record.get("request_id")
        if request_id is not None and hash((digest, request_id)) not in attempts.request_ids:
            raise AuditBroken(path, number, "no attempt record has this result's request_id")
        earlier = final.get(digest)
        if earlier is not None and earlier != Outcome.FAILED:
            raise AuditBroken(path, number, "a second final result for one target")
        final[digest] = record.get("outcome", "")
        found.results += 1


def _check_summary(run: RunDir, found: Verified) -> None:
    path = run.summary
    if not path.exists() or found.died:
        found.notes.append(
            "summary.json does not cover the last segment, which did not finish "
            "(resume the run to complete it)"
        )
        return
    written: JsonObject = orjson.loads(path.read_bytes())  # checked key by key below
    manifest = read_manifest(run)
    expected = build_summary(manifest, count_journal(run), exit_code=written.get("exit_code", 0))
    for key in ("outcomes", "not_attempted", "effect_unknown", "attempts", "targets"):
        if written.get(key) != getattr(expected, key):
            raise AuditBroken(
                path,
                None,
                f"{key} is {written.get(key)!r:.80}; the journal says "
                f"{getattr(expected, key)!r:.80}",
            )
    last = _last_finished_summary(run.audit)
    if last is not None and _without_verify(last) != _without_verify(written):
        raise AuditBroken(path, None, "differs from the summary in the last run_finished record")


def _without_verify(summary: JsonObject) -> JsonObject:
    """A summary without its verify counts, which a later sweep may have added."""
    return {key: value for key, value in summary.items() if key != "verify"}


def _last_finished_summary(path: Path) -> JsonObject | None:
    last: JsonObject | None = None
    for _, line in _lines(path):
        if b'"run_finished"' in line:
            record = orjson.loads(line)
            if record.get("type") == "run_finished":
                last = record.get("summary")
    return last
