"""The run's shared rate limiter: exact pacing, no start-up burst, cut only by real push-back.

Slots are handed out by virtual scheduling (GCRA): each caller reserves the next free instant and
sleeps until it, so the rate holds however many tasks wait, with no lock and no polling. It starts
empty: the first second of a run sends `rate` requests, not twice that (aiolimiter's default
does). A caller reserves a slot at most HORIZON_S ahead; further back in the queue it waits and
asks again, so a change of rate takes effect within HORIZON_S.

What moves the rate, and nothing else:

- **HTTP 429** (explicit throttling) pauses every caller until Retry-After has passed. A fixed
  rate is then cut to half and ramps back linearly to the asked rate over RECOVERY_S after the
  pause, so one 429 costs seconds, not the rest of the run. ``rate: auto`` takes the knee (every
  answer that was not a 429 in the last second) and settles at 90 % of it, then probes upward
  by 1 % of the knee per second.
- **Overload**: random 5xx, timeouts and dropped connections are retried, and do not touch the
  rate unless they dominate. As in Google SRE's client-side adaptive throttling (K = 2): over the
  last WINDOW_S, when requests > K x accepted answers, the rate is capped at K x the accepted
  rate; the cap lifts as soon as accepted answers are back above 1/K of the requests.
- ``rate: auto`` starts at a floor and grows by 70 % of itself per second (slow start) until
  the first 429.
- **The gateway's stated budget and a spent quota** (:mod:`worker.core.quota`, given by the
  engine after each answer through :meth:`RateLimiter.budget`): the rate never exceeds what
  any stated window has left, spread to its end; a spent quota pauses the whole run until it
  turns, then one probe goes first (:attr:`RateLimiter.quota` says so while it lasts).

Every change of cause is reported through `on_change` (the runner logs it) and shown by
:attr:`RateLimiter.cause`; the ramp and the probe themselves are not logged step by step.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import anyio

from worker.budget import Budget, Window
from worker.core.ports import RateChange
from worker.core.quota import (
    QUOTA_PAUSE_S,
    SIGNALS_IN_A_ROW,
    QuotaPause,
    QuotaProbe,
    StatedWindows,
    next_boundary,
)
from worker.core.recent import TICK_S, WINDOW_S, RecentAnswers

HORIZON_S = 0.2  # the furthest ahead a slot is reserved
RECOVERY_S = 2.0  # a fixed rate's ramp back after a 429 pause
THROTTLE_CUT = 0.5  # a fixed rate's share right after a 429 pause
AUTO_SETTLE = 0.9  # rate: auto settles at this share of the knee
PROBE_SHARE = 0.01  # per second, as a share of the knee
SLOW_START_GAIN = 0.7  # per accepted answer: the rate grows by 70 % of itself per second
PROBE_POLL_S = 0.05  # while a quota probe is out, the others ask again this often
BOUNDARY_MARGIN_S = 1.0  # a guessed quota end: this long after the UTC boundary
HELD_POLL_S = 0.25  # while paused by an operator, callers ask again this often
PAUSED = "paused by operator"
_QUIET_CAUSES = frozenset({"asked", "budget", "probing", "slow start"})  # moved per answer


class RateLimiter:
    """Pace business calls at `rate` per second (None: unlimited), shared by all tasks."""

    def __init__(
        self,
        rate: float | None,
        *,
        adaptive: bool = False,
        ceiling: float | None = None,
        floor: float = 1.0,
        clock: Callable[[], float] = time.monotonic,  # what anyio's asyncio clock reads
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        on_change: Callable[[RateChange], None] | None = None,
        wall: Callable[[], float] = time.time,  # UTC: quota windows and their reset times
    ) -> None:
        self.adaptive = adaptive
        self.asked = ceiling if adaptive else rate  # the most this run may send (None: no bound)
        self.floor = min(floor, rate) if rate is not None else floor
        self._base = rate  # fixed: the asked rate; auto: where the AIMD stands
        self._slow_start = adaptive
        self._knee = rate or 0.0
        self._clock = clock
        self._sleep = sleep
        self._on_change = on_change
        self._wall = wall
        self._windows = StatedWindows()  # the stated budget, window by window
        self._budget_cap: float | None = None
        self._budget_told = False
        self.stated: Budget | None = None  # the last budget the gateway stated (read-only)
        self.quota: QuotaPause | None = None  # the run waits for the gateway's quota
        self._probe = QuotaProbe()
        self._guess = 0  # the UTC boundary an unstated quota wait goes to next
        self._in_a_row = 0  # 429 bursts with nothing answered between them
        now = clock()
        self._next = now  # the earliest instant the next slot may be used
        self._idle = True  # no slot reserved yet
        self._paused_until = 0.0
        self._last_cut = float("-inf")
        self._ramp_from: float | None = None  # fixed rate: the ramp back starts here
        self._overload_cap: float | None = None
        self._recent = RecentAnswers(now)  # requests, answers, accepts of the last WINDOW_S
        self.cause = "slow start" if adaptive else "asked"
        self._rate = self._effective()
        self.throttles = 0
        self.held = False  # paused by an operator (worker ctl): no slot is handed out

    @property
    def rate(self) -> float | None:
        """The rate allowed now, in requests per second (None: unlimited)."""
        return self._rate

    @property
    def budget_rate(self) -> float | None:
        """The most the gateway's stated budget allows now (None: no budget stated)."""
        return self._budget_cap

    # -- the hot path ---------------------------------------------------------------------------

    def _burst_window(self, rate: float) -> float:
        """How far behind schedule a slot may be used: 1/20 s of rate, at least one slot."""
        return max(1.0, rate / 20) / rate - 1.0 / rate

    def reserve(self) -> tuple[float, bool]:
        """Try to reserve the next slot: (seconds to wait, whether a slot is now held).

        No coroutine, no lock. With a slot held, wait and go, unless :meth:`paused` says a
        throttle began meanwhile (then ask again). Without one, wait and ask again.
        """
        if self.held:
            return HELD_POLL_S, False
        now = self._clock()
        if self._ramp_from is not None:
            self._ramp(now)
        if self._probe.holds(now):
            return PROBE_POLL_S, False  # a quota probe is out: wait for its answer
        rate = self._rate
        if rate is None:
            wait = self._paused_until - now
            if wait > 0:
                return wait, False
            self._probe.took(now)
            return 0.0, True
        if self._idle:  # the first slot: no catching up on a schedule that never ran
            self._idle, self._next = False, max(self._next, now)
        slot = max(self._next, now - self._burst_window(rate), self._paused_until)
        if slot - now > HORIZON_S:
            return max(0.001, slot - now - HORIZON_S), False
        self._probe.took(now)  # the quota probe, if one is due
        self._next = slot + 1.0 / rate
        return max(0.0, slot - now), True

    def release(self) -> None:
        """Give back the slot just reserved (its caller will not use it now)."""
        self._probe.given_back()  # while a probe is out no other slot is handed out
        if self._rate is not None:
            self._next -= 1.0 / self._rate

    def paused(self) -> bool:
        """Whether a throttle pause is in force now."""
        return self._paused_until > self._clock()

    async def acquire(self) -> None:
        """Wait for this caller's slot (what the engine does, without its stop handling)."""
        while True:
            wait, held = self.reserve()
            if wait > 0:
                await self._sleep(wait)
            if held and not self.paused():
                return

    # -- what the gateway answered --------------------------------------------------------------

    def accepted(self) -> None:
        """A usable answer: a success, or a target's own error (the gateway is fine)."""
        self._count(accepted=True)
        self._in_a_row = 0
        if self._probe.out:
            self._quota_over()
        if self.adaptive and self._base is not None:
            self._probe_up()

    def rejected(self) -> None:
        """A 5xx, a timeout, a dropped connection, a garbled answer: retried, and counted
        against the rate only when such answers dominate. (It passed the gateway's quota.)"""
        self._count(accepted=False)
        self._in_a_row = 0
        if self._probe.out:
            self._quota_over()

    def throttle(self, retry_after: float | None) -> None:
        """The gateway said 429: pause everyone (Retry-After, else 1 s) and cut the rate; or,
        when it is a spent quota (a long Retry-After, bursts in a row), a quota pause."""
        self.throttles += 1
        now = self._clock()
        self._roll(now)  # a 429 is not a request for the overload rule
        if self.quota is not None:
            if self._probe.out:
                self._probe_refused(retry_after)
            return  # else a call sent before the pause: nothing new
        if retry_after is not None and retry_after > QUOTA_PAUSE_S:
            self._quota_pause(retry_after, f"HTTP 429 with Retry-After {retry_after:g} s")
            return
        pause = retry_after if retry_after is not None else 1.0
        self._hold(now + pause)
        if now - self._last_cut < max(pause, 1.0):
            return  # a burst of 429s from one window is one signal, not fifty
        self._last_cut = now
        self._in_a_row += 1
        if self._in_a_row >= SIGNALS_IN_A_ROW:
            self._quota_guess(f"{self._in_a_row} bursts of HTTP 429 with nothing answered between")
            return
        if self._in_a_row > 1:
            return  # nothing answered since the last cut: no new measure of the rate
        detail = f"HTTP 429, Retry-After {pause:g} s"
        if self.adaptive:
            self._slow_start = False
            self._knee = max(self.floor, self._recent.knee())
            base = self._base if self._base is not None else self._knee
            self._base = max(self.floor, AUTO_SETTLE * min(base, self._knee))
            self._change("throttled", f"{detail}; knee {self._knee:.0f}/s")
        elif self.asked is not None:
            self._ramp_from = self._paused_until
            self._base = max(self.floor, THROTTLE_CUT * self.asked)
            self._change("throttled", f"{detail}; back to {self.asked:g}/s in {RECOVERY_S:g} s")
        else:
            self._change("throttled", detail)

    def _hold(self, until: float) -> None:
        """No slot before `until` (limiter clock)."""
        self._paused_until = max(self._paused_until, until)
        self._next = max(self._next, self._paused_until)

    # -- the gateway's stated budget ------------------------------------------------------------

    def budget(self, stated: Budget, in_flight: int = 0) -> None:
        """The gateway stated its budget on an answer: pace so that no window is overspent
        (what is left, less the `in_flight` calls the answer could not count yet, spread to
        the window's end); hold every call while a window is spent."""
        now = self._clock()
        if stated.windows:
            self.stated = stated
        spent = self._windows.read(stated, in_flight, now)
        if spent is not None:
            self._wait_for(spent, max(0.0, stated.at + spent.reset_s - self._wall()), now)
        self._recap(now)

    def _wait_for(self, spent: Window, wait_s: float, now: float) -> None:
        """A spent window: every call waits for its end (a quota pause when that is long)."""
        if wait_s > QUOTA_PAUSE_S:
            self._quota_pause(wait_s, f"the gateway's {spent.describe()}")
        else:
            self._hold(now + wait_s)

    def _recap(self, now: float) -> None:
        """The rate under the budget's cap, the least any live window allows; said once when
        it first binds. rate: auto starts at it and follows it (unless a 429 came within
        WINDOW_S: then its own knee rules); a fixed rate above it is warned of, once."""
        cap = self._windows.cap(now)
        if cap == self._budget_cap:
            return
        self._budget_cap = cap
        if cap is not None and self.adaptive:
            within = cap if self.asked is None else min(self.asked, cap)
            if self._slow_start:
                self._slow_start, self._base = False, within  # no probing for what is stated
                said = self._said()
                self._change("budget", f"rate: auto starts at the gateway's stated budget, {said}")
                return
            if now - self._last_cut >= WINDOW_S:
                self._base = within
        elif cap is not None and not self._budget_told and (self.asked is None or cap < self.asked):
            self._budget_told = True
            asked = "unlimited" if self.asked is None else f"{self.asked:g}/s"
            self._change(
                "budget",
                f"the gateway states a budget of {self._said()}, below the asked rate ({asked}): "
                "paced to the budget; pass --rate auto, or a --rate at or below it",
            )
            return
        self._rate = self._effective()
        if self.cause in _QUIET_CAUSES:
            self.cause = self._steady_cause()

    def _said(self) -> str:
        """The stated budget in words, for a log line (its numbers were bounded when read)."""
        return self.stated.describe() if self.stated is not None else "none"

    # -- a spent quota --------------------------------------------------------------------------

    def _quota_pause(
        self, wait_s: float, why: str, *, stated: bool = True, margin_s: float = 0.0
    ) -> None:
        """Every call waits `wait_s` (and `margin_s` more) for the quota, then one probe."""
        wall = self._wall()
        until = wall + wait_s
        pause = self.quota
        if pause is None:
            pause = QuotaPause(until, wall, why, stated)
        elif self._probe.out or until > pause.until + 1.0:
            pause = pause.extended(until, why, stated=stated)
        else:
            return  # the same pause, read again from another answer
        self.quota = pause
        self._probe.arm()
        self._hold(self._clock() + wait_s + margin_s)
        self._change("quota", f"{why}: calls wait until {pause.resets_at()}, then one probe")

    def _quota_guess(self, why: str) -> None:
        """A quota pause whose end the gateway did not state: to the next UTC minute, then
        (the probe refused again) hour, then day."""
        wall = self._wall()
        wait = next_boundary(wall, self._guess) - wall
        self._quota_pause(wait, why, stated=False, margin_s=BOUNDARY_MARGIN_S)

    def _probe_refused(self, retry_after: float | None) -> None:
        """The probe met a 429 too: wait again, as stated, else to the next boundary."""
        if retry_after is not None and retry_after > QUOTA_PAUSE_S:
            self._quota_pause(retry_after, f"the probe was refused, Retry-After {retry_after:g} s")
            return
        self._guess += 1
        self._quota_guess("the probe was refused too, without a long Retry-After")

    def _quota_over(self) -> None:
        """The probe was let through: the quota pause is over."""
        self.quota, self._guess, self._in_a_row = None, 0, 0
        self._probe.clear()
        self._change(self._steady_cause(), "the quota probe was let through: calls go again")

    # -- an operator's hand (worker ctl) --------------------------------------------------------

    def hold(self, held: bool) -> None:
        """Pause (True) or resume every caller: while held no slot is handed out (requests in
        flight finish); on resuming the schedule starts afresh, without a catch-up burst."""
        self.held = held
        self._idle = True
        steady = "overload" if self._overload_cap is not None else self._steady_cause()
        self.cause = PAUSED if held else steady

    def set_rate(self, rate: float | None) -> float | None:
        """An operator's rate (None: unlimited), fixed from now on (rate: auto stops probing),
        capped at the gateway's stated budget when known; returns the rate set."""
        cap = self.budget_rate
        if rate is not None and cap is not None:
            rate = min(rate, cap)
        self.adaptive = self._slow_start = False
        self.asked = self._base = rate
        if rate is not None:
            self.floor = min(self.floor, rate)
        self._ramp_from = None
        self._change("asked", f"set to {_per_s(rate)} by an operator")
        return rate

    # -- accounting -----------------------------------------------------------------------------

    def _count(self, *, accepted: bool) -> None:
        """Count one answered request (rolling the buckets over first)."""
        self._roll(self._clock())
        self._recent.count(accepted=accepted)

    def _roll(self, now: float) -> None:
        """A new bucket: judge the last window for overload; windows that turned unread say
        nothing any more."""
        if self._recent.roll(now):
            self._judge_overload()
            if self._windows.live:
                self._recap(self._recent.tick * TICK_S)

    def _judge_overload(self) -> None:
        """The overload cap (core.recent) set when it moves by over 10 %, lifted when gone."""
        found = self._recent.overload(self.floor)
        if found is not None:
            cap, why = found
            if self._overload_cap is None or abs(cap - self._overload_cap) > 0.1 * cap:
                self._overload_cap = cap
                self._change("overload", why)
        elif self._overload_cap is not None:
            self._overload_cap = None
            self._change(self._steady_cause(), "answers are back: the overload cap is lifted")

    # -- the rate -------------------------------------------------------------------------------

    def _ramp(self, now: float) -> None:
        """A fixed rate after a 429: linear from the cut back to the asked rate."""
        assert self._ramp_from is not None
        assert self.asked is not None
        share = (now - self._ramp_from) / RECOVERY_S
        if share >= 1.0:
            self._ramp_from = None
            self._base = self.asked
            self._change(self._steady_cause(), "recovered from the 429")
            return
        if share > 0:
            cut = THROTTLE_CUT * self.asked
            self._base = max(self.floor, cut + (self.asked - cut) * share)
            self._rate = self._effective()

    def _probe_up(self) -> None:
        """rate: auto, per accepted answer: slow start, else probe 1 % of the knee a second
        (never past the asked ceiling or the stated budget)."""
        rate = self._base
        assert rate is not None
        if self.asked is not None and rate >= self.asked:
            return
        if self._budget_cap is not None and rate >= self._budget_cap:
            return
        rate += SLOW_START_GAIN if self._slow_start else max(1.0, self._knee * PROBE_SHARE) / rate
        self._base = rate if self.asked is None else min(self.asked, rate)
        if self._overload_cap is None and self._budget_cap is None:
            self._rate = self._base
        else:
            self._rate = self._effective()

    def _effective(self) -> float | None:
        """The base rate under the overload cap and the stated budget (None: unlimited)."""
        rate = self._base
        for cap in (self._overload_cap, self._budget_cap):
            if cap is not None and (rate is None or cap < rate):
                rate = cap
        return rate

    def _steady_cause(self) -> str:
        if self.quota is not None:
            return "quota"
        if self._ramp_from is not None:
            return "throttled"
        cap = self._budget_cap
        if cap is not None and (self._base is None or cap < self._base):
            return "budget"
        if self.adaptive:
            return "slow start" if self._slow_start else "probing"
        return "asked"

    def _change(self, cause: str, detail: str) -> None:
        before, self._rate = self._rate, self._effective()
        if self._overload_cap is not None and cause != "overload":
            cause = "overload"
        self.cause = PAUSED if self.held else cause
        if self._on_change is not None:
            self._on_change(RateChange(before, self._rate, cause, detail))


def _per_s(rate: float | None) -> str:
    return "unlimited" if rate is None else f"{rate:g}/s"
