"""Maintenance windows as pure computation on an injected clock: openings, closings, overnight
windows, absolute bounds, and the two days a year Europe/Berlin changes its clocks (the last
Sundays of March and October)."""

from __future__ import annotations

import math
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import orjson
import pytest

from tests.runs import write_job
from tests.simproc import run_worker
from worker.errors import JobFileError
from worker.jobparts import Window
from worker.jobs.parse import load_job
from worker.jobs.window import describe, next_open, span_at, spans, wall_instant, windows_needed

BERLIN = ZoneInfo("Europe/Berlin")
HOUR = 3600.0


def berlin(*parts: int, fold: int = 0) -> float:
    """An instant given as Berlin wall-clock time."""
    year, month, day, hour, *rest = parts
    minute = rest[0] if rest else 0
    return datetime(year, month, day, hour, minute, tzinfo=BERLIN, fold=fold).timestamp()


def utc(*parts: int) -> float:
    year, month, day, *rest = parts
    hour, minute = (*rest, 0, 0)[:2]
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def nightly(opens: str, closes: str, days: tuple[int, ...] = tuple(range(7))) -> Window:
    """A daily Berlin window from "HH:MM" to "HH:MM" (overnight when it closes earlier)."""
    hours, minutes = (int(x) for x in opens.split(":"))
    opening = hours * 60 + minutes
    hours, minutes = (int(x) for x in closes.split(":"))
    closing = hours * 60 + minutes
    if closing <= opening:
        closing += 24 * 60
    return Window(daily=(opening, closing), days=days, timezone="Europe/Berlin")


def test_a_daily_window_opens_and_closes_on_the_clock_it_is_given() -> None:
    """Before, during and after one opening; the next day's after it closed."""
    window = nightly("02:00", "04:00")
    before = span_at(window, berlin(2026, 6, 10, 1, 59))
    assert before is not None
    assert (before.opens, before.closes) == (berlin(2026, 6, 10, 2), berlin(2026, 6, 10, 4))
    assert not before.holds(berlin(2026, 6, 10, 1, 59))
    during = span_at(window, berlin(2026, 6, 10, 3))
    assert during == before
    assert during.holds(berlin(2026, 6, 10, 3))
    after = span_at(window, berlin(2026, 6, 10, 4))  # the closing instant is outside
    assert after is not None
    assert after.opens == berlin(2026, 6, 11, 2)


def test_days_and_an_overnight_window_belong_to_the_day_it_opens_on() -> None:
    """22:00-02:00 on Saturdays: Saturday 22:00 to Sunday 02:00, open on Sunday at 01:00,
    and Sunday evening is not a window."""
    window = nightly("22:00", "02:00", days=(5,))
    saturday = span_at(window, berlin(2026, 6, 10, 12))  # a Wednesday
    assert saturday is not None
    assert (saturday.opens, saturday.closes) == (berlin(2026, 6, 13, 22), berlin(2026, 6, 14, 2))
    assert span_at(window, berlin(2026, 6, 14, 1)) == saturday  # still open on Sunday
    later = span_at(window, berlin(2026, 6, 14, 2))
    assert later is not None
    assert later.opens == berlin(2026, 6, 20, 22)  # the next Saturday, not Sunday evening


def test_spring_forward_keeps_the_hour_that_exists() -> None:
    """Sunday 29 March 2026, 02:00 CET -> 03:00 CEST: 02:00-04:00 is 03:00-04:00 CEST, one
    hour; a window wholly inside the skipped hour does not open that day; one that closes in
    it closes at the jump."""
    day = span_at(nightly("02:00", "04:00"), berlin(2026, 3, 29, 0))
    assert day is not None
    assert day.opens == utc(2026, 3, 29, 1)  # 03:00 CEST, the jump itself
    assert day.closes == berlin(2026, 3, 29, 4)
    assert day.seconds == HOUR
    skipped = span_at(nightly("02:10", "02:50"), berlin(2026, 3, 29, 0))
    assert skipped is not None
    assert skipped.opens == berlin(2026, 3, 30, 2, 10)  # not on the 29th at all
    cut = span_at(nightly("01:30", "02:30"), berlin(2026, 3, 29, 0))
    assert cut is not None
    assert (cut.opens, cut.closes) == (utc(2026, 3, 29, 0, 30), utc(2026, 3, 29, 1))
    assert wall_instant(datetime(2026, 3, 29).date(), 150, BERLIN) == utc(2026, 3, 29, 1)


def test_fall_back_counts_the_repeated_hour_once() -> None:
    """Sunday 25 October 2026, 03:00 CEST -> 02:00 CET: 02:00-04:00 opens once, at the
    second 02:00 (CET), for two hours; a window inside the repeated hour runs once; a
    window that closes in it closes the first time the clock reads its closing time."""
    day = span_at(nightly("02:00", "04:00"), berlin(2026, 10, 24, 12))
    assert day is not None
    assert day.opens == berlin(2026, 10, 25, 2, fold=1) == utc(2026, 10, 25, 1)
    assert day.closes == berlin(2026, 10, 25, 4) == utc(2026, 10, 25, 3)
    assert day.seconds == 2 * HOUR
    inside = span_at(nightly("02:10", "02:40"), berlin(2026, 10, 25, 0))
    assert inside is not None
    assert (inside.opens, inside.seconds) == (utc(2026, 10, 25, 1, 10), 1800)
    after_inside = span_at(nightly("02:10", "02:40"), inside.closes)
    assert after_inside is not None
    assert after_inside.opens == berlin(2026, 10, 26, 2, 10)  # once on the 25th
    into = span_at(nightly("01:30", "02:30"), berlin(2026, 10, 25, 0))
    assert into is not None
    assert (into.opens, into.closes) == (utc(2026, 10, 24, 23, 30), utc(2026, 10, 25, 0, 30))


def test_absolute_bounds_alone_and_around_daily_hours() -> None:
    """not_before/not_after alone are one span; with daily hours they cut them; past
    not_after nothing opens again."""
    alone = Window(not_before=utc(2026, 6, 1), not_after=utc(2026, 6, 2))
    assert span_at(alone, utc(2026, 5, 1)) == (utc(2026, 6, 1), utc(2026, 6, 2))
    assert span_at(alone, utc(2026, 6, 2)) is None
    assert span_at(Window(not_after=utc(2026, 6, 2)), 0.0) == (-math.inf, utc(2026, 6, 2))
    both = Window(
        not_before=berlin(2026, 6, 10, 3),
        not_after=berlin(2026, 6, 12, 3),
        daily=(120, 240),
        timezone="Europe/Berlin",
    )
    assert span_at(both, 0.0) == (berlin(2026, 6, 10, 3), berlin(2026, 6, 10, 4))
    assert [s.opens for s in spans(both, 0.0, 5)] == [
        berlin(2026, 6, 10, 3),
        berlin(2026, 6, 11, 2),
        berlin(2026, 6, 12, 2),
    ]
    assert span_at(both, berlin(2026, 6, 12, 3)) is None


def test_touching_windows_are_one() -> None:
    window = Window(daily=(0, 1440), timezone="UTC")
    span = span_at(window, utc(2026, 6, 10, 12))
    assert span is not None
    assert span.opens == utc(2026, 6, 10)
    assert span.seconds > 30 * 24 * HOUR


def test_next_open_and_windows_needed(tmp_path: Path) -> None:
    """What the spool watcher asks (next_open: now when open, None when never again) and
    what validate says (how many openings the work takes)."""
    job = load_job(write_job(tmp_path, "targets: [{asset_id: a}]\n"))
    assert next_open(job, 5.0) == 5.0  # no window: any time
    window = nightly("02:00", "04:00", days=(5, 6))
    windowed = replace(job, window=window)
    friday = berlin(2026, 6, 12, 12)
    assert next_open(windowed, friday) == berlin(2026, 6, 13, 2)
    assert next_open(windowed, berlin(2026, 6, 13, 3)) == berlin(2026, 6, 13, 3)
    assert next_open(replace(job, window=Window(not_after=1.0)), 5.0) is None
    assert windows_needed(window, 5 * HOUR, friday) == (3, True)
    assert windows_needed(window, 30 * 60, berlin(2026, 6, 13, 3, 45)) == (2, True)
    assert windows_needed(Window(not_after=friday + HOUR), 2 * HOUR, friday) == (1, False)
    assert describe(window) == "daily 02:00-04:00 Europe/Berlin, sat, sun"


def test_window_keys_are_read_and_checked(tmp_path: Path) -> None:
    """A good window and stages are read; each mistake is named with its line and fix."""
    job = load_job(
        write_job(
            tmp_path,
            "targets: [{asset_id: a}]\n"
            "window:\n  daily: '22:00-02:00'\n  days: [sat, sunday]\n"
            "  timezone: Europe/Berlin\n  not_after: 2026-12-31T00:00:00Z\n"
            "stages:\n  - targets: 50\n  - percent: 5\n    wait_for_promotion: true\n"
            "    max_failed_percent: 2\n  - percent: 100\n",
        )
    )
    assert job.window == Window(
        not_after=utc(2026, 12, 31), daily=(1320, 1560), days=(5, 6), timezone="Europe/Berlin"
    )
    assert [s.describe() for s in job.stages] == [
        "50 targets",
        "5 % of the job",
        "100 % of the job",
    ]
    assert job.stages[1].wait_for_promotion
    assert job.stages[1].max_failed_percent == 2
    assert job.stages[0].max_failed_percent == 1  # the default
    bad = write_job(
        tmp_path,
        "targets: [{asset_id: a}]\n"
        "window:\n  daily: '02:00-02:00'\n  days: [funday]\n  timezone: Mars/Olympus\n"
        "  not_before: 2026-04-01\n"
        "stages:\n  - percent: 10\n  - percent: 5\n",
        name="bad.yaml",
    )
    with pytest.raises(JobFileError) as caught:
        load_job(bad)
    text = "\n".join(caught.value.problems)
    for expected in (
        "bad.yaml:6: window.daily: '02:00-02:00' opens and closes at once",
        "bad.yaml:7: window.days: 'funday' is not a weekday",
        "bad.yaml:8: window.timezone: 'Mars/Olympus' is not a time zone",
        "bad.yaml:9: window.not_before: '2026-04-01' is not an ISO 8601 time with a zone",
        "bad.yaml:12: stages[1].percent: 5 does not go further than the stage before (10)",
        "stages[1]: the last stage must reach percent: 100",
    ):
        assert expected in text
    no_zone = write_job(
        tmp_path, "targets: [{asset_id: a}]\nwindow: {daily: '02:00-04:00'}\n", name="z.yaml"
    )
    with pytest.raises(JobFileError, match=r"window\.daily: has no timezone"):
        load_job(no_zone)
    whole = write_job(
        tmp_path,
        "targets: [{asset_id: a}]\nwindow: {daily: '00:00-24:00', days: [sat], timezone: UTC}\n",
        name="whole.yaml",
    )
    window = load_job(whole).window  # what the refusal of '02:00-02:00' suggests
    assert window is not None
    assert window.daily == (0, 1440)
    saturday_noon = utc(2026, 6, 13, 12)
    span = span_at(window, saturday_noon)
    assert span is not None
    assert (span.opens, span.closes) == (utc(2026, 6, 13), utc(2026, 6, 14))


def test_validate_shows_the_window_and_the_stages(tmp_path: Path) -> None:
    """worker validate: the window in words, its next opening, how many openings the job
    needs at its rate; each stage's share of the sample and its gate."""
    path = write_job(
        tmp_path,
        "limits: {rate: 0.01}\nwindow: {daily: '02:00-04:00', days: [sat], timezone: UTC}\n"
        "stages: [{targets: 3}, {percent: 100, max_failed_percent: 2}]\n"
        "targets:\n" + "".join(f"  - asset_id: a{i}\n" for i in range(100)),
    )
    result = run_worker("validate", str(path), "--json")
    assert result.returncode == 0, result.stderr
    facts = orjson.loads(result.stdout)
    window = facts["window"]
    assert window["window"] == "daily 02:00-04:00 UTC, sat"
    assert window["next_s"] == 7200
    assert window["fits"] is True
    assert window["windows_needed"] in (2, 3)  # 10,000 s at 0.01/s (3 when one is open now)
    assert [(s["goes_to"], s["targets"]) for s in facts["stages"]] == [
        ("3 targets", 3),
        ("100 % of the job", 97),
    ]
    text = run_worker("validate", str(path)).stdout
    assert f"the job needs about {window['windows_needed']} opening(s) at its rate" in text
    assert "2: up to 100 % of the job (97 targets here); its gate lets at most 2 % fail" in text
