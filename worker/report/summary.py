"""The summary of a run (from its journal's counts, so it covers every segment).

summary.json is derived from results.jsonl and run.json, never from memory alone: after a crash
and a resume, the summary of the whole run is still exact.
"""

from __future__ import annotations

from worker.model import Limits, Outcome
from worker.store.records import BatchingSummary, SegmentRate, VerifyCountsRecord
from worker.store.state import Latency, Manifest, RateSummary, Segment, Summary
from worker.store.tally import Counts


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 1)


def build_summary(
    manifest: Manifest,
    counts: Counts,
    *,
    exit_code: int,
    verify: VerifyCountsRecord | None = None,
) -> Summary:
    """summary.json's content for the whole run (all segments), with the last verify sweep's
    counts when there was one."""
    segments = manifest.segments
    duration = sum(s.duration_s for s in segments)
    requests = sum(s.requests for s in segments)
    ordered = sorted(counts.latencies)
    total = manifest.targets
    limits = manifest.limits
    return Summary(
        job=manifest.job_name,
        run_id=manifest.run_id,
        targets=total,
        outcomes={o.value: counts.outcomes.get(o.value, 0) for o in Outcome},
        not_attempted=total - counts.finished,
        effect_unknown=counts.effect_unknown,
        attempts=counts.attempts,
        errors=dict(counts.errors.most_common()),
        started_at=segments[0].started_at if segments else None,
        finished_at=segments[-1].finished_at if segments else None,
        duration_s=round(duration, 3),
        segments=len(segments),
        stopped=segments[-1].reason if segments else None,
        stop_message=segments[-1].message if segments else None,
        rate=RateSummary(
            requested=asked_rate(limits),
            achieved=round(requests / duration, 2) if duration > 0 else None,
            timeline=[
                [number, *point]
                for number, segment in enumerate(segments, start=1)
                for point in segment.rate_timeline
            ],
            segments=[_segment_rate(s) for s in segments],
        ),
        latency_ms=Latency(
            p50=percentile(ordered, 0.50),
            p95=percentile(ordered, 0.95),
            p99=percentile(ordered, 0.99),
        ),
        exit_code=exit_code,
        resumable=total - counts.finished > 0 or counts.outcomes.get("failed", 0) > 0,
        commands={k: counts.commands.get(k, 0) for k in ("cancelled", "matched", "missed", "kept")},
        requests=requests,
        abandoned=sum(s.abandoned for s in segments),
        finished=bool(segments) and segments[-1].finished_at is not None,
        batching=_batching(segments),
        shard=manifest.shard,
        verify=verify or {},
        budget=segments[-1].budget if segments else None,
        quota_reset_at=segments[-1].quota_reset_at if segments else None,
        query=manifest.query or {},
        stages=manifest.stages or {},
        window=manifest.window or {},
    )


def _batching(segments: list[Segment]) -> BatchingSummary:
    """Lists over the whole run: the size asked, list calls answered, where each segment's
    trust ended, and every change (a fallback to one asset per call, a smaller size)."""
    used = [s.batching for s in segments if s.batching]
    if not used:
        return {}
    return {
        "assets_per_call": used[-1]["asked"],
        "lists": sum(b["lists"] for b in used),
        "trust": used[-1]["trust"],
        "size": used[-1]["size"],
        "notes": [note for b in used for note in b["notes"]],
    }


def _segment_rate(segment: Segment) -> SegmentRate:
    achieved = segment.requests / segment.duration_s if segment.duration_s > 0 else None
    return {
        "asked": asked_rate(segment.limits),
        "achieved": round(achieved, 2) if achieved is not None else None,
        "requests": segment.requests,
        "duration_s": segment.duration_s,
    }


def asked_rate(limits: Limits) -> float | str | None:
    """The rate an operator asked for, as summary.json says it ("auto"; None: unlimited)."""
    return "auto" if limits.adaptive else limits.rate
