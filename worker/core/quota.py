"""The gateway's budget as the limiter keeps it: the stated windows it paces to
(:class:`StatedWindows`), and the run's wait for a spent quota (:class:`QuotaPause`): when a
refusal is a spent quota rather than a window's edge, how long the run waits, and how it says
so; and the one call that goes first when the wait should be over (:class:`QuotaProbe`).
Pure values and functions; the limiter (:mod:`worker.core.ratelimit`) holds them, the
engine decides whether a wait still fits the run (:func:`too_long`).

Pacing: for any window the rate never exceeds what is left in it (less the calls still in
flight, which the answer could not count) spread to its end. ``rate: auto`` starts at it at
once; a fixed rate above it is paced to it, with one warning. A window spent until a few
seconds from now holds every call to its end. A spent window or a Retry-After longer than
QUOTA_PAUSE_S, or SIGNALS_IN_A_ROW bursts of 429s with nothing answered between, pause the whole
run until the window ends (stated, else the next UTC minute, then hour, then day); then one
probe goes first and the rest wait for its answer.

Why a quota pause is the run's and not the targets': a gateway counting a minute, day or month
refuses every call until the window ends. Retried target by target, each 429 would use one of
the target's throttles (``limits.max_throttles``), and a spent day would fail targets the
gateway never refused on their merits. So every call waits together, one probe goes when the
window should have turned, and the 429s met meanwhile cost no target anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.budget import Budget, Window

QUOTA_PAUSE_S = 5.0  # a wait longer than this is a spent quota, not a window's edge
QUOTA_STOP_S = 3600.0  # waiting longer than this for the quota ends the segment (resumable)
SIGNALS_IN_A_ROW = 3  # 429 bursts with no answer between them (and no long Retry-After)
GUESSES = (60.0, 3600.0, 86400.0)  # without a stated end: the next UTC minute, hour, day
PROBE_LOST_S = 60.0  # a probe unanswered this long (its caller stopped) is given to another
SPREAD_S = 60.0  # windows up to this long are spread to their end; longer ones are not
_NO_PROBE, _PROBE_DUE, _PROBE_OUT = 0, 1, 2


@dataclass(frozen=True, slots=True)
class QuotaPause:
    """Every call waits until `until` (epoch seconds), then one probe goes first. `since` is
    when the run began to wait for the quota (a failed probe continues the same wait);
    `stated` is False when `until` is a guess (a UTC boundary), True when the gateway said."""

    until: float
    since: float
    why: str
    stated: bool = True

    def resets_at(self) -> str:
        """When the quota resets, as a UTC time (with the date unless it is the same day as
        the wait's start), e.g. "12:04:00 UTC" or "2027-01-16 00:00:00 UTC"."""
        at = datetime.fromtimestamp(round(self.until), UTC)
        same_day = at.date() == datetime.fromtimestamp(self.since, UTC).date()
        text = at.strftime("%H:%M:%S UTC" if same_day else "%Y-%m-%d %H:%M:%S UTC")
        return text if self.stated else f"{text} at the earliest (a guess: the gateway did not say)"

    def describe(self, now: float) -> str:
        """The progress line's words: "quota: waiting 41 s (until 12:04:00 UTC)"."""
        wait = max(0.0, self.until - now)
        at = datetime.fromtimestamp(round(self.until), UTC).strftime("%H:%M:%S UTC")
        return f"quota: waiting {wait:.0f} s (until {at})"

    def extended(self, until: float, why: str, *, stated: bool) -> QuotaPause:
        """The same wait, going on to `until` (the probe was refused too)."""
        return QuotaPause(until, self.since, why, stated)


def next_boundary(now: float, guess: int) -> float:
    """The next UTC minute (guess 0), hour (1) or day (2) boundary after `now`, epoch s."""
    length = GUESSES[min(guess, len(GUESSES) - 1)]
    return (math.floor(now / length) + 1) * length


def too_long(pause: QuotaPause, deadline: float | None, attempt_timeout: float) -> str | None:
    """Why waiting out `pause` does not fit the run, as the stop's message (None: it fits):
    it would take longer than QUOTA_STOP_S in all (a spent day quota), or pass the deadline."""
    if pause.until - pause.since > QUOTA_STOP_S:
        why = f"waiting for it would take over {QUOTA_STOP_S / 3600:g} h"
    elif deadline is not None and pause.until + attempt_timeout >= deadline:
        why = "that is after the deadline"
    else:
        return None
    return (
        f"the gateway's quota is spent ({pause.why}) and resets at {pause.resets_at()}; "
        f"{why}: stopped, no target failed for it; resume after that"
    )


class StatedWindows:
    """The stated budget, window by window: the rate each allows and when it ends (limiter
    clock). A reading replaces the windows it states and leaves the others as last read (an
    answer near a boundary does not state the windows it cannot attribute); a window past its
    end has turned and says nothing until read again.

    Only windows up to SPREAD_S long (the second, the minute) are spread to their end: their
    refusals would come within the run and cost it. An hour, day or month is not: spreading
    what is left of a day over the day would make a job that needs a tenth of it last all
    day. Such a window is spent as fast as the shorter ones allow, then waited for (a quota
    pause), or the segment ends when that wait does not fit the run.
    """

    __slots__ = ("_windows",)

    def __init__(self) -> None:
        self._windows: dict[tuple[str, bool], tuple[float, float]] = {}

    @property
    def live(self) -> bool:
        """Whether any window is held."""
        return bool(self._windows)

    def read(self, stated: Budget, in_flight: int, now: float) -> Window | None:
        """Take in one reading at `now`; `in_flight` calls were sent that it could not count.
        Returns the spent window that ends last (None: none is spent)."""
        spent: Window | None = None
        windows = self._windows
        for window in stated.windows:
            key = (window.name, window.remaining is None)
            spread = (window.length_s or window.reset_s) <= SPREAD_S
            if window.remaining is None:  # only its quota is known: spread over its length
                if spread:
                    windows[key] = (window.rate(), now + window.reset_s)
                continue
            left = window.remaining - in_flight
            if left > 0:
                if spread:
                    windows[key] = (left / max(window.reset_s, 1e-3), now + window.reset_s)
                continue
            windows.pop(key, None)  # spent: waited out, then read afresh when it has turned
            if spent is None or window.reset_s > spent.reset_s:
                spent = window
        return spent

    def cap(self, now: float) -> float | None:
        """The least any live window allows, requests/s (None: no window held)."""
        windows = self._windows
        if any(end <= now for _, end in windows.values()):
            for key in [k for k, (_, end) in windows.items() if end <= now]:
                del windows[key]
        return min((rate for rate, _ in windows.values()), default=None)


class QuotaProbe:
    """After a quota pause, one call goes first and the rest wait for its answer: let through,
    the pause is over; refused, it goes on. A probe unanswered for PROBE_LOST_S (its caller
    stopped) is handed to another caller."""

    def __init__(self) -> None:
        self._state = _NO_PROBE
        self._at = 0.0

    def arm(self) -> None:
        """A pause began (or went on): the next slot handed out is the probe."""
        self._state = _PROBE_DUE

    def clear(self) -> None:
        """The pause is over: slots go out as usual."""
        self._state = _NO_PROBE

    @property
    def out(self) -> bool:
        """The probe was handed out and not answered yet."""
        return self._state == _PROBE_OUT

    def holds(self, now: float) -> bool:
        """Whether no slot may go out now: the probe is out (and not lost)."""
        if self._state == _PROBE_OUT and now - self._at > PROBE_LOST_S:
            self._state = _PROBE_DUE
        return self._state == _PROBE_OUT

    def took(self, now: float) -> None:
        """A slot was handed out: if a probe was due, this is it."""
        if self._state == _PROBE_DUE:
            self._state, self._at = _PROBE_OUT, now

    def given_back(self) -> None:
        """The slot just handed out was given back unused: the probe is due again."""
        if self._state == _PROBE_OUT:
            self._state = _PROBE_DUE
