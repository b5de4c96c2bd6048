"""The units operators write (rates, durations, positive numbers), parsed the same way for
job files and command-line flags. Pure: no I/O, no YAML.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from worker.errors import shown
from worker.model import Limits, Shard

_DURATION_RE = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


def parse_rate(value: object) -> float | str | None:
    """A rate: requests/s above 0, 'unlimited' (None) or 'auto'. Raises ValueError."""
    if isinstance(value, str) and value.strip().lower() in ("unlimited", "auto"):
        return None if value.strip().lower() == "unlimited" else "auto"
    return float(positive(value, float))


def with_rate(limits: Limits, rate: float | str | None) -> Limits:
    """`limits` with a parsed rate: a number, None (unlimited) or 'auto' (from rate_floor)."""
    if rate == "auto":
        return replace(limits, adaptive=True, rate=limits.rate_floor)
    assert not isinstance(rate, str)
    return replace(limits, adaptive=False, rate=rate)


def parse_duration(value: object) -> float:
    """Seconds from '45m', '2h', '90s', '1h30m' or a number of seconds. Raises ValueError."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(positive(value, float))
    match = _DURATION_RE.fullmatch(str(value).strip())
    if not match or not any(match.groups()):
        raise ValueError(f"{shown(value)} is not a duration")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(positive(hours * 3600 + minutes * 60 + seconds, float))


def positive(value: object, kind: Callable[[Any], Any]) -> Any:
    """`value` as `kind` (int or float) when it is a number above zero; else ValueError."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{shown(value)} is not a number")
    if kind is int and not isinstance(value, int):
        raise ValueError(f"{shown(value)} is not a whole number")
    if value <= 0:
        raise ValueError(f"{shown(value)} is not above zero")
    return kind(value)


MAX_ASSETS_PER_CALL = 100


def assets_per_call(value: object) -> int:
    """How many assets one cancel call may name (1 = one per call, as the docs' samples do)."""
    number = int(positive(value, int))
    if number > MAX_ASSETS_PER_CALL:
        raise ValueError(f"{shown(value)} is above {MAX_ASSETS_PER_CALL}")
    return number


def parse_shard(text: str) -> Shard:
    """``K/N``: shard K of N, K from 0 to N-1 (Kubernetes' JOB_COMPLETION_INDEX counts from 0)."""
    index, slash, count = text.partition("/")
    if not slash or not index.strip().isdigit() or not count.strip().isdigit():
        raise ValueError(f"{shown(text)} is not K/N (e.g. 0/4)")
    shard = Shard(int(index), int(count))
    if shard.count < 1 or shard.index >= shard.count:
        raise ValueError(f"{shown(text)}: K must be 0 to N-1 and N at least 1")
    return shard
