"""What a gateway states about its budget, read from one answer's headers: pure, bounded, and
believed only as far as it is consistent.

Two header families may come (the common API gateways' rate-limit headers; names are matched
case-insensitively):

- ``X-RateLimit-Limit-<Period>`` / ``X-RateLimit-Remaining-<Period>``, Period one of Second,
  Minute, Hour, Day, Month, Year: requests counted in windows aligned to the UTC second, minute,
  hour, day, calendar month and year. The window's end comes from our own clock. An answer
  whose request went out before a window's boundary and came back after it (within
  ``BOUNDARY_SLACK_S``) may have been counted in either window, so it is not read for that
  window: a reading of the old minute taken for the new one would stop the run for a minute.
- The IETF draft's ``RateLimit-Limit`` / ``RateLimit-Remaining`` / ``RateLimit-Reset`` (seconds
  to the window's end) describing one window, and ``RateLimit-Policy`` (``100;w=1, 5000;w=60``:
  each window's quota and length), whose windows give a steady bound (quota / length) where
  their use is not stated. A whole-second Reset is rounded up by the gateway (a second
  window's is always 1): its end is taken at our clock's whole second, the windows being
  aligned to the UTC second. When the X-RateLimit family is there too, it states every window
  exactly and the IETF one (a repeat of one of them) is not read.

``Retry-After`` (seconds or an HTTP date) is kept uncapped but bounded, for the limiter to tell
a window's edge from a spent quota.

Nothing is trusted: values that are not plain numbers, longer than 16 characters, above
``MAX_COUNT`` requests or ``MAX_WAIT_S`` seconds, a Remaining above its Limit, or a period the
family does not define, are ignored (the window is left out, never guessed).
"""

from __future__ import annotations

import email.utils
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import NamedTuple

PERIODS_S = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
CALENDAR = ("month", "year")
MAX_COUNT = 10**9  # requests in one window: more is not a budget, it is noise
MAX_WAIT_S = 366 * 86400.0  # a reset or Retry-After further away is noise
MAX_TEXT = 16  # characters of one number
MAX_POLICY_TEXT = 256  # characters of a RateLimit-Policy value read at most
MAX_POLICY_ITEMS = 8
BOUNDARY_SLACK_S = 0.25  # how far our UTC clock and the gateway's may disagree (at most)
_X_PREFIX = "x-ratelimit-"
_REMAINING = _X_PREFIX + "remaining-"
_IETF = ("ratelimit-limit", "ratelimit-remaining", "ratelimit-reset", "ratelimit-policy")


class Window(NamedTuple):
    """One window as stated: its name (the period, or "window" when its length is unknown),
    the requests left in it (None: only its quota is known) and its limit, the seconds from
    the reading to its end, and its length when known. (Tuples: one or two are made per
    answer, on the hot path.)"""

    name: str
    remaining: int | None
    limit: int | None
    reset_s: float
    length_s: float | None = None

    def rate(self) -> float:
        """What this window allows from now on, in requests per second: what is left spread
        to its end, or (only its quota known) its quota spread over its length."""
        if self.remaining is None:
            assert self.limit is not None
            assert self.length_s is not None
            return self.limit / self.length_s
        return self.remaining / max(self.reset_s, 1e-3)

    def describe(self) -> str:
        """E.g. "minute: 4,980 of 5,000 left, resets in 41 s"."""
        of = f" of {self.limit:,}" if self.limit is not None else ""
        if self.remaining is None:
            return f"{self.name}: {self.limit:,} per {self.length_s:g} s"
        return f"{self.name}: {self.remaining:,}{of} left, resets in {self.reset_s:.0f} s"


class Budget(NamedTuple):
    """Everything one answer stated about the gateway's budget, at `at` (epoch seconds)."""

    windows: tuple[Window, ...]
    at: float
    retry_after_s: float | None = None  # a 429's Retry-After, uncapped (at most MAX_WAIT_S)

    def rate(self) -> float | None:
        """The fastest pace that overspends no window (None: no window stated)."""
        binding = self.binding()
        return None if binding is None else binding.rate()

    def binding(self) -> Window | None:
        """The window that allows the least from now on."""
        return min(self.windows, key=Window.rate, default=None)

    def describe(self) -> str:
        """The binding window in words, e.g. "83.3/s (minute: 4,980 of 5,000 left, resets in
        41 s)"."""
        binding = self.binding()
        if binding is None:
            return "no window stated"
        return f"{binding.rate():,.1f}/s ({binding.describe()})"


def read_budget(headers: Mapping[str, str], *, sent_at: float, now: float) -> Budget | None:
    """The budget an answer's headers state (None: none at all). `sent_at` and `now` are the
    epoch seconds when the request went out and when the answer is read."""
    found: dict[str, str] | None = None
    for name, value in headers.items():
        low = name.lower()
        if "ratelimit" in low or low == "retry-after":
            found = found if found is not None else {}
            found.setdefault(low, value)  # a repeated header: the first one counts
    if found is None:
        return None
    windows = _x_ratelimit(found, sent_at, now)
    if not any(name.startswith(_X_PREFIX) for name in found):
        windows = _ietf(found, now)
    retry_after = _retry_after(found.get("retry-after"), now)
    if not windows and retry_after is None:
        return None
    return Budget(windows, now, retry_after)


def window_end(period: str, moment: float) -> float:
    """The end (epoch s) of the UTC-aligned `period` window holding `moment`."""
    length = PERIODS_S.get(period)
    if length is not None:
        return (math.floor(moment / length) + 1) * length
    at = datetime.fromtimestamp(moment, UTC)
    if period == "month":
        year, month = at.year + at.month // 12, at.month % 12 + 1
        return datetime(year, month, 1, tzinfo=UTC).timestamp()
    return datetime(at.year + 1, 1, 1, tzinfo=UTC).timestamp()


def _x_ratelimit(found: Mapping[str, str], sent_at: float, now: float) -> tuple[Window, ...]:
    """The X-RateLimit-*-<Period> windows whose reading is unambiguous."""
    windows = []
    for name, text in found.items():
        period = name[len(_REMAINING) :] if name.startswith(_REMAINING) else ""
        if period not in PERIODS_S and period not in CALENDAR:
            continue
        remaining = _count(text)
        limit_text = found.get(_X_PREFIX + "limit-" + period)
        limit = _count(limit_text)
        if remaining is None or (limit_text is not None and limit is None):
            continue
        if limit is not None and remaining > limit:
            continue  # less than what is left: not a limit
        end = window_end(period, now)
        slack = min(BOUNDARY_SLACK_S, PERIODS_S.get(period, 86400.0) / 20)
        if window_end(period, sent_at - slack) != end or window_end(period, now + slack) != end:
            continue  # near a boundary: which of the two windows counted the request?
        windows.append(Window(period, remaining, limit, end - now, PERIODS_S.get(period)))
    return tuple(windows)


def _ietf(found: Mapping[str, str], now: float) -> tuple[Window, ...]:
    """The RateLimit-* window and the RateLimit-Policy windows not already stated by it."""
    if not any(name in found for name in _IETF):
        return ()
    # The draft's first versions listed the policy in RateLimit-Limit: "100, 100;w=60".
    policy = _policy(found.get("ratelimit-policy")) or _policy(found.get("ratelimit-limit"))
    stated = _ietf_window(found, policy, now)
    windows = [] if stated is None else [stated]
    for quota, length in policy:
        if stated is not None and stated.length_s == length and stated.limit == quota:
            continue
        windows.append(Window(_name_of(length), None, quota, length, length))
    return tuple(windows)


def _ietf_window(
    found: Mapping[str, str], policy: list[tuple[int, float]], now: float
) -> Window | None:
    """The one window RateLimit-Limit/-Remaining/-Reset describe, named by the policy item
    with its quota (None: not stated, or not readable as a budget)."""
    remaining = _count(found.get("ratelimit-remaining"))
    limit_text = _first_item(found.get("ratelimit-limit"))
    limit = _count(limit_text)
    reset = _seconds(found.get("ratelimit-reset"))
    if remaining is None or reset is None or (limit_text is not None and limit is None):
        return None
    if limit is not None and remaining > limit:
        return None
    length = next((w for q, w in policy if q == limit and w >= reset), None)
    if reset.is_integer():  # rounded up to whole seconds: the end is a whole second
        reset = math.floor(now) + reset - now
    return Window(_name_of(length), remaining, limit, reset, length)


def _policy(value: str | None) -> list[tuple[int, float]]:
    """``100;w=1, 5000;w=60`` (also ``"name";q=100;w=60``): each window's (quota, length)."""
    if value is None or len(value) > MAX_POLICY_TEXT:
        return []
    items = []
    for item in value.split(",")[:MAX_POLICY_ITEMS]:
        parameters = [p.strip() for p in item.split(";")]
        named = {k: v for k, _, v in (p.partition("=") for p in parameters) if v}
        quota = _count(named.get("q", parameters[0]))
        length = _seconds(named.get("w"))
        if quota is not None and length is not None and length > 0:
            items.append((quota, length))
    return items


def _first_item(value: str | None) -> str | None:
    """The plain number that opens a structured value (``100, 100;w=60`` -> ``100``)."""
    return None if value is None else value.split(",", 1)[0].split(";", 1)[0]


def _name_of(length: float | None) -> str:
    """A window's name from its length: second/minute/hour/day, else "window"."""
    return next((name for name, s in PERIODS_S.items() if s == length), "window")


def _count(text: str | None) -> int | None:
    """A count of requests: plain digits, at most MAX_COUNT; anything else is None."""
    if text is None:
        return None
    text = text.strip()
    if not text or len(text) > MAX_TEXT or not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_COUNT else None


def _seconds(text: str | None) -> float | None:
    """A number of seconds (digits, one optional decimal point), at most MAX_WAIT_S."""
    if text is None:
        return None
    text = text.strip()
    whole, _, fraction = text.partition(".")
    if not whole or len(text) > MAX_TEXT or not (text.isascii() and whole.isdigit()):
        return None
    if fraction and not fraction.isdigit():
        return None
    value = float(text)
    return value if value <= MAX_WAIT_S else None


def _retry_after(text: str | None, now: float) -> float | None:
    """Retry-After as seconds from `now`: delta-seconds or an HTTP date (RFC 9110)."""
    if text is None or len(text) > 64:
        return None
    seconds = _seconds(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    wait = when.timestamp() - now
    return max(0.0, wait) if wait <= MAX_WAIT_S else None
