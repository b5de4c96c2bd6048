"""The parts of a job file beyond its targets and limits, as frozen values: which devices a
query chooses (``targets_query:``), when the job may send (``window:``) and in which steps
(``stages:``). Pure data: :mod:`worker.jobs` reads and computes them."""

from __future__ import annotations

from dataclasses import dataclass, field

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # as datetime.weekday() counts


@dataclass(frozen=True, slots=True)
class Window:
    """When a job may send (``window:``): between two instants, or at the same wall-clock hours
    on chosen days in a time zone, or both (those hours, between those instants). Pure data:
    :mod:`worker.jobs.window` computes openings and closings from it."""

    not_before: float | None = None  # epoch seconds
    not_after: float | None = None
    daily: tuple[int, int] | None = None  # minutes after midnight: opens, closes (> opens)
    days: tuple[int, ...] = tuple(range(7))  # the weekdays it opens on (Monday 0)
    timezone: str = "UTC"  # an IANA zone (zoneinfo) the daily hours are read in


@dataclass(frozen=True, slots=True)
class Stage:
    """One step of a staged rollout (``stages:``): how far the run goes, counted from its
    start, in targets or in percent of the whole job; the gate after it lets the run go on
    when at most `max_failed_percent` of the stage's targets failed (and nothing is pending or
    cancelled that should not be); with `wait_for_promotion`, only after ``worker ctl promote``."""

    targets: int | None = None
    percent: float | None = None
    wait_for_promotion: bool = False
    max_failed_percent: float = 1.0

    def describe(self) -> str:
        """How far it goes, in words: "50 targets", "5 % of the job"."""
        if self.targets is not None:
            return f"{self.targets:,} target{'' if self.targets == 1 else 's'}"
        return f"{self.percent:g} % of the job"


@dataclass(frozen=True, slots=True)
class TargetsQuery:
    """Targets chosen by the fleet itself (``targets_query:``): every device of one org that
    Search Device finds for these criteria, all of which must hold. Resolved into a targets
    file at the start of a run (worker.jobs.query says it in words and as sent)."""

    org_id: str
    product_keys: tuple[str, ...] = ()  # any of them (one search per product key)
    asset_ids: tuple[str, ...] = ()  # any of them
    status: str | None = None  # inactive | online | offline | disable
    product_type: str | None = None  # Device | Gateway
    device_name: str | None = None  # fuzzy (the gateway's `like`)
    device_name_locale: str | None = None  # None: every name; default, en_US, zh_CN, ...
    source: str = field(default="", compare=False)  # where it was written ("job.yaml:7")
