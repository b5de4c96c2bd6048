"""The shapes of what a run writes: journal lines, audit records, and the nested parts of
run.json and summary.json, as TypedDicts.

A TypedDict is a plain dict at run time (a million journal lines read as fast as before) while
mypy checks every key that code reads or writes. Reading a file is the one place where JSON
becomes one of these without proof: the run directory is the run's own (its files are opened
without following links, and a damaged line is skipped), so a read trusts their shape.
"""

from __future__ import annotations

from typing import Literal, NotRequired, TypedDict

from worker.model import Selector


class ResultRecord(TypedDict):
    """One line of results.jsonl: a target's final outcome (docs/outputs.md)."""

    target: Selector
    org_id: str
    command_id: str | None
    outcome: str  # an Outcome value
    cancelled_command_ids: list[str]
    attempts: int
    http_status: int | None
    code: int | None
    msg: str | None
    request_id: str | None
    error: str | None
    effect_unknown: bool
    get_state: int | None
    started_at: str
    finished_at: str
    duration_ms: float
    latency_ms: float | None
    batch_size: int
    matched_command_ids: NotRequired[list[str]]  # selective targets only
    missed_command_ids: NotRequired[list[str]]
    kept: NotRequired[int]


class AttemptRecord(TypedDict):
    """One HTTP attempt in audit.jsonl; a list call names `targets` instead of `target`."""

    type: Literal["attempt"]
    at: str
    action: str
    target: NotRequired[Selector]
    targets: NotRequired[list[Selector]]
    org_id: str
    command_id: str | None
    attempt: int
    http_status: int | None
    code: int | None
    request_id: str | None
    latency_ms: float | None
    decision: str  # a Decided value
    wait_s: float | None
    error: str | None
    subject: NotRequired[str]
    expression: NotRequired[str]  # a Search Device call (action search_devices): as sent
    prev: NotRequired[str]  # set by the audit log as it chains the record


class RunStartedRecord(TypedDict):
    """A segment's first audit record: who, where, what, with which limits."""

    type: Literal["run_started"]
    at: str
    run_id: str
    segment: int
    worker_version: str
    operator: str
    host: str
    pid: int
    argv: list[str]
    job: str
    job_name: str
    job_sha256: str
    targets_sha256: str
    targets: int
    duplicates_dropped: int
    gateway: str
    limits: dict[str, object]  # Limits as JSON (dataclasses.asdict)
    abort: dict[str, object]  # AbortRule as JSON
    resume: bool
    prev: NotRequired[str]


class RunFinishedRecord(TypedDict):
    """A segment's last audit record: why it ended and the whole run's summary."""

    type: Literal["run_finished"]
    at: str
    segment: int
    reason: str
    message: str
    exit_code: int
    summary: dict[str, object]  # summary.json's content
    prev: NotRequired[str]


class QueryPart(TypedDict):
    """One Search Device expression of a targets_query, paged through (run.json, summary,
    audit)."""

    expression: str  # as sent
    total: int | None  # the last totalSize the gateway said
    totals: list[int]  # every totalSize it said (more than one: the fleet changed meanwhile)
    found: int  # distinct devices this search found
    passes: int  # times it was paged through
    pages: int  # pages answered
    complete: bool


class QueryRecord(TypedDict, total=False):
    """A targets_query's resolution: what was asked, what came back, what was kept (run.json
    ``query``, summary.json ``query``, the audit's targets_resolved)."""

    query: str  # in words
    org_id: str
    expressions: list[str]  # as sent, one search each
    parts: list[QueryPart]
    total: int  # the totalSize of every search, added up (the last each said)
    found: int  # distinct devices found
    kept: int  # rows written to the snapshot (the shard's, with --shard)
    shard: str | None
    passes: int  # the most passes a search needed
    pages: int  # search pages answered
    calls: int  # search calls sent, retries included
    page_size: int  # the page size the gateway accepted
    complete: bool  # every search's devices were found
    accepted_incomplete: bool  # --accept-incomplete ran what was found
    stopped: str | None  # why the resolution ended before it was complete
    targets_file: str | None  # the snapshot's name in the run directory (None: none kept)
    targets_sha256: str | None
    resolved_at: str


class TargetsResolvedRecord(TypedDict):
    """A targets_query resolved (or not) at a segment's start, before any cancel."""

    type: Literal["targets_resolved"]
    at: str
    segment: int
    targets_sha256: str | None  # the snapshot the run goes over (None: none was kept)
    query: QueryRecord
    prev: NotRequired[str]


AuditRecord = AttemptRecord | RunStartedRecord | RunFinishedRecord | TargetsResolvedRecord


class BatchingRecord(TypedDict):
    """A segment's many-assets-per-call story (run.json)."""

    asked: int
    size: int
    trust: str
    lists: int
    notes: list[str]


class BatchingSummary(TypedDict, total=False):
    """The run's many-assets-per-call story (summary.json ``batching``; empty when unused)."""

    assets_per_call: int
    lists: int
    trust: str
    size: int
    notes: list[str]


class SegmentRate(TypedDict):
    """One segment's asked and achieved rate (summary.json ``rate.segments``)."""

    asked: float | str | None
    achieved: float | None
    requests: int
    duration_s: float


class VerifyCountsRecord(TypedDict, total=False):
    """The last verify sweep's counts (verify.json, summary.json ``verify``; empty before)."""

    checked: int
    verified: int
    still_pending: int
    commands_pending: int
    unverified: int
    other_pending: int
    finished_at: str | None
    complete: bool


class FailedRow(TypedDict):
    """A failed (or effect-unknown, or abandoned) target as the report lists it."""

    asset_id: str
    product_key: str
    device_key: str
    command_id: str
    org_id: str
    code: int | None
    msg: str
    attempts: int | None
    outcome: str
    at: NotRequired[str]
    error: NotRequired[str]  # the result's own problem (a reply only partly read), if any
