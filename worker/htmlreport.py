"""`worker report`'s HTML page: one self-contained file people can read and attach to a ticket.

No scripts and no external assets: the numbers from summary.json of each run directory, a total
when there are several (shards, or segments run apart), the failures by code, and the achieved
and allowed rate over time as an inline SVG chart.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from worker.runstate import Summary

OUTCOMES = ("cancelled", "nothing_to_cancel", "failed")


@dataclass(frozen=True)
class Totals:
    """Counts over several runs (shards, or segments run apart); rates stay per run."""

    targets: int
    outcomes: dict[str, int]
    not_attempted: int
    effect_unknown: int
    attempts: int
    errors: dict[str, int]
    exit_code: int


def combine(summaries: list[Summary]) -> Totals:
    """Totals over several runs: counts add up, rates and durations are reported per run."""
    errors: Counter[str] = Counter()
    for summary in summaries:
        errors.update(summary.errors)
    return Totals(
        targets=sum(s.targets for s in summaries),
        outcomes={o: sum(s.outcomes[o] for s in summaries) for o in OUTCOMES},
        not_attempted=sum(s.not_attempted for s in summaries),
        effect_unknown=sum(s.effect_unknown for s in summaries),
        attempts=sum(s.attempts for s in summaries),
        errors=dict(errors.most_common()),
        exit_code=max(s.exit_code for s in summaries),
    )


def _rows(pairs: list[tuple[str, object]]) -> str:
    def shown(value: object) -> str:
        return html.escape(f"{value:,}" if isinstance(value, int) else str(value))

    return "".join(f"<tr><th>{html.escape(k)}</th><td>{shown(v)}</td></tr>" for k, v in pairs)


def _chart(timeline: list[list[Any]], width: int = 640, height: int = 160) -> str:
    """Achieved (solid) and allowed (dashed) requests/s over the run, as an SVG."""
    if len(timeline) < 2:
        return "<p>Too short a run for a rate chart.</p>"
    points = [(float(p[1]), float(p[2]), p[3]) for p in timeline]
    span = max(t for t, _, _ in points) or 1.0
    top = max([a for _, a, _ in points] + [float(lim) for _, _, lim in points if lim]) or 1.0

    def line(values: list[tuple[float, float]]) -> str:
        return " ".join(
            f"{t / span * width:.1f},{height - v / top * height:.1f}" for t, v in values
        )

    achieved = line([(t, a) for t, a, _ in points])
    allowed = line([(t, float(lim)) for t, _, lim in points if lim is not None])
    return (
        f'<svg width="{width}" height="{height + 20}" role="img" '
        'aria-label="achieved and allowed requests per second over time">'
        f'<polyline fill="none" stroke="#1f6feb" stroke-width="2" points="{achieved}"/>'
        f'<polyline fill="none" stroke="#888" stroke-dasharray="4 3" points="{allowed}"/>'
        f'<text x="0" y="{height + 16}" font-size="12">0 s</text>'
        f'<text x="{width - 60}" y="{height + 16}" font-size="12">{span:,.0f} s</text>'
        f'<text x="4" y="12" font-size="12">{top:,.0f}/s</text></svg>'
        "<p>Solid: achieved requests/s. Dashed: the rate the limiter allowed.</p>"
    )


def _run_section(run_dir: Path, summary: Summary) -> str:
    outcomes = summary.outcomes
    latency = summary.latency_ms
    pairs: list[tuple[str, object]] = [
        ("run", summary.run_id),
        ("directory", str(run_dir)),
        ("stopped", f"{summary.stopped} {summary.stop_message or ''}".strip()),
        ("exit code", summary.exit_code),
        ("targets", summary.targets),
        *[(o.replace("_", " "), outcomes[o]) for o in OUTCOMES],
        ("not attempted (resumable)", summary.not_attempted),
        ("effect unknown", summary.effect_unknown),
        ("requests", summary.attempts),
        ("segments", summary.segments),
        ("started / finished", f"{summary.started_at} / {summary.finished_at}"),
        ("duration", f"{summary.duration_s:,.1f} s"),
        ("rate asked / achieved", f"{summary.rate.requested} / {summary.rate.achieved}"),
        ("latency p50 / p95 / p99 ms", f"{latency.p50} / {latency.p95} / {latency.p99}"),
    ]
    commands = summary.commands
    if commands.get("matched") or commands.get("kept"):
        counts = [f"{commands.get(k, 0):,}" for k in ("matched", "cancelled", "missed", "kept")]
        pairs.append(("commands matched / cancelled / gone / kept", " / ".join(counts)))
    errors = "".join(
        f"<tr><td>{html.escape(code)}</td><td>{count:,}</td></tr>"
        for code, count in summary.errors.items()
    )
    failures = (
        f"<h3>Failed targets by code</h3><table><tr><th>code</th><th>targets</th></tr>{errors}"
        "</table>"
        if errors
        else ""
    )
    return (
        f"<section><h2>{html.escape(summary.job)}</h2><table>{_rows(pairs)}</table>"
        f"{failures}<h3>Rate</h3>{_chart(summary.rate.timeline)}</section>"
    )


def render_html(runs: list[tuple[Path, Summary]]) -> str:
    """The whole page for one or several run directories."""
    sections = "".join(_run_section(run_dir, summary) for run_dir, summary in runs)
    total = ""
    if len(runs) > 1:
        combined = combine([summary for _, summary in runs])
        pairs: list[tuple[str, object]] = [
            ("runs", len(runs)),
            ("targets", combined.targets),
            *[(o.replace("_", " "), combined.outcomes[o]) for o in OUTCOMES],
            ("not attempted (resumable)", combined.not_attempted),
            ("requests", combined.attempts),
            ("worst exit code", combined.exit_code),
        ]
        total = f"<section><h2>All runs</h2><table>{_rows(pairs)}</table></section>"
    style = (
        "body{font-family:system-ui,sans-serif;margin:2em;max-width:60em}"
        "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #ccc;"
        "padding:.25em .6em;text-align:left}th{background:#f4f4f4;font-weight:600}"
    )
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>worker report</title><style>{style}</style></head><body>"
        f"<h1>EnOS command cancellation report</h1>{total}{sections}</body></html>\n"
    )
