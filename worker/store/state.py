"""The run's typed state: the manifest (run.json) with its segments, and the summary. JSON is
read and written at one boundary, :meth:`to_json`/:meth:`from_json`; everything else speaks
these types.

Nothing here does I/O or imports aiohttp or YAML: the report, the CLI and tests use it freely.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from worker.model import JsonObject, Limits, Match
from worker.store.records import (
    BatchingRecord,
    BatchingSummary,
    PausedState,
    QueryRecord,
    SegmentRate,
    StagesRecord,
    VerifyCountsRecord,
    WindowState,
)


def limits_from_json(data: JsonObject) -> Limits:
    """Limits as recorded (fields a newer or older version wrote and this one lacks are
    dropped, missing ones take their defaults)."""
    known = {f.name for f in dataclasses.fields(Limits)}
    return Limits(**{k: v for k, v in data.items() if k in known})


@dataclass
class Segment:
    """One process's part of a run: from start to whatever ended it."""

    started_at: str
    limits: Limits
    finished_at: str | None = None
    reason: str | None = None  # a StopReason value
    message: str = ""
    exit_code: int | None = None
    requests: int = 0
    abandoned: int = 0  # requests cut off in flight: their targets may have been cancelled
    duration_s: float = 0.0
    rate_timeline: list[list[float | None]] = field(default_factory=list)  # [s, achieved, allowed]
    batching: BatchingRecord | None = None  # assets_per_call > 1: lists sent, trust, changes
    budget: str | None = None  # the gateway's stated budget, as last read (in words)
    quota_reset_at: str | None = None  # stopped for the gateway's quota: when it resets (UTC)

    def to_json(self) -> JsonObject:
        """As written in run.json."""
        data = dataclasses.asdict(self)
        data["limits"] = dataclasses.asdict(self.limits)
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> Segment:
        """From run.json (a segment that died early lacks its end fields)."""
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["limits"] = limits_from_json(data.get("limits") or {})
        values["message"] = values.get("message") or ""
        values["requests"] = values.get("requests") or 0
        values["duration_s"] = values.get("duration_s") or 0.0
        return cls(**values)


@dataclass
class Manifest:
    """run.json: what the run is (job, targets, their hashes, gateway, limits) and its segments."""

    run_id: str
    job: str
    job_name: str
    job_sha256: str
    targets_sha256: str
    targets: int
    gateway: str
    limits: Limits
    segments: list[Segment] = field(default_factory=list)
    match: Match | None = None  # the job's match rule, for follow-ups
    shard: str | None = None  # "K/N": this run covers one shard of the job's targets
    targets_file: str | None = None  # the targets file's copy in the run directory (its name)
    query: QueryRecord | None = None  # targets_query: its resolution ("complete": a snapshot)
    stages: StagesRecord | None = None  # a staged rollout: its sample, stages and gates
    window: WindowState | None = None  # the job's window as the run last saw it
    paused: PausedState | None = None  # paused by an operator (worker ctl): a resume waits

    def to_json(self) -> JsonObject:
        """As written in run.json."""
        data = dataclasses.asdict(self)  # JSON at the file's boundary
        data["limits"] = dataclasses.asdict(self.limits)
        data["segments"] = [segment.to_json() for segment in self.segments]
        return data

    @classmethod
    def from_json(cls, data: JsonObject) -> Manifest:
        """From run.json."""
        return cls(
            run_id=data["run_id"],
            job=data["job"],
            job_name=data["job_name"],
            job_sha256=data["job_sha256"],
            targets_sha256=data["targets_sha256"],
            targets=data["targets"],
            gateway=data["gateway"],
            limits=limits_from_json(data["limits"]),
            segments=[Segment.from_json(s) for s in data.get("segments") or []],
            match=Match(**data["match"]) if data.get("match") else None,
            shard=data.get("shard"),
            targets_file=data.get("targets_file"),
            query=data.get("query"),
            stages=data.get("stages"),
            window=data.get("window"),
            paused=data.get("paused"),
        )

    def changes(self, job_sha256: str, targets_sha256: str) -> list[tuple[str, str, str]]:
        """(what, sha256 then, sha256 now) for the job file and the target list, where they
        differ from this run's: resuming would mix two runs."""
        pairs = (
            ("job file", self.job_sha256, job_sha256),
            ("target list", self.targets_sha256, targets_sha256),
        )
        return [(name, then, now) for name, then, now in pairs if then != now]

    @property
    def last_exit_code(self) -> int | None:
        """The exit code the last segment ended with (None: it never ended)."""
        return self.segments[-1].exit_code if self.segments else None


@dataclass(frozen=True)
class RateSummary:
    """The asked and achieved rate, and the rate over time ([segment, s, achieved, allowed])."""

    requested: float | str | None
    achieved: float | None
    timeline: list[list[Any]]  # [segment, seconds, achieved/s, allowed/s]
    segments: list[SegmentRate] = field(default_factory=list)  # asked / achieved, each


@dataclass(frozen=True)
class Latency:
    """Percentiles of each target's last attempt, in milliseconds."""

    p50: float | None
    p95: float | None
    p99: float | None


@dataclass(frozen=True)
class Summary:
    """summary.json: the whole run, all segments, recomputed from the journal."""

    job: str
    run_id: str
    targets: int
    outcomes: dict[str, int]
    not_attempted: int
    effect_unknown: int
    attempts: int
    errors: dict[str, int]
    started_at: str | None
    finished_at: str | None
    duration_s: float
    segments: int
    stopped: str | None
    stop_message: str | None
    rate: RateSummary
    latency_ms: Latency
    exit_code: int
    resumable: bool
    commands: dict[str, int] = field(default_factory=dict)  # cancelled, matched, missed, kept
    requests: int = 0  # every HTTP request sent, all segments (attempts: of final results)
    abandoned: int = 0  # requests cut off in flight by a second stop signal
    finished: bool = True  # False: the last segment never ended (kill -9, OOM, power loss)
    batching: BatchingSummary = field(default_factory=BatchingSummary)
    shard: str | None = None  # "K/N" when the run covers one shard of the job
    verify: VerifyCountsRecord = field(default_factory=VerifyCountsRecord)
    budget: str | None = None  # the gateway's stated budget, as the last segment read it
    quota_reset_at: str | None = None  # stopped for the gateway's quota: when it resets (UTC)
    query: QueryRecord = field(default_factory=QueryRecord)  # targets_query: its resolution
    stages: StagesRecord = field(default_factory=StagesRecord)  # a staged run's stages, gates
    window: WindowState = field(default_factory=WindowState)  # and its window, when it has one

    def to_json(self) -> JsonObject:
        """summary.json's content (design.md's keys)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: JsonObject) -> Summary:
        """From summary.json."""
        values = dict(data)
        values["rate"] = RateSummary(**data["rate"])
        values["latency_ms"] = Latency(**data["latency_ms"])
        return cls(**values)
