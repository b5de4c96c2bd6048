"""What ``worker validate`` says of a job's change control: its window (the next opening, and
how many openings the job needs at its rate) and its stages (how many of this plan's targets
each holds, its gate, whether it waits for a promotion)."""

from __future__ import annotations

import math
import time
from datetime import datetime
from typing import TextIO, TypedDict

from worker.app.staged import plan_stages
from worker.jobs.plan import Plan
from worker.jobs.window import describe, local_text, span_at, utc_text, windows_needed
from worker.model import Job


class WindowFacts(TypedDict):
    """The window as validate shows it."""

    window: str
    open_now: bool
    opens_at: str | None  # the next opening (or the open one's), ISO 8601 UTC
    closes_at: str | None
    next_s: float | None  # how long the next opening lasts
    windows_needed: int | None  # None: not known (no fixed rate)
    fits: bool | None  # False: the window ends before the job would


class StageFacts(TypedDict):
    """A stage as validate shows it."""

    stage: int
    goes_to: str
    targets: int  # this plan's targets in it
    max_failed_percent: float
    wait_for_promotion: bool


def window_facts(
    job: Job, estimate_s: float | None, now: float | None = None
) -> WindowFacts | None:
    """The job's window from now (None: the job has none)."""
    window = job.window
    if window is None:
        return None
    moment = time.time() if now is None else now
    span = span_at(window, moment)
    needed, fits = (
        (None, None) if estimate_s is None else windows_needed(window, estimate_s, moment)
    )
    return {
        "window": describe(window),
        "open_now": span is not None and span.holds(moment),
        "opens_at": _utc(span.opens) if span is not None else None,
        "closes_at": _utc(span.closes) if span is not None else None,
        "next_s": span.seconds if span is not None and math.isfinite(span.seconds) else None,
        "windows_needed": needed,
        "fits": fits,
    }


def stage_facts(job: Job, plan: Plan) -> list[StageFacts]:
    """Each stage with its part of this plan's targets (the job's sample, as a run takes it)."""
    if not job.stages:
        return []
    items = plan_stages(job, plan)["items"]
    return [
        {
            "stage": item["stage"],
            "goes_to": item["goes_to"],
            "targets": item["targets"],
            "max_failed_percent": item["max_failed_percent"],
            "wait_for_promotion": item["wait_for_promotion"],
        }
        for item in items
    ]


def write_change(
    out: TextIO, job: Job, window: WindowFacts | None, stages: list[StageFacts]
) -> None:
    """The window and the stages in words."""
    if window is not None and job.window is not None:
        out.write(f"  window            {window['window']}\n")
        out.write(f"                    {_next_text(job, window)}\n")
        needed = window["windows_needed"]
        if needed is None:
            out.write("                    openings needed: unknown (no fixed rate)\n")
        elif window["fits"] is False:
            out.write(
                f"  WARNING           the window ends before the job would: {needed} "
                "opening(s) left are not enough at this rate (the rest stays resumable)\n"
            )
        else:
            out.write(f"                    the job needs about {needed} opening(s) at its rate\n")
    for stage in stages:
        head = "  stages           " if stage["stage"] == 1 else "                   "
        promotion = ", then waits for worker ctl promote" if stage["wait_for_promotion"] else ""
        out.write(
            f"{head} {stage['stage']}: up to {stage['goes_to']} ({stage['targets']:,} targets "
            f"here); its gate lets at most {stage['max_failed_percent']:g} % fail{promotion}\n"
        )
    if stages:
        out.write(
            "                    (a gate also stops the run when a command a cancel named is "
            "pending again, or one a match kept was cancelled)\n"
        )


def _next_text(job: Job, window: WindowFacts) -> str:
    """Whether the window is open now, and until when; else when it next opens."""
    assert job.window is not None
    if window["opens_at"] is None:
        return "it has ended: it does not open again"
    opens = _seconds(window["opens_at"])
    closes = window["closes_at"]
    if window["open_now"]:
        end = local_text(_seconds(closes), job.window) if closes else "no set end"
        return f"open now, until {end}"
    until = f" to {local_text(_seconds(closes), job.window)}" if closes else ""
    return f"closed now; next opens {local_text(opens, job.window)}{until}"


def _utc(instant: float) -> str | None:
    return None if math.isinf(instant) else utc_text(instant)


def _seconds(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
