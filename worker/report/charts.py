"""The report's charts, as inline SVG that scales to the page.

Each chart has a ``viewBox`` and ``width="100%"``: it shrinks with a narrow window instead of
being clipped (a fixed 640-pixel chart cut the failed share off the outcome bar on a phone), and
the page's style enlarges the labels on a narrow screen, in the chart's own units, so they stay
readable. Every number a chart shows is also written in text beside it. Nothing here comes from
the gateway or a file but numbers and fixed words; the few texts are escaped all the same.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from worker.store.state import Summary
from worker.store.tally import LATENCY_EDGES_MS, Counts

WIDTH = 600  # every chart's viewBox width; the page scales it
OUTCOMES = ("cancelled", "nothing_to_cancel", "failed")
SHOWN = (*OUTCOMES, "not_attempted")  # the outcome bar's parts, in order
COLOURS = {
    "cancelled": "#2da44e",
    "nothing_to_cancel": "#8c959f",
    "failed": "#cf222e",
    "not_attempted": "#d4a72c",
}
MIN_SHARE = 0.015  # a non-zero part of the outcome bar is never narrower than 1.5 %
STYLE = (
    "svg.chart{display:block;width:100%;max-width:44em;height:auto;margin:.3em 0}"
    "svg.chart text{font-size:13px;fill:#57606a}"
    ".legend .sw{display:inline-block;width:.8em;height:.8em;margin-right:.3em;"
    "vertical-align:-.05em;border:1px solid #57606a}"
    ".legend span.item{margin-right:1.2em;white-space:nowrap}"
    "@media (max-width:40em){svg.chart text{font-size:21px}svg.chart .minor{display:none}}"
)


def _nice(value: float) -> float:
    """A round upper bound for an axis, close above the value (a 510/s run gets 600/s, not
    1,000/s: the line stays in the upper part of the chart)."""
    if value <= 0:
        return 1.0
    scale = 10.0 ** math.floor(math.log10(value))
    for step in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if value <= step * scale:
            return step * scale
    return 10 * scale


# -- throughput ----------------------------------------------------------------------------------


@dataclass
class Span:
    """One segment on the chart's time line: its length, samples and asked rate."""

    number: int
    duration: float
    requests: int | None
    asked: float | None
    points: list[tuple[float, float, float | None]] = field(default_factory=list)


def spans(summary: Summary) -> list[Span]:
    """Every segment, the whole of each: its recorded duration, or its last sample when the
    duration is unknown (an older summary); samples are taken each second from +1 s, so the
    first covers the segment's start and the last stops before its end."""
    rate = summary.rate
    by_number: dict[int, Span] = {}
    for number, part in enumerate(rate.segments, start=1):
        asked = part.get("asked")
        by_number[number] = Span(
            number,
            float(part.get("duration_s") or 0.0),
            part.get("requests"),
            float(asked) if isinstance(asked, int | float) else None,
        )
    for segment, seconds, achieved, allowed in rate.timeline:
        span = by_number.setdefault(segment, Span(segment, 0.0, None, None))
        point = (float(seconds), float(achieved), None if allowed is None else float(allowed))
        span.points.append(point)
        span.duration = max(span.duration, float(seconds))
    return [by_number[n] for n in sorted(by_number)]


def achieved_steps(span: Span) -> list[tuple[float, float, float]]:
    """(from s, to s, requests/s) over the whole segment: each sample covers the time since
    the one before (the first: since the start), the last is carried to the segment's end
    (what is left is shorter than a sample, and the segment's start-up before its first
    request is counted in its duration too, so a rate made of it would dip falsely); a
    segment that died before its first sample shows its average."""
    if not span.points:
        if span.requests and span.duration > 0:
            return [(0.0, span.duration, span.requests / span.duration)]
        return []
    steps, before = [], 0.0
    for seconds, achieved, _ in span.points:
        steps.append((before, seconds, achieved))
        before = seconds
    if span.duration > before:
        steps.append((before, span.duration, steps[-1][2]))
    return steps


def allowed_steps(span: Span) -> list[tuple[float, float, float]]:
    """(from s, to s, allowed/s): each sample's limiter rate, the last one to the end."""
    steps, before = [], 0.0
    for seconds, _, allowed in span.points:
        if allowed is not None:
            steps.append((before, seconds, allowed))
        before = seconds
    if steps and span.duration > steps[-1][1]:
        steps.append((steps[-1][1], span.duration, steps[-1][2]))
    return steps


@dataclass(frozen=True)
class _Frame:
    """The throughput chart's axes: segments side by side on one time line."""

    offsets: dict[int, float]
    total: float
    top: float
    left: float = 84.0
    height: float = 200.0

    def x(self, segment: int, seconds: float) -> float:
        """Where a moment of a segment falls."""
        plot = WIDTH - 8 - self.left
        return self.left + (self.offsets[segment] + seconds) / self.total * plot

    def y(self, value: float) -> float:
        """Where a rate falls (20 units of room above the top line for its label)."""
        return 20 + (self.height - 20) * (1 - value / self.top)


def _path(frame: _Frame, segment: int, steps: list[tuple[float, float, float]]) -> str:
    """A step line through (from, to, value) triples."""
    coords = []
    for start, end, value in steps:
        y = frame.y(value)
        coords.append(f"{frame.x(segment, start):.1f},{y:.1f} {frame.x(segment, end):.1f},{y:.1f}")
    return " ".join(coords)


def throughput(summary: Summary) -> str:
    """Achieved (solid), allowed (dashed) and asked (dotted) requests/s over the whole run."""
    parts = [s for s in spans(summary) if s.duration > 0]
    achieved = {s.number: achieved_steps(s) for s in parts}
    if not parts or not any(achieved.values()):
        return "<p>Too short a run for a throughput chart.</p>"
    allowed = {s.number: allowed_steps(s) for s in parts}
    values = [v for steps in (*achieved.values(), *allowed.values()) for *_, v in steps]
    values += [s.asked for s in parts if s.asked is not None]
    offsets, position = {}, 0.0
    for span in parts:
        offsets[span.number] = position
        position += span.duration
    frame = _Frame(offsets, position, _nice(max(values) or 1.0))
    lines = [_grid(frame), *(_divider(frame, s) for s in parts[1:])]
    for span in parts:
        n = span.number
        if span.asked is not None:
            y = frame.y(span.asked)
            lines.append(
                f'<line x1="{frame.x(n, 0):.1f}" x2="{frame.x(n, span.duration):.1f}" '
                f'y1="{y:.1f}" y2="{y:.1f}" stroke="#bf8700" stroke-dasharray="1 4" '
                'stroke-width="2.5"/>'
            )
        if allowed[n]:
            lines.append(
                f'<polyline fill="none" stroke="#57606a" stroke-dasharray="6 4" '
                f'points="{_path(frame, n, allowed[n])}"/>'
            )
        if achieved[n]:
            lines.append(
                f'<polyline fill="none" stroke="#0969da" stroke-width="2.5" '
                f'points="{_path(frame, n, achieved[n])}"/>'
            )
    bottom = frame.height + 22
    return (
        f'<svg viewBox="0 0 {WIDTH} {bottom + 4:.0f}" width="100%" role="img" class="chart" '
        'aria-label="achieved, allowed and asked requests per second over the whole run">'
        f"{''.join(lines)}{_time_labels(frame, bottom)}</svg>"
        '<p class="legend"><span class="item"><b style="color:#0969da">&#8212;</b> achieved '
        'requests/s</span> <span class="item"><b style="color:#57606a">- -</b> allowed by the '
        'limiter</span> <span class="item"><b style="color:#bf8700">&middot;&middot;&middot;</b>'
        f" asked</span> (0 to {position:,.0f} s, every segment side by side; the average over "
        f"the run: {summary.rate.achieved or 0:,.1f}/s)</p>"
    )


def _grid(frame: _Frame) -> str:
    """Horizontal lines at quarters of the top, labelled on the left."""
    lines = []
    for share in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = frame.y(frame.top * share)
        minor = ' class="minor"' if share in (0.25, 0.75) else ""
        lines.append(
            f'<line x1="{frame.left:.0f}" x2="{WIDTH - 8}" y1="{y:.1f}" y2="{y:.1f}" '
            f'stroke="#d0d7de"/><text x="{frame.left - 6:.0f}" y="{y + 4:.1f}" '
            f'text-anchor="end"{minor}>{_rate(frame.top * share)}/s</text>'
        )
    return "".join(lines)


def _rate(value: float) -> str:
    """An axis label: whole numbers as such, a quarter of a small top with one decimal."""
    return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"


def _divider(frame: _Frame, span: Span) -> str:
    """Where a later segment starts."""
    x = frame.x(span.number, 0)
    return (
        f'<line x1="{x:.1f}" x2="{x:.1f}" y1="0" y2="{frame.height:.0f}" stroke="#57606a" '
        f'stroke-dasharray="2 2"/><text x="{x + 4:.1f}" y="14">segment {span.number}</text>'
    )


def _time_labels(frame: _Frame, bottom: float) -> str:
    """0 s, the middle and the end of the run, under the plot."""
    first = next(iter(frame.offsets))
    middle = frame.x(first, frame.total / 2)
    return (
        f'<text x="{frame.left:.0f}" y="{bottom:.0f}">0 s</text>'
        f'<text x="{middle:.1f}" y="{bottom:.0f}" text-anchor="middle" class="minor">'
        f"{frame.total / 2:,.0f} s</text>"
        f'<text x="{WIDTH - 8}" y="{bottom:.0f}" text-anchor="end">{frame.total:,.0f} s</text>'
    )


# -- outcomes --------------------------------------------------------------------------------------


def bar_widths(counts: list[int], width: float = WIDTH) -> list[float]:
    """Widths proportional to `counts`, but a non-zero count never narrower than MIN_SHARE of
    the bar (10 failed among 9,990 stay visible); the large parts give up what that costs."""
    total = sum(counts)
    if not total:
        return [0.0 for _ in counts]
    least = MIN_SHARE * width
    small = {i for i, c in enumerate(counts) if c and c / total * width < least}
    rest = sum(c for i, c in enumerate(counts) if i not in small)
    room = width - least * len(small)
    return [
        least if i in small else (c / rest * room if rest else 0.0) for i, c in enumerate(counts)
    ]


def outcome_bar(summary: Summary) -> str:
    """One bar of every target by outcome, and its legend with each count and share."""
    counts = [summary.outcomes.get(o, 0) for o in OUTCOMES] + [summary.not_attempted]
    total = sum(counts)
    rects, x = [], 0.0
    for name, count, width in zip(SHOWN, counts, bar_widths(counts), strict=True):
        if count:
            rects.append(
                f'<rect x="{x:.1f}" y="0" width="{width:.1f}" height="28" fill="{COLOURS[name]}">'
                f"<title>{_words(name)}: {count:,}</title></rect>"
            )
        x += width
    items = " ".join(
        f'<span class="item"><span class="sw" style="background:{COLOURS[name]}"></span>'
        f"{_words(name)} <b>{count:,}</b> ({_share(count, total)})</span>"
        for name, count in zip(SHOWN, counts, strict=True)
    )
    return (
        f'<svg viewBox="0 0 {WIDTH} 28" width="100%" role="img" '
        f'class="chart" aria-label="targets by outcome">{"".join(rects)}</svg>'
        f'<p class="legend">{items}</p>'
    )


def _words(name: str) -> str:
    return html.escape(name.replace("_", " "))


def _share(count: int, total: int) -> str:
    """A share in words that never rounds a non-zero count to 0 % or a short one to 100 %."""
    if not total:
        return "0 %"
    share = 100 * count / total
    if 0 < share < 0.1:
        return "&lt;0.1 %"
    if 99.9 < share < 100:
        return "&gt;99.9 %"
    return f"{share:.1f} %"


# -- latency ---------------------------------------------------------------------------------------


def latency_histogram(journal: Counts, height: float = 130.0) -> str:
    """Targets by the latency of their last attempt (every other label hides on a phone)."""
    counts = journal.latency_histogram
    if not any(counts):
        return "<p>No latencies recorded.</p>"
    labels = [f"&lt;{e}" for e in LATENCY_EDGES_MS] + [f"&#8805;{LATENCY_EDGES_MS[-1]}"]
    top = max(counts)
    bar = WIDTH / len(counts)
    bars = []
    for i, count in enumerate(counts):
        tall = count / top * height
        minor = ' class="minor"' if i % 2 else ""
        bars.append(
            f'<rect x="{i * bar + 2:.1f}" y="{height - tall:.1f}" width="{bar - 4:.1f}" '
            f'height="{tall:.1f}" fill="#0969da"><title>{labels[i]} ms: {count:,}</title></rect>'
            f'<text x="{(i + 0.5) * bar:.1f}" y="{height + 18:.0f}" text-anchor="middle"'
            f"{minor}>{labels[i]}</text>"
        )
    return (
        f'<svg viewBox="0 0 {WIDTH} {height + 24:.0f}" width="100%" role="img" class="chart" '
        f'aria-label="latency histogram">{"".join(bars)}</svg><p>Targets by the latency of '
        f"their last attempt, in milliseconds (the tallest bar: {top:,}).</p>"
    )
