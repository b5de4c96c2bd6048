"""``worker validate --probe``: what the gateway says of its budget, before a run spends it. One
token call and one read-only call (a Search Command of one command on the job's first target, or
for a targets_query one Search Device page of one device); no cancel is sent. The calls a job
needs are set against what the gateway says is left."""

from __future__ import annotations

import math
from dataclasses import dataclass

from worker.app.wiring import RunOptions, client_for, proven
from worker.budget import Budget, Window
from worker.enos import protocol as p
from worker.errors import EnOSError, RateLimitedError
from worker.jobparts import TargetsQuery
from worker.jobs.query import expressions
from worker.model import Target

LONG_WINDOW_S = 3600.0  # windows this long or longer are budgets to spend, not paces
MAX_QUERY_PROBES = 20  # a query's searches probed for their count (one call each)


@dataclass(frozen=True)
class Probed:
    """What one read-only call showed: the stated budget (None: nothing stated), or why the
    gateway could not be probed."""

    budget: Budget | None
    problem: str | None = None
    refused: bool = False  # the read-only call itself was refused with 429: nothing is left
    counted: tuple[int, ...] = ()  # a targets_query: the devices each search counts (totalSize)


async def probe_budget(options: RunOptions, first: Target | TargetsQuery) -> Probed:
    """Prove the gateway (a token), then read-only calls: a search of one command on the
    `first` target, or, for a targets_query, one device of each of its searches (at most
    MAX_QUERY_PROBES; their totalSize counts the devices). The last answer's budget headers;
    a 429 is an answer too (the budget is spent)."""
    client = client_for(options)
    async with proven(client, options) as problem:
        if problem is not None:
            return Probed(None, problem)
        try:
            if isinstance(first, TargetsQuery):
                counted, budget = [], None
                for expression in expressions(first)[:MAX_QUERY_PROBES]:
                    found = await client.search_devices(first.org_id, expression, 1, 1)
                    counted.append(found.total)
                    budget = found.budget or budget
                return Probed(budget, counted=tuple(counted))
            page = await client.search_page(first, p.PENDING_EXPRESSION, 1, page_size=1)
            return Probed(page.budget)
        except RateLimitedError as refused:
            return Probed(refused.budget, refused=True)
        except EnOSError as exc:
            return Probed(None, f"the read-only call failed: {exc}")


def query_calls(counted: tuple[int, ...], *, selective: bool, assets_per_call: int) -> int:
    """The calls a targets_query job needs, from the devices its searches count: the searches
    that resolve it (pages of DEVICE_PAGE_SIZE_START), a cancel per device (or per list), and a
    search per device for a match. An estimate: a search paged again costs more."""
    devices = sum(counted)
    pages = sum(max(1, math.ceil(n / p.DEVICE_PAGE_SIZE_START)) for n in counted)
    per_call = 1 if selective else max(1, assets_per_call)
    return pages + math.ceil(devices / per_call) + (devices if selective else 0)


@dataclass(frozen=True)
class Fit:
    """Whether a job's calls fit in what the gateway says is left."""

    fits: bool
    said: str  # the verdict in words


def fit(probed: Probed, calls: int | None) -> Fit:
    """The job's `calls` against the longest windows stated (an hour or more: what is left of
    them is spent, not paced); without such a window, the pace alone says how long it takes.
    `calls` None: not known before the run (a targets_query): only a spent window is said."""
    budget = probed.budget
    if probed.refused and budget is None:
        return Fit(False, "the gateway refused the probe (HTTP 429): nothing is left now")
    if budget is None or not budget.windows:
        return Fit(True, "the gateway states no budget: nothing to compare (it may still 429)")
    if calls is None:
        spent = [w for w in budget.windows if _long(w) and w.remaining == 0]
        if spent:
            return Fit(False, f"nothing is left: {spent[0].describe()}; run it after the reset")
        return Fit(True, "the job's calls are known once its query is resolved (worker resolve)")
    for window in sorted((w for w in budget.windows if _long(w)), key=lambda w: w.reset_s):
        if window.remaining is not None and window.remaining < calls:
            return Fit(
                False,
                f"{calls:,} calls do not fit: {window.describe()}; split the job, or run it "
                "after the reset",
            )
    pace = budget.rate()
    took = f"; about {_duration(calls / pace)} at {pace:,.1f}/s" if pace else ""
    return Fit(True, f"{calls:,} calls fit in what is left{took}")


def _long(window: Window) -> bool:
    """A window long enough to be a budget to spend (an hour, a day, a calendar month)."""
    if window.length_s is None:
        return window.name in ("month", "year")
    return window.length_s >= LONG_WINDOW_S


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
