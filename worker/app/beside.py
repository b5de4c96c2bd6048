"""The tasks that run beside the engine during a segment: durability (fdatasync twice a
second), the rate timeline, signals (the first stops admitting, the second abandons what is in
flight) and the live progress line."""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from functools import partial
from typing import Any, TextIO

import anyio

from worker.app.recorder import RunRecorder
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.model import Target
from worker.report.console import progress_loop
from worker.store.state import Segment

TIMELINE_POINTS = 600


async def drive(
    engine: Engine,
    targets: Iterator[tuple[int, Target]],
    *,
    total: int,
    out: TextIO | None,
    segment: Segment | None = None,
    already: int = 0,
    signals: bool = True,
    progress: bool = True,
    searching: bool = False,
    earlier: Counter[str] | None = None,
    body: Callable[[Iterator[tuple[int, Target]]], Awaitable[StopReason]] | None = None,
    beside: Sequence[Callable[[], Coroutine[Any, Any, None]]] = (),
) -> StopReason:
    """Run the engine over the targets with its helpers: syncing the records (a run's), the
    rate timeline (a run's `segment`), signals (unless the caller stops it) and progress;
    `body` runs in place of engine.run (a run's conductor: window, stages) with its own
    helpers `beside`."""
    helpers: list[Callable[[], Coroutine[Any, Any, None]]] = list(beside)
    if isinstance(engine.recorder, RunRecorder):
        helpers.append(partial(_sync_loop, engine.recorder))
    if segment is not None:
        helpers.append(partial(_rate_sampler, engine, segment))
    if signals:
        helpers.append(partial(_signal_loop, engine, out))
    if progress:
        show = partial(progress_loop, engine.progress, engine.limiter, total, out, already)
        helpers.append(partial(show, searching=searching, earlier=earlier))
    async with anyio.create_task_group() as group:
        for helper in helpers:
            group.start_soon(helper)
        reason = await (body(targets) if body is not None else engine.run(targets))
        group.cancel_scope.cancel()
    return reason


async def _sync_loop(recorder: RunRecorder) -> None:
    """fdatasync the journal, the audit log and the mark twice a second, off the event loop."""
    while True:
        await anyio.sleep(0.5)
        await anyio.to_thread.run_sync(recorder.sync)


async def _rate_sampler(engine: Engine, segment: Segment) -> None:
    """Record [seconds, achieved req/s, limiter req/s] into the segment, about 600 points at
    most: when full, every other point is dropped and the interval doubles."""
    timeline = segment.rate_timeline
    interval, began, last = 1.0, time.monotonic(), 0
    while True:
        await anyio.sleep(interval)
        requests = engine.progress.requests
        limit = engine.limiter.rate
        allowed = round(limit, 1) if limit is not None else None
        seconds = round(time.monotonic() - began, 1)
        timeline.append([seconds, round((requests - last) / interval, 1), allowed])
        last = requests
        if len(timeline) >= TIMELINE_POINTS:
            timeline[:] = timeline[1::2]
            interval *= 2


async def _signal_loop(engine: Engine, out: TextIO | None) -> None:
    """First SIGINT/SIGTERM: stop admitting, finish in flight. Second: abandon in flight."""
    stream = out or sys.stderr
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not engine.stopping:
                stream.write(
                    f"\n{name}: no new targets; letting {engine.progress.in_flight} requests in "
                    "flight finish. Send it again to abandon them.\n"
                )
                stream.flush()
                engine.stop(StopReason.INTERRUPTED, f"{name} received")
            else:
                stream.write(f"\n{name} again: abandoning the requests in flight.\n")
                stream.flush()
                engine.cancel()
