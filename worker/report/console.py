"""What people read in a terminal: the summary table a run ends with, and the live progress line
(off a terminal, a progress log event every 10 s instead)."""

from __future__ import annotations

import shutil
import sys
import time
from collections import Counter, deque
from typing import Protocol, TextIO

import anyio
import structlog

from worker.core.ports import Progress
from worker.core.quota import QuotaPause
from worker.model import Outcome
from worker.redact import printable
from worker.report.query import query_lines
from worker.store.layout import RunDir
from worker.store.state import Summary

log = structlog.get_logger("worker.run")


def render(
    summary: Summary, run: RunDir, out: TextIO | None = None, *, audit_head: str | None = None
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
        f"  files              {run}/ ({_files(run)})",
    ]
    if audit_head is not None:
        lines.append(f"  audit head         {audit_head}   (keep it; worker audit verify --head)")
    code = summary.exit_code if summary.finished else "none yet (unfinished; resumable)"
    lines.append(f"  exit code          {code}")
    stream.write("\n".join(printable(line) for line in lines) + "\n")
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
    if summary.budget:
        lines.append(f"  gateway budget     {summary.budget}   (as the gateway last stated it)")
    lines += [f"  {label:<18} {text}" for label, text in query_lines(summary.query)]
    if summary.stop_message:
        lines.append(f"  why it stopped     {summary.stop_message}")
    if summary.quota_reset_at:
        lines.append(f"  quota resets       {summary.quota_reset_at}   (resume after that)")
    items = summary.stages.get("items", [])
    if items:
        states = ", ".join(f"{item['stage']} {item['state']}" for item in items)
        lines.append(f"  stages             {states}")
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
    shown = [
        "unlimited" if a is None else f"{a:g}/s" if isinstance(a, float) else str(a) for a in asked
    ]
    if len(set(shown)) == 1:
        return f"asked {shown[0]}"
    return "asked " + ", then ".join(shown)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}"


def _files(run: RunDir) -> str:
    paths = (run.results, run.audit, run.summary)
    return ", ".join(path.name for path in paths if path.exists()) or "none yet"


class RateView(Protocol):
    """What the progress line shows of the limiter."""

    @property
    def rate(self) -> float | None:
        """The allowed rate now."""
        ...

    @property
    def cause(self) -> str:
        """Why it is what it is (asked, throttled, overload, slow start, probing, budget)."""
        ...

    @property
    def quota(self) -> QuotaPause | None:
        """The run's wait for the gateway's spent quota, if it waits."""
        ...

    @property
    def budget_rate(self) -> float | None:
        """What the gateway's stated budget allows now (None: it stated none)."""
        ...


async def progress_loop(
    progress: Progress,
    limiter: RateView,
    total: int,
    out: TextIO | None,
    already: int = 0,
    *,
    searching: bool = False,
    earlier: Counter[str] | None = None,
) -> None:
    """A live line on a terminal (ended with the final counts); a log line every 10 s otherwise.

    `already`: targets final from earlier segments, counted as done from the start, with
    `earlier` their outcomes. `searching`: a verify sweep (targets searched, no outcomes)."""
    stream = out or sys.stderr
    line = ProgressLine(
        progress,
        limiter,
        total,
        already,
        tty=stream.isatty(),
        searching=searching,
        earlier=earlier,
        started=time.monotonic(),
    )
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
        earlier: Counter[str] | None = None,
        started: float | None = None,
    ) -> None:
        self.progress, self.limiter, self._total, self.already = progress, limiter, total, already
        self.tty, self.searching = tty, searching
        self.earlier = _earlier_outcomes(already, earlier)
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, finished, requests)
        if started is not None:  # the first line off a terminal comes with a rate, not 0.0/s
            self._samples.append((started, progress.finished, progress.requests))

    @property
    def total(self) -> int:
        """The segment's targets: as given, or as a targets_query found them meanwhile."""
        found = self.progress.targets
        return self._total if found is None else found

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
        rate = self._rate_text(requesting)
        left = self.total - done
        eta = f"~{_minutes(left / finishing)} left" if finishing > 0 and left > 0 else ""
        if self.searching:
            return [
                f"  {done:,}/{self.total:,} searched",
                f"{outcomes[Outcome.FAILED]:,} could not be searched",
                rate,
                eta,
                f"{progress.in_flight} in flight",
                f"{progress.waiting:,} waiting to retry",
            ]
        return [
            f"  {done:,}/{self.total:,} done",
            f"{self._run(Outcome.FAILED):,} failed",
            rate,
            eta,
            f"{self._run(Outcome.CANCELLED):,} cancelled",
            f"{self._run(Outcome.NOTHING_TO_CANCEL):,} nothing to cancel",
            f"{progress.in_flight} in flight",
            f"{progress.waiting:,} waiting to retry",
        ]

    def _rate_text(self, requesting: float) -> str:
        """The achieved and allowed rate, and why the allowed one is what it is; while the run
        waits for the gateway's quota, that wait instead ("quota: waiting 41 s (until ...)")."""
        limiter = self.limiter
        if limiter.quota is not None:
            return limiter.quota.describe(time.time())
        allowed = limiter.rate
        rate = f"{requesting:,.0f} of {'unlimited' if allowed is None else f'{allowed:,.0f}'}/s"
        if limiter.cause != "asked":
            rate += f" ({limiter.cause})"
        if limiter.budget_rate is not None and limiter.cause != "budget":
            rate += f", budget {limiter.budget_rate:,.0f}/s"
        return rate

    def _run(self, outcome: Outcome) -> int:
        """Targets of the whole run with this outcome (earlier segments and this one), as
        `done` counts them."""
        return self.earlier[outcome.value] + self.progress.outcomes[outcome]

    def _log(self) -> None:
        progress, allowed = self.progress, self.limiter.rate
        finishing, requesting = self._recent()
        log.info(
            "worker.progress",
            finished=self.already + progress.finished,
            targets=self.total,
            failed=self._run(Outcome.FAILED),
            in_flight=progress.in_flight,
            waiting_retry=progress.waiting,
            requests_per_s=round(requesting, 1),
            finished_per_s=round(finishing, 1),
            allowed_per_s=None if allowed is None else round(allowed, 1),
            rate_cause=self.limiter.cause,
            budget_per_s=_rounded(self.limiter.budget_rate),
            quota=None if self.limiter.quota is None else self.limiter.quota.describe(time.time()),
        )


def _rounded(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 1)


def _earlier_outcomes(already: int, earlier: Counter[str] | None) -> Counter[str]:
    """The outcomes of the targets already final when the segment began. A failed target
    retried now (--retry-failed) is not among them: the failures counted are the rest."""
    counted: Counter[str] = Counter()
    if earlier:
        counted[Outcome.CANCELLED.value] = earlier[Outcome.CANCELLED.value]
        counted[Outcome.NOTHING_TO_CANCEL.value] = earlier[Outcome.NOTHING_TO_CANCEL.value]
        successes = sum(counted.values())
        counted[Outcome.FAILED.value] = max(
            0, min(earlier[Outcome.FAILED.value], already - successes)
        )
    return counted


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
