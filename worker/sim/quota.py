"""The simulated gateway's quota: requests counted in windows aligned to the UTC second, minute,
hour, day, month and year of the simulator's clock, announced on every business answer, refused
with 429 once a window is spent.

It behaves as the open-source gateway that enos-api.md §5.4 describes (and whose stock texts
EnOS's gateway shows): a request refused with 429 does not count against any window; the
``X-RateLimit-Limit-<Period>`` / ``X-RateLimit-Remaining-<Period>`` family lists every window
(remaining after this request); the IETF draft's ``RateLimit-Limit`` / ``RateLimit-Remaining`` /
``RateLimit-Reset`` describe one window only, the one with the fewest requests left (ties: the
larger limit), Reset in whole seconds, at least 1; ``Retry-After`` on a 429 is the rest of the
spent window in whole seconds (``exact``), absent (older versions), or at most a fixed number of
seconds (``capped``: a gateway that never asks for long waits, whatever its window).

A period may be shortened for tests and benchmarks (``day=2000/120``: a "day" of 120 s), so a
day quota can be spent and reset in minutes; its headers still say Day.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.sim.faults import Faults

PERIODS = ("second", "minute", "hour", "day", "month", "year")
FIXED_S = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
FAMILIES = ("x-ratelimit", "ietf", "both", "none")
RETRY_AFTER_MODES = ("exact", "absent", "capped")


@dataclass(frozen=True, slots=True)
class Rule:
    """One window: its period name, its limit, and its length when shortened (None: real)."""

    period: str
    limit: int
    length_s: float | None = None


def parse_quota(spec: str) -> tuple[Rule, ...]:
    """``second=100,minute=5000,day=100000`` (``day=2000/120``: a 120-s day); "" is none.

    Raises ValueError naming the bad part: a fault setting is checked when it is set.
    """
    rules: list[Rule] = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, value = part.partition("=")
        name = name.strip().lower()
        limit_text, _, length_text = value.partition("/")
        if name not in PERIODS or any(r.period == name for r in rules):
            raise ValueError(f"quota: {part!r}: the period must be one of {', '.join(PERIODS)}")
        try:
            limit = int(limit_text)
            length = float(length_text) if length_text else None
        except ValueError:
            raise ValueError(f"quota: {part!r}: expected period=limit[/seconds]") from None
        if limit < 0 or (length is not None and not 0 < length < math.inf):
            raise ValueError(f"quota: {part!r}: a limit >= 0 and a length > 0 are expected")
        rules.append(Rule(name, limit, length))
    return tuple(rules)


def window_bounds(rule: Rule, now: float) -> tuple[float, float]:
    """The (start, end) in epoch seconds of the rule's window holding `now`: aligned to the
    UTC second/minute/hour/day (epoch multiples), the calendar month or year, or multiples of
    the shortened length."""
    length = rule.length_s or FIXED_S.get(rule.period)
    if length is not None:
        start = math.floor(now / length) * length
        return start, start + length
    moment = datetime.fromtimestamp(now, UTC)
    if rule.period == "month":
        first = moment.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        following = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
    else:
        first = moment.replace(month=1, day=1, hour=0, minute=0, second=0, microsecond=0)
        following = first.replace(year=first.year + 1)
    return first.timestamp(), following.timestamp()


@dataclass(slots=True)
class _Count:
    rule: Rule
    end: float = -math.inf  # the end of the window counted in; past it, the count restarts
    used: int = 0


class Quota:
    """The gateway's counters for one application, and what it says about them."""

    def __init__(
        self,
        rules: tuple[Rule, ...],
        *,
        family: str = "x-ratelimit",
        retry_after: str = "exact",
        retry_after_cap_s: int = 1,
    ) -> None:
        if family not in FAMILIES:
            raise ValueError(f"quota_headers: one of {', '.join(FAMILIES)}")
        if retry_after not in RETRY_AFTER_MODES:
            raise ValueError(f"quota_retry_after: one of {', '.join(RETRY_AFTER_MODES)}")
        self._counts = [_Count(rule) for rule in rules]
        self.family = family
        self.retry_after = retry_after
        self.retry_after_cap_s = retry_after_cap_s
        self.refused = 0

    def admit(self, now: float) -> tuple[bool, dict[str, str]]:
        """Count one business call at `now` unless a window is spent; (admitted, headers)."""
        for count in self._counts:
            if now >= count.end:
                count.end, count.used = window_bounds(count.rule, now)[1], 0
        spent = [c for c in self._counts if c.used >= c.rule.limit]
        if not spent:
            for count in self._counts:
                count.used += 1
        else:
            self.refused += 1
        headers = self._headers(now)
        if spent and self.retry_after != "absent":
            wait = max(_whole_seconds(c.end - now) for c in spent)
            if self.retry_after == "capped":
                wait = min(wait, self.retry_after_cap_s)
            headers["Retry-After"] = str(wait)
        return not spent, headers

    def _headers(self, now: float) -> dict[str, str]:
        headers: dict[str, str] = {}
        if self.family in ("x-ratelimit", "both"):
            for count in self._counts:
                period = count.rule.period.capitalize()
                headers[f"X-RateLimit-Limit-{period}"] = str(count.rule.limit)
                headers[f"X-RateLimit-Remaining-{period}"] = str(_left(count))
        if self.family in ("ietf", "both") and self._counts:
            shown = min(self._counts, key=lambda c: (_left(c), -c.rule.limit))
            headers["RateLimit-Limit"] = str(shown.rule.limit)
            headers["RateLimit-Remaining"] = str(_left(shown))
            headers["RateLimit-Reset"] = str(_whole_seconds(shown.end - now))
        return headers


def _left(count: _Count) -> int:
    return max(0, count.rule.limit - count.used)


def _whole_seconds(seconds: float) -> int:
    """Seconds as the gateway states them: whole, rounded up, at least 1."""
    return max(1, math.ceil(seconds - 1e-9))


def quota_for(faults: Faults) -> Quota | None:
    """The quota `faults` set (None: no quota); ValueError for a setting that makes none."""
    if not faults.quota:
        return None
    if not isinstance(faults.quota, str):
        raise ValueError("quota: a text such as 'second=100,minute=5000' is expected")
    return Quota(
        parse_quota(faults.quota),
        family=faults.quota_headers,
        retry_after=faults.quota_retry_after,
        retry_after_cap_s=faults.retry_after_s,
    )
