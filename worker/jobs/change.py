"""The job's change-control keys: ``window:`` (when it may send) and ``stages:`` (a staged
rollout behind verify gates), each read from its YAML node with every problem collected as
"file:line: field: what; fix"."""

from __future__ import annotations

import re
from collections.abc import Callable
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml

from worker.errors import shown
from worker.jobparts import DAY_NAMES, Stage, Window
from worker.jobs.nodes import Problems, instant, is_null, mapping, scalar_value

WINDOW_KEYS = ("not_before", "not_after", "daily", "days", "timezone")
STAGE_KEYS = ("targets", "percent", "wait_for_promotion", "max_failed_percent")
MAX_STAGES = 20
_DAILY_RE = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")
_FULL_DAYS = ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday", "sunday")


def read_window(node: yaml.Node | None, problems: Problems) -> Window | None:
    """A ``window:`` block: absolute (not_before, not_after), daily (daily, days, timezone),
    or both (the daily hours between the two instants)."""
    if is_null(node):
        return None
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, "window", "must be a mapping", "write 'window:' then indented keys")
        return None
    before = len(problems.items)
    fields = mapping(node, WINDOW_KEYS, "window.", problems)
    if not fields:
        problems.add(node, "window", "names no bound", f"give some of {', '.join(WINDOW_KEYS)}")
        return None
    bounds = {
        key: instant(fields[key], f"window.{key}", problems)
        for key in ("not_before", "not_after")
        if key in fields
    }
    daily = _daily(fields["daily"], problems) if "daily" in fields else None
    days = _days(fields["days"], problems) if "days" in fields else tuple(range(7))
    zone = _zone(fields["timezone"], problems) if "timezone" in fields else None
    if daily is None and "daily" not in fields:
        for key in ("days", "timezone"):
            if key in fields:
                problems.add(
                    fields[key],
                    f"window.{key}",
                    "only means something with daily",
                    'add daily: "02:00-04:00", or remove it',
                )
    elif "daily" in fields and "timezone" not in fields:
        problems.add(
            fields["daily"],
            "window.daily",
            "has no timezone",
            "add timezone: Europe/Berlin (or UTC): the hours are wall-clock time there",
        )
    not_before, not_after = bounds.get("not_before"), bounds.get("not_after")
    if not_before is not None and not_after is not None and not_before >= not_after:
        problems.add(node, "window", "not_before is not before not_after", "swap them")
    if len(problems.items) > before:
        return None
    return Window(not_before, not_after, daily, days, zone or "UTC")


def _daily(node: yaml.Node, problems: Problems) -> tuple[int, int] | None:
    """``"HH:MM-HH:MM"``: minutes after midnight, the closing after the opening (an overnight
    window closes the next day; 24:00 is the end of the day)."""
    text = str(node.value) if isinstance(node, yaml.ScalarNode) else ""
    found = _DAILY_RE.fullmatch(text)
    fix = 'write e.g. daily: "02:00-04:00" (or "22:00-02:00" overnight)'
    if found is None:
        problems.add(node, "window.daily", f"{shown(text)} is not HH:MM-HH:MM", fix)
        return None
    hours_open, minutes_open, hours_close, minutes_close = (int(g) for g in found.groups())
    opens, closes = hours_open * 60 + minutes_open, hours_close * 60 + minutes_close
    if hours_open > 23 or minutes_open > 59 or minutes_close > 59 or closes > 24 * 60:
        problems.add(node, "window.daily", f"{shown(text)} is not a time of day", fix)
        return None
    if opens == closes % (24 * 60) and closes != 24 * 60:  # "00:00-24:00": the whole day
        problems.add(
            node,
            "window.daily",
            f"{shown(text)} opens and closes at once",
            'for the whole day write "00:00-24:00"',
        )
        return None
    return opens, closes if closes > opens else closes + 24 * 60


def _days(node: yaml.Node, problems: Problems) -> tuple[int, ...]:
    """``[sat, sun]`` (or full names): the weekdays the window opens on."""
    items = node.value if isinstance(node, yaml.SequenceNode) else None
    fix = "write e.g. days: [sat, sun] (mon tue wed thu fri sat sun)"
    if not items:
        problems.add(node, "window.days", "must be a list of weekdays", fix)
        return ()
    days: set[int] = set()
    for item in items:
        word = str(item.value).strip().lower() if isinstance(item, yaml.ScalarNode) else ""
        if word in DAY_NAMES:
            days.add(DAY_NAMES.index(word))
        elif word in _FULL_DAYS:
            days.add(_FULL_DAYS.index(word))
        else:
            problems.add(item, "window.days", f"{shown(word)} is not a weekday", fix)
    return tuple(sorted(days))


def _zone(node: yaml.Node, problems: Problems) -> str | None:
    """An IANA time zone zoneinfo knows (Europe/Berlin, UTC)."""
    text = str(node.value).strip() if isinstance(node, yaml.ScalarNode) else ""
    try:
        ZoneInfo(text)
    except (ZoneInfoNotFoundError, ValueError):
        problems.add(
            node,
            "window.timezone",
            f"{shown(text)} is not a time zone this machine knows",
            "write an IANA name such as Europe/Berlin, America/New_York or UTC",
        )
        return None
    return text


def read_stages(node: yaml.Node | None, problems: Problems) -> tuple[Stage, ...]:
    """A ``stages:`` list: how far each stage goes (targets, or percent of the job, counted
    from the start), its failure threshold and whether it waits for a promotion. The last
    goes to percent: 100, so no target is left out."""
    if is_null(node):
        return ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        problems.add(
            node,
            "stages",
            "must be a list",
            "write e.g. stages: [{targets: 50}, {percent: 5}, {percent: 100}]",
        )
        return ()
    if len(node.value) > MAX_STAGES:
        problems.add(node, "stages", f"{len(node.value)} stages", f"use at most {MAX_STAGES}")
        return ()
    before = len(problems.items)
    stages = [_stage(item, f"stages[{i}]", problems) for i, item in enumerate(node.value)]
    if len(problems.items) > before:
        return ()
    found = [stage for stage in stages if stage is not None]
    _check_order(node, found, problems)
    if found and found[-1].percent != 100:
        problems.add(
            node.value[-1],
            f"stages[{len(found) - 1}]",
            "the last stage must reach percent: 100",
            "add '- percent: 100': the rest of the job runs there",
        )
    return tuple(found) if len(problems.items) == before else ()


def _stage(node: yaml.Node, where: str, problems: Problems) -> Stage | None:
    """One stage: exactly one of targets or percent, and its options."""
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, where, "must be a mapping", "write e.g. '- percent: 5'")
        return None
    fields = mapping(node, STAGE_KEYS, f"{where}.", problems)
    if ("targets" in fields) == ("percent" in fields):
        problems.add(
            node,
            where,
            "needs one of targets or percent",
            "write '- targets: 50' or '- percent: 5'",
        )
        return None
    values: dict[str, int | float | bool] = {}
    for key, value_node in fields.items():
        try:
            values[key] = _STAGE_VALUES[key](scalar_value(value_node))
        except ValueError as exc:
            problems.add(value_node, f"{where}.{key}", str(exc), _STAGE_FIXES[key])
    if len(values) < len(fields):
        return None
    targets, percent = values.get("targets"), values.get("percent")
    return Stage(
        targets=int(targets) if targets is not None else None,
        percent=float(percent) if percent is not None else None,
        wait_for_promotion=bool(values.get("wait_for_promotion", False)),
        max_failed_percent=float(values.get("max_failed_percent", 1.0)),
    )


def _count(value: object) -> int:
    """A stage's count of targets: a whole number (YAML's 50, not 50.0 or true)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{shown(value)} is not a whole number above zero")
    return value


def _share(value: object) -> float:
    """How far a stage goes in percent of the job: above 0 (an empty stage runs nothing)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise ValueError(f"{shown(value)} is not a percentage above 0 and at most 100")
    return float(value)


def _threshold(value: object) -> float:
    """A gate's failure threshold in percent: 0 (none may fail) to 100."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 100:
        raise ValueError(f"{shown(value)} is not a percentage from 0 to 100")
    return float(value)


def _flag(value: object) -> bool:
    """true or false as YAML reads them (not "yes please")."""
    if not isinstance(value, bool):
        raise ValueError(f"{shown(value)} is not true or false")
    return value


_STAGE_VALUES: dict[str, Callable[[object], int | float | bool]] = {
    "targets": _count,
    "percent": _share,
    "max_failed_percent": _threshold,
    "wait_for_promotion": _flag,
}
_STAGE_FIXES = {
    "targets": "how many targets of the job, counted from the start, e.g. 50",
    "percent": "how far, in percent of the whole job counted from the start, e.g. 5",
    "max_failed_percent": "the most failed targets the gate lets through, in percent, e.g. 1",
    "wait_for_promotion": "true: after its gate the run waits for worker ctl DIR promote",
}


def _check_order(node: yaml.SequenceNode, stages: list[Stage], problems: Problems) -> None:
    """Each stage goes further than the one before of its kind (targets after targets,
    percent after percent); which of a count and a percentage is further is known only
    once the targets are counted (a stage that goes no further then runs nothing)."""
    last: dict[str, float] = {}
    for index, stage in enumerate(stages):
        kind, value = (
            ("targets", float(stage.targets))
            if stage.targets is not None
            else ("percent", float(stage.percent or 0))
        )
        if kind in last and value <= last[kind]:
            problems.add(
                node.value[index],
                f"stages[{index}].{kind}",
                f"{value:g} does not go further than the stage before ({last[kind]:g})",
                "stages are counted from the start: each goes further",
            )
        last[kind] = value
