"""`worker report`'s HTML page: one self-contained file people can read and attach to a ticket.

No scripts and no external assets (no network, no CDN): tables and inline SVG charts that scale
to the window (:mod:`worker.report.charts`). For each run directory, first what an incident
manager asks: the verdict in one sentence, what to do next (with the commands to paste), and the
facts (job and its sha256, what it cancelled, gateway, operator and host, times, version, the
audit head); then the outcomes, the throughput over the whole run beside the asked and the
allowed rate, a latency histogram, outcomes by org and by product key, the failed and the
effect-unknown targets (each with why), the requests abandoned in flight, and the run's
timeline; a total when there are several directories (shards, or segments run apart).
Everything that came from the gateway or a file goes through :func:`_esc`.
"""

from __future__ import annotations

import html
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from worker.enos.protocol import CODE_MEANINGS
from worker.report.charts import OUTCOMES, latency_histogram, outcome_bar, throughput
from worker.report.charts import STYLE as CHART_STYLE
from worker.report.details import RunReport, why_unknown
from worker.report.facts import RunFacts
from worker.report.followup import write_followup
from worker.report.hints import next_steps, state_of, verdict
from worker.report.query import differing_totals, query_lines
from worker.store.records import FailedRow
from worker.store.state import Summary
from worker.store.tally import LISTED

_STYLE = (
    "body{font-family:system-ui,sans-serif;margin:1em auto;padding:0 1em;max-width:64em;"
    "color:#1f2328;line-height:1.4}h1{font-size:1.6em;margin:.3em 0;overflow-wrap:anywhere}"
    ".kicker{color:#57606a;margin:0}table{border-collapse:collapse;margin:.5em 0}"
    "th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top;"
    "overflow-wrap:break-word}th{background:#f6f8fa;font-weight:600}td.n{text-align:right}"
    ".wide{overflow-x:auto}table.facts th{white-space:nowrap}"
    "code{background:#f6f8fa;padding:.1em .3em;word-break:break-all}"
    ".verdict{font-size:1.2em;font-weight:600;padding:.6em 1em;border-left:.4em solid}"
    ".done{background:#dafbe1;border-color:#2da44e}.failed,.unknown{background:#ffebe9;"
    "border-color:#cf222e}.stopped,.died{background:#fff8c5;border-color:#d4a72c}"
    ".running{background:#ddf4ff;border-color:#0969da}ol.next li{margin:.3em 0}"
    "section{margin-bottom:2.5em}@media (max-width:40em){table.facts th{white-space:normal}}"
    + CHART_STYLE
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
    """Text made safe for the page (every gateway or file string passes here); ints grouped."""
    return html.escape(f"{value:,}" if isinstance(value, int) else str(value))


def _table(header: list[str], rows: list[list[object]]) -> str:
    """A table of escaped cells (numbers right-aligned), scrolled sideways in its own box on
    a narrow screen rather than widening the page."""
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
    return f'<div class="wide"><table><tr>{head}</tr>{body}</table></div>'


def _pairs(pairs: list[tuple[str, object]]) -> str:
    """A two-column table of names and values (escaped)."""
    return (
        '<div class="wide"><table>'
        + "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in pairs)
        + "</table></div>"
    )


# -- sections ----------------------------------------------------------------------------------


def _summary_pairs(report: RunReport) -> list[tuple[str, object]]:
    """The run's numbers, below the outcomes (the header holds who, what and when)."""
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
        ("duration", f"{summary.duration_s:,.1f} s"),
        ("rate asked (per segment) / achieved", f"{asked} / {rate.achieved}"),
        ("latency p50 / p95 / p99 ms", f"{latency.p50} / {latency.p95} / {latency.p99}"),
    ]
    if summary.shard:
        pairs.insert(2, ("shard", summary.shard))
    if commands.get("matched") or commands.get("kept"):
        counts = [f"{commands.get(k, 0):,}" for k in ("matched", "cancelled", "missed", "kept")]
        pairs.append(("commands matched / cancelled / gone / kept", " / ".join(counts)))
    return pairs + _later_pairs(summary)


def _later_pairs(summary: Summary) -> list[tuple[str, object]]:
    """The verify sweep's and the lists' lines, for the runs that had them."""
    pairs: list[tuple[str, object]] = []
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


# -- the header: verdict, what next, facts -----------------------------------------------------


def _who_ran(facts: RunFacts) -> str:
    """Operator and host of the first segment, and of the last when someone else resumed."""
    first, last = facts.first, facts.last
    if first is None:
        return "not known (no audit log)"
    said = f"{first.get('operator', '?')} on {first.get('host', '?')}"
    then = f"{last.get('operator', '?')} on {last.get('host', '?')}" if last else said
    if then != said and last is not None:
        said += f" (segment 1); {then} (segment {last.get('segment', '?')})"
    return said


def _version(facts: RunFacts) -> str:
    """The worker version of the last segment, and of the first when it differs."""
    first, last = facts.first, facts.last
    if last is None:
        return "not known (no audit log)"
    said = last.get("worker_version", "?")
    before = first.get("worker_version", "?") if first is not None else said
    return said if before == said else f"{said} (segment 1: {before})"


def _ended(report: RunReport) -> str:
    """When the last segment ended, or why no end is recorded."""
    if report.summary.finished_at:
        return report.summary.finished_at
    if report.facts.holder is not None:
        return "not yet (running)"
    return "not recorded (the process died)"


def _facts(report: RunReport) -> str:
    """The facts people ask first, as a table of escaped text (and the commands in code)."""
    manifest, summary, facts = report.manifest, report.summary, report.facts
    if facts.head is None:
        head = "not known (no audit log)"
    else:
        check = f"worker audit verify {report.run} --head {facts.head}"
        head = (
            f"<code>{_esc(facts.head)}</code><br>keep it in the ticket; "
            f"<code>{_esc(check)}</code> proves the log still ends there"
        )
    rows = [
        ("job", _esc(f"{manifest.job_name} ({manifest.job})")),
        ("job sha256", f"<code>{_esc(manifest.job_sha256)}</code>"),
        ("cancels", _esc(facts.cancels)),
        ("targets", f"{manifest.targets:,}, sha256 <code>{_esc(manifest.targets_sha256)}</code>"),
        ("gateway", _esc(manifest.gateway)),
        ("operator and host", _esc(_who_ran(facts))),
        ("started", _esc(summary.started_at or "-")),
        ("ended", _esc(_ended(report))),
        ("worker version", _esc(_version(facts))),
        ("audit head", head),
    ]
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<div class="wide"><table class="facts">{body}</table></div>'


def _next(report: RunReport) -> str:
    """The what-next block: each step's words, then its commands to paste."""
    steps = next_steps(report.summary, report.manifest, report.run, report.facts.holder)
    items = "".join(
        f"<li>{_esc(step.text)}"
        + "".join(f"<br><code>{_esc(command)}</code>" for command in step.commands)
        + "</li>"
        for step in steps
    )
    return f'<h3>What next</h3><ol class="next">{items}</ol>'


def _header(report: RunReport) -> str:
    """The verdict, what next, the facts: what an incident manager forwards."""
    summary, holder = report.summary, report.facts.holder
    state = state_of(summary, holder)
    return (
        f'<p class="verdict {state}">{_esc(verdict(summary, holder))}</p>'
        f"{_next(report)}<h3>Facts</h3>{_facts(report)}"
    )


def _who(row: FailedRow) -> str:
    """A target as people name it: the device (asset id, else product/device key), the org."""
    device = row["asset_id"] or f"{row['product_key']}/{row['device_key']}"
    command = f" command {row['command_id']}" if row["command_id"] else ""
    return f"{device} ({row['org_id']}){command}"


def _target_rows(rows: list[FailedRow], extra: str) -> list[list[object]]:
    """A row per target: who, the code (or the `extra` column: at), message, attempts."""
    shown: list[list[object]] = []
    for row in rows:
        second = row.get("at") if extra == "at" else row["code"]
        shown.append([_who(row), str(second), row["msg"], row["attempts"]])
    return shown


def _unknown_rows(report: RunReport) -> list[list[object]]:
    """A row per effect-unknown target: who, its outcome, why it is unknown, attempts."""
    resumed = len(report.manifest.segments) > 1
    return [
        [
            _who(row),
            row["outcome"].replace("_", " "),
            why_unknown(row, resumed=resumed),
            row["attempts"],
        ]
        for row in report.counts.unknown
    ]


def _listed(title: str, rows: list[list[object]], total: int, header: list[str]) -> str:
    """A capped table of targets under its title and full count."""
    if not total:
        return ""
    more = (
        f"<p>... and {total - len(rows):,} more (see results.jsonl).</p>"
        if total > len(rows)
        else ""
    )
    return f"<h3>{_esc(title)} ({total:,})</h3>{_table(header, rows)}{more}"


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


def _targets(report: RunReport) -> str:
    """The failed, the effect-unknown and the abandoned targets, each capped."""
    summary, counts, details = report.summary, report.counts, report.details
    failed = list(counts.failed.values())
    return (
        _listed(
            "Failed targets",
            _target_rows(failed[:LISTED], "code"),
            len(failed),
            ["target", "code", "EnOS message", "attempts"],
        )
        + _listed(
            "Effect unknown",
            _unknown_rows(report),
            counts.unknown_total,
            ["target", "outcome", "why unknown", "attempts"],
        )
        + _listed(
            "Requests abandoned in flight (their targets may have been cancelled)",
            _target_rows(details.abandoned, "at"),
            summary.abandoned,
            ["target", "at", "message", "attempt"],
        )
    )


def _run_section(report: RunReport, *, heading: bool) -> str:
    """One run: the header first, then the charts, the numbers and the targets."""
    summary, counts, details = report.summary, report.counts, report.details
    shard = f" (shard {summary.shard})" if summary.shard else ""
    title = f"<h2>Run {_esc(summary.run_id)}{_esc(shard)}</h2>" if heading else ""
    return (
        f"<section>{title}{_header(report)}"
        f"<h3>Outcomes</h3>{outcome_bar(summary)}{_codes(summary)}"
        f"<h3>Throughput</h3>{throughput(summary)}"
        f"<h3>Latency</h3>{latency_histogram(counts)}"
        f"<h3>Numbers</h3>{_pairs(_summary_pairs(report))}"
        f"{_by('org', counts.by_org)}{_by('product key', counts.by_product)}"
        f"{_targets(report)}"
        f"<h3>Timeline</h3>{_table(['when', 'what'], [list(e) for e in details.events])}"
        "</section>"
    )


def _total(runs: list[RunReport]) -> str:
    """The sum over several runs (shards, or segments run apart)."""
    combined = combine([report.summary for report in runs])
    pairs: list[tuple[str, object]] = [
        ("runs", len(runs)),
        ("targets", combined.targets),
        *[(o.replace("_", " "), combined.outcomes[o]) for o in OUTCOMES],
        ("not attempted (resumable)", combined.not_attempted),
        ("effect unknown", combined.effect_unknown),
        ("requests", combined.attempts),
        ("worst exit code", combined.exit_code),
    ]
    differing = differing_totals([report.summary for report in runs])
    if differing is not None:
        pairs.append(("WARNING", differing))
    return f"<section><h2>All runs</h2>{_pairs(pairs)}</section>"


def render_html(runs: list[RunReport]) -> str:
    """The whole page for one or several run directories; the title is shown once (several
    runs: each section is headed by its run id)."""
    several = len(runs) > 1
    sections = "".join(_run_section(report, heading=several) for report in runs)
    first = runs[0].summary
    if several:
        jobs = ", ".join(dict.fromkeys(report.summary.job for report in runs))
        title = f"{len(runs)} runs of {jobs}"
    else:
        title = f"{first.job}: run {first.run_id}"
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)} - worker report</title><style>{_STYLE}</style></head><body>"
        f'<p class="kicker">EnOS command cancellation report</p><h1>{_esc(title)}</h1>'
        f"{_total(runs) if several else ''}{sections}</body></html>\n"
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
