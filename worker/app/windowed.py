"""The job's window during a segment: wait for it to open (saying when), and at its close
admit nothing more, let the requests in flight finish, and end the segment as resumable
(exit 4, reason "window closed", the next opening in the message and the summary).

The times come from :mod:`worker.jobs.window` on the conductor's clock (injected in tests);
the waits look at that clock five times a second, so a test moves through a window without
sleeping through it. The deadline is the engine's own timer: whichever comes first stops
the run (the first stop wins).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from functools import partial

import anyio

from worker.app.conducting import Conduct
from worker.core.ports import StopReason
from worker.jobs.window import Span, describe, local_text, span_at, utc_text
from worker.store.appendlog import iso
from worker.store.records import WindowEventRecord, WindowState

POLL_S = 0.2


class WindowWatch:
    """One segment's view of the job's window."""

    def __init__(self, conductor: Conduct) -> None:
        window = conductor.job.window
        assert window is not None
        self.conductor = conductor
        self.window = window
        self.text = describe(window)
        self.span: Span | None = None  # the opening the segment sends in, once open

    async def wait_open(self) -> bool:
        """Until the window is open (True), or the run is stopped meanwhile (False). A window
        that never opens again stops the run (exit 3: the job's window must change)."""
        conductor = self.conductor
        waited = False
        while True:
            now = conductor.clock()
            span = span_at(self.window, now)
            if span is None:
                why = f"the job's window ({self.text}) has ended and does not open again"
                conductor.engine.stop(StopReason.FATAL, f"{why}; change window: and resume")
                return False
            if span.holds(now):
                break
            waited = True
            if not self._waiting(span, now):
                return False
            phase = "waiting for the window"
            opened = partial(_reached, conductor.clock, span.opens)
            if not await conductor.hold_until(opened, phase):
                return False
        self.span = span
        self._remember(open_=True, opens=span.opens, closes=span.closes)
        return conductor.save() and self._event("opened" if waited else "open", span)

    def _waiting(self, span: Span, now: float) -> bool:
        """Say when it opens (the run's output, the audit, run.json, the status file)."""
        conductor = self.conductor
        self._remember(open_=False, opens=span.opens, closes=span.closes)
        conductor.say(
            f"waiting for the window ({self.text}): it opens {self._when(span.opens)}, in "
            f"{_duration(span.opens - now)}. worker ctl {conductor.run} status shows it; "
            "Ctrl-C or worker ctl stop ends the wait (resumable)"
        )
        return conductor.save() and self._event("waiting", span)

    async def close_loop(self) -> None:
        """At the close: stop the run as resumable, with the next opening (a task beside the
        engine; an opening with no end, a finished run or another stop ends it first)."""
        conductor = self.conductor
        while True:
            span = self.span
            if span is not None and conductor.clock() >= span.closes:
                break
            if conductor.engine.stopping:
                return
            await anyio.sleep(POLL_S)
        following = span_at(self.window, span.closes)
        message = f"the window closed at {self._when(span.closes)}; "
        if following is None:
            message += "it does not open again: change the job's window to go on"
        else:
            message += f"it opens again {self._when(following.opens)}: the run resumes there"
        self._remember(
            open_=False,
            opens=following.opens if following is not None else None,
            closes=None,
            closed=span.closes,
        )
        conductor.say(message)
        conductor.save()
        conductor.record(self._record("closed", following or Span(math.inf, math.inf)))
        conductor.engine.stop(StopReason.WINDOW, message)

    def _event(self, event: str, span: Span) -> bool:
        """A window audit record (False: it could not be written, and the run stops)."""
        return self.conductor.record(self._record(event, span))

    def _record(self, event: str, span: Span) -> WindowEventRecord:
        """The window's audit record: the event and the span it is about."""
        return {
            "type": "window",
            "at": iso(time.time()),
            "event": event,
            "window": self.text,
            "opens_at": _utc(span.opens),
            "closes_at": _utc(span.closes),
        }

    def _remember(
        self,
        *,
        open_: bool,
        opens: float | None,
        closes: float | None,
        closed: float | None = None,
    ) -> None:
        """The window as this segment saw it last, in run.json (so the summary has it)."""
        state: WindowState = {
            "window": self.text,
            "open": open_,
            "opens_at": _utc(opens),
            "closes_at": _utc(closes),
        }
        if closed is not None:
            state["closed_at"] = _utc(closed)
        self.conductor.manifest.window = state

    def _when(self, instant: float) -> str:
        """An instant in the window's zone, and in UTC."""
        return f"{local_text(instant, self.window)} ({_utc(instant)})"

    def status(self) -> WindowState:
        """The window for the status file."""
        return self.conductor.manifest.window or {"window": self.text}


def _reached(clock: Callable[[], float], instant: float) -> bool:
    """Whether the (injected) clock has reached `instant`: what a wait for an opening asks."""
    return clock() >= instant


def _utc(instant: float | None) -> str | None:
    """An instant as ISO 8601 UTC for records (None for no bound)."""
    if instant is None or math.isinf(instant):
        return None
    return utc_text(instant)


def _duration(seconds: float) -> str:
    """ "3 h 12 min", "4 min", "12 s"."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    if hours:
        return f"{hours} h {rest // 60} min"
    return f"{rest // 60} min" if rest >= 60 else f"{rest} s"
