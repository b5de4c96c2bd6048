"""The summary of a run (from its journal, so it covers every segment) and how it is shown.

summary.json is derived from results.jsonl and run.json, never from memory alone: after a crash
and a resume, the summary of the whole run is still exact.
"""

from __future__ import annotations

import shutil
import sys
import time
from array import array
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

import anyio
import structlog

from worker.core.ports import Progress
from worker.model import Limits, Outcome, gc_paused
from worker.store.journal import RESULTS_FILE, read_journal, record_key
from worker.store.rundir import SUMMARY_FILE
from worker.store.state import Latency, Manifest, RateSummary, Segment, Summary

log = structlog.get_logger("worker.run")


@dataclass
class JournalTally:
    """Counts read from results.jsonl."""

    outcomes: Counter[str]
    errors: Counter[str]
    attempts: int
    effect_unknown: int
    latencies: array[float]  # 8 bytes each: a million of them is 8 MB, not 32
    commands: Counter[str]  # cancelled ids, and a selective run's matched, missed, kept

    @property
    def finished(self) -> int:
        """Targets with a final result."""
        return sum(self.outcomes.values())


class Tally:
    """The summary's counts as a fold over journal records, in journal order: a resume feeds
    it the lines it reads for its done set, and the end of the segment only the new ones."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.attempts = self.unknown = 0
        self.latencies: array[float] = array("d")
        self.commands: Counter[str] = Counter()
        self.failed_earlier: dict[str, str] = {}  # a --retry-failed line supersedes these

    def add(self, record: dict[str, Any]) -> None:
        """Count one journal record."""
        outcomes, errors, failed_earlier = self.outcomes, self.errors, self.failed_earlier
        failed = record["outcome"] == Outcome.FAILED
        key = record_key(record) if failed or failed_earlier else ""
        superseded = failed_earlier.pop(key, None) if failed_earlier else None
        if superseded is not None:
            outcomes[Outcome.FAILED.value] -= 1
            errors[superseded] -= 1
        outcomes[record["outcome"]] += 1
        self.attempts += record.get("attempts") or 0
        self.unknown += bool(record.get("effect_unknown"))
        cancelled = record.get("cancelled_command_ids")
        if cancelled:
            self.commands["cancelled"] += len(cancelled)
        if "matched_command_ids" in record:
            commands = self.commands
            commands["matched"] += len(record["matched_command_ids"])
            commands["missed"] += len(record.get("missed_command_ids") or ())
            commands["kept"] += record.get("kept") or 0
        if failed:
            label = _error_label(record)
            errors[label] += 1
            failed_earlier[key] = label
        latency = record.get("latency_ms")
        if type(latency) is float or type(latency) is int:  # not bool, not text
            self.latencies.append(float(latency))

    def result(self) -> JournalTally:
        """The counts so far."""
        return JournalTally(+self.outcomes, +self.errors, self.attempts, self.unknown,
                            self.latencies, self.commands)  # fmt: skip


def tally(run_dir: Path) -> JournalTally:
    """The whole journal counted from its first line, trusting no checkpoint (audit verify)."""
    counted = Tally()
    with gc_paused():
        for record in read_journal(run_dir / RESULTS_FILE):
            counted.add(record)
    return counted.result()


def _error_label(record: dict[str, Any]) -> str:
    if record.get("code") not in (None, 0):
        return str(record["code"])
    if record.get("http_status") not in (None, 200):
        return f"http_{record['http_status']}"
    return "transport"


def percentile(values: list[float], share: float) -> float | None:
    """The nearest-rank percentile of `values` (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(share * len(ordered) + 0.5) - 1))
    return round(ordered[rank], 1)


def build_summary(
    manifest: Manifest,
    counts: JournalTally,
    *,
    exit_code: int,
    verify: dict[str, Any] | None = None,
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
            requested=_asked(limits),
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
    )


def _batching(segments: list[Segment]) -> dict[str, Any]:
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


def _segment_rate(segment: Segment) -> dict[str, Any]:
    achieved = segment.requests / segment.duration_s if segment.duration_s > 0 else None
    return {
        "asked": _asked(segment.limits),
        "achieved": round(achieved, 2) if achieved is not None else None,
        "requests": segment.requests,
        "duration_s": segment.duration_s,
    }


def _asked(limits: Limits) -> float | str | None:
    return "auto" if limits.adaptive else limits.rate


def render(
    summary: Summary, run_dir: Path, out: TextIO | None = None, *, audit_head: str | None = None
) -> None:
    """A short table for people: what happened, what is left, where the files are."""
    stream = out or sys.stdout
    outcomes, latency = summary.outcomes, summary.latency_ms
    state = summary.stopped or "unfinished (the process died; resumable)"
    lines = [
        f"Run {summary.run_id} ({summary.job}{_shard_text(summary)}): {state}",
        f"  targets            {summary.targets:>10,}",
        f"  cancelled          {outcomes['cancelled']:>10,}",
        f"  nothing to cancel  {outcomes['nothing_to_cancel']:>10,}",
        f"  failed             {outcomes['failed']:>10,}",
        f"  not attempted      {summary.not_attempted:>10,}",
        f"  requests           {summary.requests:>10,}   in {summary.duration_s:.1f} s, "
        f"{summary.rate.achieved or 0:.1f}/s ({_asked_text(summary)})",
        f"  latency ms         p50 {_ms(latency.p50)}  p95 {_ms(latency.p95)}  "
        f"p99 {_ms(latency.p99)}",
        *_notes(summary),
        f"  files              {run_dir}/ ({_files(run_dir)})",
    ]
    if audit_head is not None:
        lines.append(f"  audit head         {audit_head}   (keep it; worker audit verify --head)")
    code = summary.exit_code if summary.finished else "none yet (unfinished; resumable)"
    lines.append(f"  exit code          {code}")
    stream.write("\n".join(lines) + "\n")
    stream.flush()


def _shard_text(summary: Summary) -> str:
    return f", shard {summary.shard}" if summary.shard else ""


def _notes(summary: Summary) -> list[str]:
    """The lines that only some runs need."""
    lines = []
    commands = summary.commands
    if commands.get("matched") or commands.get("kept"):
        lines.append(
            f"  commands           {commands['matched']:,} matched, {commands['cancelled']:,} "
            f"cancelled, {commands['missed']:,} gone before their cancel, {commands['kept']:,} "
            "kept (did not match)"
        )
    batching = summary.batching
    if batching:
        lines.append(
            f"  assets per call    {batching['assets_per_call']} asked, {batching['lists']:,} "
            f"list calls answered; lists {_TRUST_WORDS.get(batching['trust'], batching['trust'])}"
        )
        lines += [f"  lists              {note}" for note in batching["notes"]]
    if summary.abandoned:
        lines.append(
            f"  abandoned          {summary.abandoned:>10,}   (requests cut off in flight "
            "by a second signal: their targets may have been cancelled; resume)"
        )
    if summary.effect_unknown:
        lines.append(
            f"  effect unknown     {summary.effect_unknown:>10,}   (an answer was lost: the "
            "effect of those targets is not known, see results.jsonl)"
        )
    if summary.errors:
        top = ", ".join(f"{label} x{n}" for label, n in list(summary.errors.items())[:5])
        lines.append(f"  failures by code   {top}")
    if summary.stop_message:
        lines.append(f"  why it stopped     {summary.stop_message}")
    verify = summary.verify
    if verify:
        partial = "" if verify.get("complete") else " (stopped early: resume with worker verify)"
        lines.append(
            f"  verified           {verify['verified']:,} of {verify['checked']:,} searched: "
            f"{verify['still_pending']:,} still pending ({verify['commands_pending']:,} "
            f"commands), {verify['unverified']:,} could not be searched{partial}"
        )
    return lines


_TRUST_WORDS = {
    "trusted": "trusted (verified by search)",
    "trial": "still on trial (not enough verified evidence: most calls went one asset each)",
    "single": "turned off (one asset per call)",
}


def _asked_text(summary: Summary) -> str:
    asked = [s.get("asked") for s in summary.rate.segments] or [summary.rate.requested]
    shown = ["unlimited" if a is None else f"{a:g}/s" if isinstance(a, float) else str(a)
             for a in asked]  # fmt: skip
    if len(set(shown)) == 1:
        return f"asked {shown[0]}"
    return "asked " + ", then ".join(shown)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _files(run_dir: Path) -> str:
    names = ("results.jsonl", "audit.jsonl", SUMMARY_FILE)
    return ", ".join(name for name in names if (run_dir / name).exists()) or "none yet"


class RateView(Protocol):
    """What the progress line shows of the limiter."""

    @property
    def rate(self) -> float | None:
        """The allowed rate now."""
        ...

    @property
    def cause(self) -> str:
        """Why it is what it is (asked, throttled, overload, slow start, probing)."""
        ...


async def progress_loop(
    progress: Progress,
    limiter: RateView,
    total: int,
    out: TextIO | None,
    already: int = 0,
    *,
    searching: bool = False,
) -> None:
    """A live line on a terminal (ended with the final counts); a log line every 10 s otherwise.

    `already`: targets final from earlier segments, counted as done from the start.
    `searching`: a verify sweep (targets searched, no outcomes to show)."""
    stream = out or sys.stderr
    line = ProgressLine(progress, limiter, total, already, tty=stream.isatty(),
                        searching=searching)  # fmt: skip
    try:
        while True:
            await anyio.sleep(0.5 if line.tty else 10.0)
            line.show(stream, time.monotonic())
    finally:
        if line.tty:
            line.show(stream, time.monotonic())
            stream.write("\n")
            stream.flush()


RECENT_S = 15.0  # the window of the ETA's rate


class ProgressLine:
    """The live progress line: one line that fits the terminal, redrawn in place."""

    def __init__(
        self,
        progress: Progress,
        limiter: RateView,
        total: int,
        already: int,
        *,
        tty: bool,
        searching: bool = False,
    ) -> None:
        self.progress, self.limiter, self.total, self.already = progress, limiter, total, already
        self.tty, self.searching = tty, searching
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, finished, requests)

    def show(self, stream: TextIO, now: float) -> None:
        """Draw (or, off a terminal, log) the current state."""
        progress = self.progress
        self._samples.append((now, progress.finished, progress.requests))
        while len(self._samples) > 2 and now - self._samples[0][0] > RECENT_S:
            self._samples.popleft()
        if not self.tty:
            self._log()
            return
        width = shutil.get_terminal_size((80, 24)).columns
        stream.write("\r" + fit(self.parts(), width - 1) + "\x1b[K")
        stream.flush()

    def _recent(self) -> tuple[float, float]:
        """Targets finished and requests sent per second, over the last RECENT_S."""
        (t0, f0, r0), (t1, f1, r1) = self._samples[0], self._samples[-1]
        span = t1 - t0
        return ((f1 - f0) / span, (r1 - r0) / span) if span > 0 else (0.0, 0.0)

    def parts(self) -> list[str]:
        """The line's parts, most important first (the narrower the terminal, the fewer)."""
        progress, outcomes = self.progress, self.progress.outcomes
        done = self.already + progress.finished
        finishing, requesting = self._recent()
        allowed = self.limiter.rate
        rate = f"{requesting:,.0f} of {'unlimited' if allowed is None else f'{allowed:,.0f}'}/s"
        if self.limiter.cause != "asked":
            rate += f" ({self.limiter.cause})"
        left = self.total - done
        eta = f"~{_minutes(left / finishing)} left" if finishing > 0 and left > 0 else ""
        if self.searching:
            return [f"  {done:,}/{self.total:,} searched",
                    f"{outcomes[Outcome.FAILED]:,} could not be searched", rate, eta,
                    f"{progress.in_flight} in flight",
                    f"{progress.waiting:,} waiting to retry"]  # fmt: skip
        return [
            f"  {done:,}/{self.total:,} done",
            f"{outcomes[Outcome.FAILED]:,} failed",
            rate,
            eta,
            f"{outcomes[Outcome.CANCELLED]:,} cancelled",
            f"{outcomes[Outcome.NOTHING_TO_CANCEL]:,} nothing to cancel",
            f"{progress.in_flight} in flight",
            f"{progress.waiting:,} waiting to retry",
        ]

    def _log(self) -> None:
        progress, allowed = self.progress, self.limiter.rate
        finishing, requesting = self._recent()
        log.info("worker.progress", finished=self.already + progress.finished,
                 targets=self.total, failed=progress.outcomes[Outcome.FAILED],
                 in_flight=progress.in_flight, waiting_retry=progress.waiting,
                 requests_per_s=round(requesting, 1), finished_per_s=round(finishing, 1),
                 allowed_per_s=None if allowed is None else round(allowed, 1),
                 rate_cause=self.limiter.cause)  # fmt: skip


def fit(parts: list[str], width: int) -> str:
    """As many parts as fit in `width` characters, in order, joined by " · "."""
    line = ""
    for part in parts:
        if not part:
            continue
        candidate = f"{line} · {part}" if line else part
        if len(candidate) > width:
            break
        line = candidate
    return line[:width]


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
