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
    kept_command_ids: NotRequired[list[str]]  # the cached commands the match kept


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


class ControlRecord(TypedDict):
    """An operator's request (worker ctl) as the run carried it out: who asked, what, the
    state before and after; `result` is "done" or why it was refused."""

    type: Literal["control"]
    at: str
    request: str  # the request file's id
    action: str  # pause | resume | rate | concurrency | stop | promote
    by: str  # the user of the worker ctl process
    host: str  # and its host
    asked_at: str
    before: object
    after: object
    result: str
    note: NotRequired[str]
    prev: NotRequired[str]


class WindowEventRecord(TypedDict):
    """The run met its window: waiting for it to open, opened, or closed (the next opening)."""

    type: Literal["window"]
    at: str
    event: str  # waiting | opened | closed
    window: str  # the window in words
    opens_at: str | None
    closes_at: str | None
    prev: NotRequired[str]


class StageEventRecord(TypedDict):
    """A staged rollout's step: a stage started, went to its gate, waits for a promotion, was
    promoted, or was left empty; or a failed gate was acknowledged by a resume with --force."""

    type: Literal["stage"]
    at: str
    stage: int  # from 1
    of: int
    event: str
    targets: int  # the stage's targets in this run (a shard's part)
    note: NotRequired[str]
    prev: NotRequired[str]


class GateRecord(TypedDict):
    """A stage's gate: what its verify found and the decision. The searches themselves stay
    out of the chain, as the verify sweep's do (read-only); their lines are in `evidence`,
    whose sha256 is recorded here, so the chain vouches for them."""

    stage: int
    passed: bool
    targets: int  # the stage's targets with a final result
    checked: int  # searched
    failed: int
    failed_percent: float
    max_failed_percent: float
    pending: list[str]  # "<device> <command id>" named by a cancel reply and pending again
    pending_count: int
    collateral: list[str]  # "<device> <command id>" a match kept, cancelled since
    collateral_count: int
    acknowledged: list[str]  # collateral an earlier failed gate reported (resumed with --force)
    unverified: int  # could not be searched
    reasons: list[str]
    evidence: str  # the file of its per-target lines, in the run directory
    evidence_sha256: str
    finished_at: str


class GateEventRecord(GateRecord):
    """A gate's decision in audit.jsonl."""

    type: Literal["gate"]
    at: str
    prev: NotRequired[str]


AuditRecord = (
    AttemptRecord
    | RunStartedRecord
    | RunFinishedRecord
    | TargetsResolvedRecord
    | ControlRecord
    | WindowEventRecord
    | StageEventRecord
    | GateEventRecord
)


class StageState(TypedDict):
    """One stage of a staged run as run.json and summary.json keep it."""

    stage: int  # from 1
    goes_to: str  # as written: "50 targets", "5 % of the job"
    upto: int  # targets of the whole job it reaches, counted from the start
    cut: str  # the highest sample rank it takes (hex; "-1": none)
    targets: int  # this run's targets in it (a shard's part of the sample)
    wait_for_promotion: bool
    max_failed_percent: float
    state: (
        str  # pending, running, verifying, passed, waiting for promotion, promoted, failed, empty
    )
    gate: NotRequired[GateRecord]


class StagesRecord(TypedDict, total=False):
    """A staged run's plan and progress (run.json and summary.json ``stages``; empty when the
    job has none)."""

    seed: str  # the sample's seed: the job's name at the start
    current: int  # the stage the run is in, from 1 (0: all done)
    items: list[StageState]


class WindowState(TypedDict, total=False):
    """The job's window as the run last saw it (run.json and summary.json ``window``)."""

    window: str  # in words
    open: bool
    opens_at: str | None  # the next opening (ISO 8601 UTC) when closed
    closes_at: str | None  # the closing of the open one
    closed_at: str | None  # when a segment ended at the close


class PausedState(TypedDict):
    """A pause an operator asked for (run.json): a resumed run starts paused."""

    by: str
    at: str
    request: str


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
