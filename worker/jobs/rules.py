"""The job's rules besides its targets: ``match:`` (which cached commands a selective target
cancels), ``limits:`` and ``abort:``; each read from its YAML node, every problem collected."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import yaml

from worker.errors import shown
from worker.jobs.nodes import Problems, id_text, instant, is_null, mapping, scalar_value
from worker.jobs.units import (
    MAX_ASSETS_PER_CALL,
    assets_per_call,
    parse_duration,
    parse_rate,
    positive,
    with_rate,
)
from worker.model import DEFAULT_RATE, AbortRule, Limits, Match

MATCH_KEYS = (
    "command_name",
    "command_name_locale",
    "tsl_identifier",
    "command_type",
    "created_after",
    "created_before",
)
LIMIT_KEYS = (
    "rate",
    "rate_floor",
    "rate_max",
    "concurrency",
    "attempts",
    "timeout",
    "deadline",
    "max_retry_after",
    "assets_per_call",
)
ABORT_KEYS = ("failure_ratio", "min_finished")


_LOCALE_RE = re.compile(r"default|[a-z]{2,3}(?:_[A-Z]{2})?")


def read_match(node: yaml.Node | None, field_name: str, problems: Problems) -> Match | None:
    """A `match:` block: which cached commands a selective target cancels."""
    if is_null(node):
        return None
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, field_name, "must be a mapping", "write 'match:' then indented keys")
        return None
    before = len(problems.items)
    fields = mapping(node, MATCH_KEYS, f"{field_name}.", problems)
    values: dict[str, Any] = {}  # Match's fields, as read from the file
    for key in ("command_name", "command_name_locale", "tsl_identifier"):
        if key in fields:
            values[key] = id_text(fields[key], f"{field_name}.{key}", problems)
    locale = values.get("command_name_locale")
    if locale is not None and not _LOCALE_RE.fullmatch(locale):
        problems.add(
            fields["command_name_locale"],
            f"{field_name}.command_name_locale",
            f"{shown(locale)} is not a locale",
            "write e.g. en_US, zh_CN or default",
        )
    if "command_type" in fields:
        values["command_type"] = _command_type(fields["command_type"], field_name, problems)
    for key in ("created_after", "created_before"):
        if key in fields:
            values[f"{key}_ms"] = _instant_ms(fields[key], f"{field_name}.{key}", problems)
    if len(problems.items) > before:
        return None
    if not values:
        problems.add(
            node, field_name, "names no criterion", f"give at least one of {', '.join(MATCH_KEYS)}"
        )
        return None
    after, until = values.get("created_after_ms"), values.get("created_before_ms")
    if after is not None and until is not None and after >= until:
        problems.add(
            node,
            field_name,
            "created_after is not before created_before",
            "swap them, or widen the window",
        )
        return None
    return Match(**values)


def _command_type(node: yaml.Node, field_name: str, problems: Problems) -> int | None:
    try:
        value = scalar_value(node)
    except ValueError:
        value = None
    if value not in (1, 2) or isinstance(value, bool):
        problems.add(
            node,
            f"{field_name}.command_type",
            f"{shown(value)} is not 1 or 2",
            "1 = measurement-point setting, 2 = service invocation",
        )
        return None
    return int(value)


def _instant_ms(node: yaml.Node, field_name: str, problems: Problems) -> int | None:
    """An ISO 8601 moment with a zone, as epoch milliseconds (as the gateway's times are)."""
    seconds = instant(node, field_name, problems)
    return None if seconds is None else int(seconds * 1000)


_LIMIT_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "rate": (parse_rate, "requests per second above 0, 'unlimited' or 'auto'"),
    "rate_floor": (lambda v: positive(v, float), "with rate: auto, the starting rate, e.g. 10"),
    "rate_max": (lambda v: positive(v, float), "with rate: auto, the highest rate to try"),
    "concurrency": (lambda v: positive(v, int), "a whole number of requests in flight, 1 or more"),
    "attempts": (lambda v: positive(v, int), "a whole number of attempts, 1 or more"),
    "timeout": (lambda v: positive(v, float), "seconds per attempt above 0, e.g. 10"),
    "deadline": (parse_duration, "a duration such as 90s, 45m, 2h or 1h30m"),
    "max_retry_after": (
        lambda v: positive(v, float),
        "seconds, the longest pause a gateway's Retry-After may ask for, e.g. 300",
    ),
    "assets_per_call": (
        assets_per_call,
        f"a whole number of assets per cancel call, 1 (the default) to {MAX_ASSETS_PER_CALL}",
    ),
}


def read_limits(node: yaml.Node | None, problems: Problems) -> Limits:
    values = _settings(node, "limits", LIMIT_KEYS, _LIMIT_PARSERS, problems)
    rate = values.pop("rate", DEFAULT_RATE)
    return with_rate(Limits(**values), rate)


def read_abort(node: yaml.Node | None, problems: Problems) -> AbortRule:
    parsers: dict[str, tuple[Callable[[Any], Any], str]] = {
        "failure_ratio": (_ratio, "a share of failed targets, above 0 and at most 1, e.g. 0.2"),
        "min_finished": (
            lambda v: positive(v, int),
            "a whole number of finished targets, 1 or more",
        ),
    }
    return AbortRule(**_settings(node, "abort", ABORT_KEYS, parsers, problems))


def _ratio(value: object) -> float:
    number = float(positive(value, float))
    if number > 1:
        raise ValueError(f"{shown(value)} is above 1")
    return number


def _settings(
    node: yaml.Node | None,
    section: str,
    allowed: tuple[str, ...],
    parsers: dict[str, tuple[Callable[[Any], Any], str]],
    problems: Problems,
) -> dict[str, Any]:
    """A section's values as read from the file, parsed, by key (a dataclass's fields)."""
    if is_null(node):
        return {}
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, section, "must be a mapping", f"write '{section}:' then indented keys")
        return {}
    values: dict[str, Any] = {}
    for key, value_node in mapping(node, allowed, f"{section}.", problems).items():
        parse, expected = parsers[key]
        try:
            values[key] = parse(scalar_value(value_node))
        except (ValueError, yaml.YAMLError) as exc:
            problems.add(value_node, f"{section}.{key}", str(exc), f"expected {expected}")
    return values
