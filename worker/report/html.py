"""`worker report`'s HTML page: one self-contained file people can read and attach to a ticket.

No scripts and no external assets (no network, no CDN): tables and inline SVG charts. For each
run directory: the summary (an unfinished run says so, with the command that resumes it), the
throughput over time beside the asked and the allowed rate (segments side by side on one time
line), the outcomes, a latency histogram, outcomes by org and by product key, the failed and
the effect-unknown targets, the requests abandoned in flight, and the run's timeline; a total
when there are several directories (shards, or segments run apart).
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from worker.enos.protocol import CODE_MEANINGS
from worker.report.details import RunReport
from worker.report.followup import write_followup
from worker.report.hints import resume_command
from worker.report.query import differing_totals, query_lines
from worker.store.records import FailedRow
from worker.store.state import Summary
from worker.store.tally import LATENCY_EDGES_MS, LISTED, Counts

OUTCOMES = ("cancelled", "nothing_to_cancel", "failed")
COLOURS = {"cancelled": "#2da44e", "nothing_to_cancel": "#8c959f", "failed": "#cf222e"}
_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:64em;color:#1f2328}"
    "table{border-collapse:collapse;margin:.5em 0}th,td{border:1px solid #d0d7de;"
    "padding:.25em .6em;text-align:left;vertical-align:top}th{background:#f6f8fa;font-weight:600}"
    "td.n{text-align:right}.banner{background:#fff8c5;border:1px solid #d4a72c;padding:.6em 1em}"
    "code{background:#f6f8fa;padding:.1em .3em}svg text{font-size:11px;fill:#57606a}"
)


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


def _esc(value: object) -> str:
    return html.escape(f"{value:,}" if isinstance(value, int) else str(value))


def _table(header: list[str], rows: list[list[object]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_esc(c)}</td>' if isinstance(c, int | float) else f"<td>{_esc(c)}</td>"
            for c in row
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def _pairs(pairs: list[tuple[str, object]]) -> str:
    return (
        "<table>"
        + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
        + "</table>"
    )


# -- charts (inline SVG) -------------------------------------------------------------------------


def _throughput(summary: Summary, width: int = 640, height: int = 180) -> str:
    """Achieved (solid), allowed (dashed) and asked (dotted) requests/s; segments side by side."""
    points = summary.rate.timeline
    if len(points) < 2:
        return "<p>Too short a run for a throughput chart.</p>"
    ends: dict[int, float] = {}
    for segment, seconds, *_ in points:
        ends[segment] = max(ends.get(segment, 0.0), float(seconds))
    offsets, position = {}, 0.0
    for segment in sorted(ends):
        offsets[segment] = position
        position += ends[segment]
    span, left = position or 1.0, 48
    asked = {n: s.get("asked") for n, s in enumerate(summary.rate.segments, start=1)}
    numbers = [float(a) for a in asked.values() if isinstance(a, int | float)]
    values = [float(p[2]) for p in points] + [float(p[3]) for p in points if p[3] is not None]
    top = _nice(max(values + numbers) if values else 1.0)

    def x(segment: int, seconds: float) -> float:
        return left + (offsets[segment] + seconds) / span * (width - left)

    def y(value: float) -> float:  # 12 px of room above the top line for its label
        return 12 + (height - 12) * (1 - value / top)

    def polyline(column: int, style: str) -> str:
        lines = []
        for segment in sorted(ends):
            run = " ".join(
                f"{x(segment, float(p[1])):.1f},{y(float(p[column])):.1f}"
                for p in points
                if p[0] == segment and p[column] is not None
            )
            if run:
                lines.append(f'<polyline fill="none" {style} points="{run}"/>')
        return "".join(lines)

    asked_lines = "".join(
        f'<line x1="{x(n, 0):.1f}" x2="{x(n, ends[n]):.1f}" y1="{y(float(a)):.1f}" '
        f'y2="{y(float(a)):.1f}" stroke="#bf8700" stroke-dasharray="1 3" stroke-width="2"/>'
        for n, a in asked.items()
        if isinstance(a, int | float) and n in ends
    )
    grid = "".join(
        f'<line x1="{left}" x2="{width}" y1="{y(top * f):.1f}" y2="{y(top * f):.1f}" '
        f'stroke="#eaeef2"/><text x="0" y="{y(top * f) + 4:.1f}">{top * f:,.0f}/s</text>'
        for f in (0.0, 0.25, 0.5, 0.75, 1.0)
    )
    dividers = "".join(
        f'<line x1="{x(n, 0):.1f}" x2="{x(n, 0):.1f}" y1="0" y2="{height}" stroke="#57606a" '
        f'stroke-dasharray="2 2"/><text x="{x(n, 0) + 3:.1f}" y="10">segment {n}</text>'
        for n in sorted(ends)
        if n > 1
    )
    allowed = polyline(3, 'stroke="#8c959f" stroke-dasharray="5 3"')
    achieved = polyline(2, 'stroke="#0969da" stroke-width="2"')
    return (
        f'<svg width="{width}" height="{height + 20}" role="img" class="chart" '
        'aria-label="achieved, allowed and asked requests per second over time">'
        f"{grid}{dividers}{asked_lines}{allowed}{achieved}"
        f'<text x="{left}" y="{height + 14}">0 s</text>'
        f'<text x="{width - 50}" y="{height + 14}">{span:,.0f} s</text></svg>'
        "<p>Solid blue: achieved requests/s. Dashed grey: the rate the limiter allowed. "
        "Dotted: the rate asked for. Segments of a resumed run stand side by side.</p>"
    )


def _nice(value: float) -> float:
    """A round upper bound for an axis."""
    for step in (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000):
        if value <= step:
            return float(step)
    return value


def _outcome_bar(summary: Summary, width: int = 640) -> str:
    total = sum(summary.outcomes.values()) + summary.not_attempted or 1
    parts, x = [], 0.0
    shown = [
        *((o, summary.outcomes[o]) for o in OUTCOMES),
        ("not_attempted", summary.not_attempted),
    ]
    for name, count in shown:
        w = count / total * width
        colour = COLOURS.get(name, "#eaeef2")
        parts.append(
            f'<rect x="{x:.1f}" y="0" width="{w:.1f}" height="24" fill="{colour}">'
            f"<title>{_esc(name)}: {count:,}</title></rect>"
        )
        x += w
    legend = " &nbsp; ".join(
        f'<span style="color:{COLOURS.get(n, "#57606a")}">&#9632;</span> '
        f"{_esc(n.replace('_', ' '))} {c:,}"
        for n, c in shown
    )
    return (
        f'<svg width="{width}" height="24" role="img" class="chart" aria-label="outcomes">'
        f"{''.join(parts)}</svg><p>{legend}</p>"
    )


def _latency_histogram(journal: Counts, width: int = 640, height: int = 120) -> str:
    counts = journal.latency_histogram
    if not any(counts):
        return "<p>No latencies recorded.</p>"
    labels = [f"<{e}" for e in LATENCY_EDGES_MS] + [f">={LATENCY_EDGES_MS[-1]}"]
    top = max(counts)
    bar = width / len(counts)
    bars = "".join(
        f'<rect x="{i * bar + 2:.1f}" y="{height - c / top * height:.1f}" width="{bar - 4:.1f}" '
        f'height="{c / top * height:.1f}" fill="#0969da">'
        f"<title>{labels[i]} ms: {c:,}</title></rect>"
        f'<text x="{i * bar + 2:.1f}" y="{height + 14}">{labels[i]}</text>'
        for i, c in enumerate(counts)
    )
    return (
        f'<svg width="{width}" height="{height + 20}" role="img" class="chart" '
        f'aria-label="latency histogram">{bars}</svg><p>Targets by the latency of their last '
        f"attempt, in milliseconds (most: {top:,}).</p>"
    )


# -- sections ----------------------------------------------------------------------------------


def _summary_pairs(report: RunReport) -> list[tuple[str, object]]:
    summary = report.summary
    latency, rate, commands = summary.latency_ms, summary.rate, summary.commands
    asked = ", ".join(str(s.get("asked")) for s in rate.segments) or str(rate.requested)
    pairs: list[tuple[str, object]] = [
        ("run", summary.run_id),
        ("directory", str(report.run)),
        ("stopped", f"{summary.stopped or 'unfinished'} {summary.stop_message or ''}".strip()),
        ("exit code", summary.exit_code if summary.finished else "none yet (unfinished)"),
        ("targets", summary.targets),
        *[(o.replace("_", " "), summary.outcomes[o]) for o in OUTCOMES],
        ("not attempted (resumable)", summary.not_attempted),
        ("effect unknown", summary.effect_unknown),
        ("requests sent", summary.requests),
        ("abandoned in flight", summary.abandoned),
        ("segments", summary.segments),
        ("started / finished", f"{summary.started_at} / {summary.finished_at or '-'}"),
        ("duration", f"{summary.duration_s:,.1f} s"),
        ("rate asked (per segment) / achieved", f"{asked} / {rate.achieved}"),
        ("latency p50 / p95 / p99 ms", f"{latency.p50} / {latency.p95} / {latency.p99}"),
    ]
    if commands.get("matched") or commands.get("kept"):
        counts = [f"{commands.get(k, 0):,}" for k in ("matched", "cancelled", "missed", "kept")]
        pairs.append(("commands matched / cancelled / gone / kept", " / ".join(counts)))
    verify = summary.verify
    if verify:
        pairs.append(
            ("verify sweep: verified / searched", f"{verify['verified']:,} / {verify['checked']:,}")
        )
        pairs.append(
            (
                "still pending: targets / commands",
                f"{verify['still_pending']:,} / {verify['commands_pending']:,}",
            )
        )
        pairs.append(("could not be searched", verify["unverified"]))
    batching = summary.batching
    if batching:
        lists = (
            f"{batching['assets_per_call']} asked; {batching['lists']:,} list calls "
            f"answered; ended {batching['trust']}"
        )
        pairs.append(("assets per call", lists))
        pairs += [("lists", note) for note in batching["notes"]]
    return pairs + query_lines(summary.query)


def _who(row: FailedRow) -> str:
    device = row["asset_id"] or f"{row['product_key']}/{row['device_key']}"
    command = f" command {row['command_id']}" if row["command_id"] else ""
    return f"{device} ({row['org_id']}){command}"


def _target_rows(rows: list[FailedRow], extra: str) -> list[list[object]]:
    """A row per target: who, the code (or the `extra` column: outcome, at), message, attempts."""
    shown: list[list[object]] = []
    for row in rows:
        second = {"outcome": row["outcome"], "at": row.get("at")}.get(extra, row["code"])
        shown.append([_who(row), str(second), row["msg"], row["attempts"]])
    return shown


def _listed(
    title: str, rows: list[FailedRow], total: int, header: list[str], extra: str = ""
) -> str:
    if not total:
        return ""
    more = (
        f"<p>... and {total - len(rows):,} more (see results.jsonl).</p>"
        if total > len(rows)
        else ""
    )
    return f"<h3>{_esc(title)} ({total:,})</h3>{_table(header, _target_rows(rows, extra))}{more}"


def _by(title: str, counts: dict[str, Counter[str]]) -> str:
    rows = sorted(counts.items(), key=lambda kv: -sum(kv[1].values()))[:20]
    table = _table(
        [title, *(o.replace("_", " ") for o in OUTCOMES)],
        [[name, *(c.get(o, 0) for o in OUTCOMES)] for name, c in rows],
    )
    more = f"<p>Top 20 of {len(counts):,}.</p>" if len(counts) > 20 else ""
    return f"<h3>Outcomes by {title}</h3>{table}{more}"


def _codes(summary: Summary) -> str:
    if not summary.errors:
        return ""
    rows: list[list[object]] = [
        [code, _meaning(code), count] for code, count in summary.errors.items()
    ]
    return f"<h3>Failed targets by code</h3>{_table(['code', 'meaning', 'targets'], rows)}"


def _meaning(code: str) -> str:
    if code in CODE_MEANINGS:
        return CODE_MEANINGS[code]
    return "gateway error" if code.startswith("http_5") else "see the failed targets below"


def _run_section(report: RunReport) -> str:
    summary, counts, details = report.summary, report.counts, report.details
    banner = ""
    if not summary.finished or summary.not_attempted:
        failed_before = bool(summary.outcomes.get("failed"))
        command = resume_command(report.manifest.job, report.run, retry_failed=failed_before)
        state = "did not finish" if not summary.finished else "stopped before the end"
        banner = (
            f'<p class="banner">This run {state}: {summary.not_attempted:,} targets were '
            f"not attempted and are resumable. Continue it with <code>{_esc(command)}</code></p>"
        )
    failed = list(counts.failed.values())
    return (
        f"<section><h2>{_esc(summary.job)}: run {_esc(summary.run_id)}</h2>{banner}"
        f"{_pairs(_summary_pairs(report))}"
        f"<h3>Outcomes</h3>{_outcome_bar(summary)}{_codes(summary)}"
        f"<h3>Throughput</h3>{_throughput(summary)}"
        f"<h3>Latency</h3>{_latency_histogram(counts)}"
        f"{_by('org', counts.by_org)}{_by('product key', counts.by_product)}"
        + _listed(
            "Failed targets",
            failed[:LISTED],
            len(failed),
            ["target", "code", "EnOS message", "attempts"],
        )
        + _listed(
            "Effect unknown",
            counts.unknown,
            counts.unknown_total,
            ["target", "outcome", "message", "attempts"],
            extra="outcome",
        )
        + _listed(
            "Requests abandoned in flight (their targets may have been cancelled)",
            details.abandoned,
            summary.abandoned,
            ["target", "at", "message", "attempt"],
            extra="at",
        )
        + f"<h3>Timeline</h3>{_table(['when', 'what'], [list(e) for e in details.events])}"
        + "</section>"
    )


def render_html(runs: list[RunReport]) -> str:
    """The whole page for one or several run directories."""
    sections = "".join(_run_section(report) for report in runs)
    total = ""
    if len(runs) > 1:
        combined = combine([report.summary for report in runs])
        pairs: list[tuple[str, object]] = [
            ("runs", len(runs)),
            ("targets", combined.targets),
            *[(o.replace("_", " "), combined.outcomes[o]) for o in OUTCOMES],
            ("not attempted (resumable)", combined.not_attempted),
            ("requests", combined.attempts),
            ("worst exit code", combined.exit_code),
        ]
        differing = differing_totals([report.summary for report in runs])
        if differing is not None:
            pairs.append(("WARNING", differing))
        total = f"<section><h2>All runs</h2>{_pairs(pairs)}</section>"
    first = runs[0].summary
    title = f"{first.job}: run {first.run_id}" if len(runs) == 1 else f"{len(runs)} runs"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<title>{_esc(title)} - worker report</title><style>{_STYLE}</style></head><body>"
        f"<h1>EnOS command cancellation report: {_esc(title)}</h1>{total}{sections}</body></html>\n"
    )


def write_report(reports: list[RunReport], page: Path) -> list[Path]:
    """Write the page, and beside each run its failed.csv and followup.yaml (when targets
    failed); returns the follow-up job files written."""
    page.write_text(render_html(reports), encoding="utf-8")
    written = []
    for report in reports:
        followup = write_followup(report.run, report.manifest, report.counts)
        if followup is not None:
            written.append(followup)
    return written
