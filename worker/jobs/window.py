"""Maintenance windows, computed: when a job's ``window:`` is open, when it opens next and
when it closes, from a clock the caller passes (``now``, epoch seconds). Pure: no sleeping, no
I/O but the zone data zoneinfo reads, so tests walk through a window (and a change of daylight
saving time) with plain numbers.

A daily window is wall-clock time in its zone: it opens when the clock reads its opening time
and closes when the clock next reads its closing time. On the day the clocks go forward, a
time the clock skips is the instant it jumps past it: ``02:00-04:00`` in Europe/Berlin is
03:00-04:00 CEST that day, and a window wholly inside the skipped hour does not open. On the
day they go back, the repeated hour counts once: an opening the clock shows twice is taken
the second time, so ``02:00-04:00`` is 02:00-04:00 CET (two hours, once), and ``02:10-02:40``
opens once. (A window that spans the whole repeated hour, such as ``01:00-04:00``, is an hour
longer that night: both of its ends are wall-clock times.) An overnight window
(``22:00-02:00``) belongs to the day it opens on: ``days: [sat]`` opens Saturday 22:00 and
closes Sunday 02:00. Windows that touch (``00:00-24:00`` every day) are one.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from datetime import UTC, date, datetime, time, timedelta
from typing import NamedTuple
from zoneinfo import ZoneInfo

from worker.jobparts import DAY_NAMES, Window
from worker.model import Job

DAY_MINUTES = 24 * 60
_LOOKAHEAD_DAYS = 9  # a weekly window recurs within 7 days; 2 more for overnight spans
_MAX_JOINED = 62  # touching daily spans joined into one at most (two months)


class Span(NamedTuple):
    """One opening of a window: from `opens` to `closes` (epoch seconds; closes may be
    math.inf, and opens -math.inf, for a window with no bound on that side)."""

    opens: float
    closes: float

    def holds(self, now: float) -> bool:
        """Whether the window is open at `now`."""
        return self.opens <= now < self.closes

    @property
    def seconds(self) -> float:
        """How long it is open."""
        return self.closes - self.opens


def span_at(window: Window, now: float) -> Span | None:
    """The span open at `now`, else the next one to open; None when the window never opens
    again (its not_after has passed)."""
    start = now if window.not_before is None else max(now, window.not_before)
    if window.not_after is not None and start >= window.not_after:
        return None
    if window.daily is None:
        return Span(
            -math.inf if window.not_before is None else window.not_before,
            math.inf if window.not_after is None else window.not_after,
        )
    found = _daily_spans(window, start)
    first = next(found, None)
    if first is None:
        return None
    for following in found:  # windows that touch are one
        if following.opens > first.closes:
            break
        first = Span(first.opens, following.closes)
    return first


def spans(window: Window, now: float, count: int) -> list[Span]:
    """The next `count` spans from `now` (the one open now first), fewer when the window
    ends before."""
    found: list[Span] = []
    moment = now
    while len(found) < count:
        span = span_at(window, moment)
        if span is None or math.isinf(span.closes):
            if span is not None:
                found.append(span)
            break
        found.append(span)
        moment = span.closes
    return found


def next_open(job: Job, now: float) -> float | None:
    """When the job may next send: `now` when it has no window or its window is open, the
    next opening otherwise, None when its window never opens again. For callers that hold a
    job until its window (the spool watcher)."""
    return opens_next(job.window, now)


def opens_next(window: Window | None, now: float) -> float | None:
    """When a window next lets a job send (see next_open)."""
    if window is None:
        return now
    span = span_at(window, now)
    if span is None:
        return None
    return now if span.holds(now) else span.opens


def windows_needed(window: Window, seconds: float, now: float) -> tuple[int, bool]:
    """How many openings `seconds` of work take from `now` (the open one counted, from now),
    and whether they come at all (False: the window ends first; the count is then what
    there is)."""
    needed, left, moment = 0, seconds, now
    while left > 0 and needed < 10_000:
        span = span_at(window, moment)
        if span is None:
            return needed, False
        needed += 1
        left -= span.closes - max(span.opens, moment)
        moment = span.closes
    return needed, left <= 0


def _daily_spans(window: Window, start: float) -> Iterator[Span]:
    """The daily spans (cut to the absolute bounds) that have not closed by `start`, in
    order, from the day before `start` (an overnight span may still be open)."""
    assert window.daily is not None
    zone = ZoneInfo(window.timezone)
    opens_at, closes_at = window.daily
    first_day = datetime.fromtimestamp(start, zone).date() - timedelta(days=1)
    lower = -math.inf if window.not_before is None else window.not_before
    upper = math.inf if window.not_after is None else window.not_after
    for offset in range(_LOOKAHEAD_DAYS + _MAX_JOINED):
        day = first_day + timedelta(days=offset)
        if day.weekday() not in window.days:
            continue
        opening = wall_instant(day, opens_at, zone, last=True)
        opens = max(lower, opening)
        if opens >= upper:
            return
        closing = wall_instant(day, closes_at, zone)
        if closing < opening:  # both in the repeated hour: the closing after the opening
            closing = wall_instant(day, closes_at, zone, last=True)
        closes = min(upper, closing)
        if closes <= opens or closes <= start:
            continue  # wholly in a skipped hour, cut away by the bounds, or over
        yield Span(opens, closes)


def wall_instant(day: date, minutes: int, zone: ZoneInfo, *, last: bool = False) -> float:
    """The instant at which the wall clock in `zone` reads `minutes` after midnight of `day`
    (past 24 h: of a later day): a time the clock skips is the instant it jumps past it; a
    time it shows twice, the first time (with `last`, the second)."""
    day += timedelta(days=minutes // DAY_MINUTES)
    minutes %= DAY_MINUTES
    wall = datetime.combine(day, time(minutes // 60, minutes % 60))
    first = wall.replace(tzinfo=zone, fold=0).timestamp()
    other = wall.replace(tzinfo=zone, fold=1).timestamp()
    if _wall(first, zone) == wall:
        return other if last else first  # the same instant unless the clock shows it twice
    low, high = int(min(first, other)), int(max(first, other))  # the jump lies between
    while high - low > 1:
        middle = (low + high) // 2
        if _wall(middle, zone) >= wall:
            high = middle
        else:
            low = middle
    return float(high)


def _wall(instant: float, zone: ZoneInfo) -> datetime:
    """What the wall clock in `zone` reads at `instant` (naive)."""
    return datetime.fromtimestamp(instant, zone).replace(tzinfo=None)


def describe(window: Window) -> str:
    """The window in words, for validate, the status file and the summary."""
    parts = []
    if window.daily is not None:
        opens, closes = window.daily
        days = (
            "every day" if len(window.days) == 7 else ", ".join(DAY_NAMES[d] for d in window.days)
        )
        parts.append(f"daily {_hhmm(opens)}-{_hhmm(closes)} {window.timezone}, {days}")
    if window.not_before is not None:
        parts.append(f"not before {utc_text(window.not_before)}")
    if window.not_after is not None:
        parts.append(f"not after {utc_text(window.not_after)}")
    return "; ".join(parts)


def local_text(instant: float, window: Window) -> str:
    """An instant as the window's operators read it: in its zone, with the zone's name."""
    if math.isinf(instant):
        return "never" if instant > 0 else "always"
    moment = datetime.fromtimestamp(instant, ZoneInfo(window.timezone))
    return moment.strftime("%a %Y-%m-%d %H:%M %Z")


def utc_text(instant: float) -> str:
    """An instant in ISO 8601 UTC, to the second."""
    return datetime.fromtimestamp(instant, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _hhmm(minutes: int) -> str:
    """Minutes after midnight as HH:MM (a closing at the next day's midnight: 24:00)."""
    if minutes == DAY_MINUTES:
        return "24:00"
    minutes %= DAY_MINUTES
    return f"{minutes // 60:02d}:{minutes % 60:02d}"
