"""`worker run --dry-run`: prove the credentials and the gateway, and show what a run would do.

It obtains a token and, with ``--sample N``, searches N randomly chosen targets for cached
(state 1) commands, through the same engine as a run (the rate, the retries, the stop on a
fatal answer). It never sends a cancel.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO, TypeVar

from worker.core.engine import Engine
from worker.core.ports import Canceller, EngineSettings
from worker.core.ratelimit import RateLimiter
from worker.core.retry import RetryPolicy
from worker.model import Attempt, Outcome, Target, TargetResult

T = TypeVar("T")
SHOWN = 20


@dataclass(frozen=True)
class Probe:
    """What a search found for one sampled target."""

    target: Target
    would_cancel: tuple[str, ...] = ()
    error: str | None = None
    kept: tuple[str, ...] = ()  # cached commands a selective target's match leaves alone


def reservoir(items: Iterable[T], size: int, rng: random.Random) -> list[T]:
    """A uniform random sample of `size` items from a stream of unknown length, in one pass."""
    chosen: list[T] = []
    for seen, item in enumerate(items):
        if seen < size:
            chosen.append(item)
        else:
            slot = rng.randint(0, seen)
            if slot < size:
                chosen[slot] = item
    return chosen


class _Probes:
    """The dry run's Recorder: keeps each sampled target's search result in memory."""

    def __init__(self) -> None:
        self.found: list[Probe] = []

    def attempt(self, attempt: Attempt, action: str) -> None:
        """Attempts of a dry run are not recorded."""

    def result(self, result: TargetResult) -> None:
        error = None
        if result.outcome is Outcome.FAILED:
            error = f"{result.code or result.http_status or 'error'}: {result.error}"
        self.found.append(
            Probe(result.target, result.found_command_ids, error, result.kept_command_ids)
        )


async def probe(
    client: Canceller,
    sample: list[tuple[int, Target]],
    limiter: RateLimiter,
    *,
    concurrency: int,
    policy: RetryPolicy,
) -> tuple[list[Probe], str | None]:
    """Search each sampled target for cached commands; (probes, why it stopped or None)."""
    probes = _Probes()
    settings = EngineSettings(concurrency=concurrency, policy=policy, dry_run=True)
    engine = Engine(client, probes, limiter, settings)
    await engine.run(iter(sample))
    return probes.found, engine.stop_message or None


def render(probes: list[Probe], total: int, out: TextIO | None = None) -> None:
    """What the sample says a real run would cancel."""
    stream = out or sys.stdout
    if not probes:
        stream.write(
            "Dry run: credentials and gateway accepted (token obtained). No cancel sent.\n"
        )
        return
    with_pending = [p for p in probes if p.would_cancel]
    commands = sum(len(p.would_cancel) for p in probes)
    errors = [p for p in probes if p.error]
    stream.write(
        f"Dry run: token obtained; searched {len(probes)} random targets of {total:,}. "
        "No cancel sent.\n"
    )
    for item in probes[:SHOWN]:
        if item.error:
            what = f"would fail: {item.error}"
        elif item.would_cancel:
            what = f"would cancel {len(item.would_cancel)}: {', '.join(item.would_cancel)}"
        else:
            what = "nothing to cancel"
        if item.target.match is not None:
            what += f"; keeps {len(item.kept)}" + (f": {', '.join(item.kept)}" if item.kept else "")
        stream.write(f"  {item.target.describe():<60} {what}\n")
    share = len(with_pending) / len(probes)
    stream.write(
        f"  {len(with_pending)} of {len(probes)} sampled targets have commands to cancel "
        f"({commands} in all); a real run would cancel on about {share * total:,.0f} targets.\n"
    )
    if errors:
        stream.write(f"  {len(errors)} sampled targets answered with an error (see above).\n")
