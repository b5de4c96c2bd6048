"""`worker run --dry-run`: prove the credentials and the gateway, and show what a run would do.

It obtains a token and, with ``--sample N``, searches N randomly chosen targets for cached
(state 1) commands. It never sends a cancel.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TextIO, TypeVar

import anyio

from worker.enos.client import EnOSClient
from worker.errors import EnOSError, FatalError
from worker.model import Limits, Target
from worker.ratelimit import RateLimiter

T = TypeVar("T")
SHOWN = 20


@dataclass(frozen=True)
class Probe:
    """What a search found for one sampled target."""

    target: Target
    would_cancel: tuple[str, ...] = ()
    error: str | None = None


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


async def probe(client: EnOSClient, sample: list[Target], limits: Limits) -> list[Probe]:
    """Search each sampled target for cached commands, at the run's rate and concurrency."""
    limiter = RateLimiter(limits.rate)
    found: list[Probe] = []
    gate = anyio.Semaphore(limits.concurrency)

    async def one(target: Target) -> None:
        async with gate:
            await limiter.acquire()
            try:
                pending = await client.search_commands(target, "state = 1")
            except FatalError:
                raise
            except EnOSError as exc:
                found.append(Probe(target, error=f"{exc.label}: {exc}"))
                return
            ids = [c.command_id for c in pending]
            if target.command_id is not None:
                ids = [i for i in ids if i == target.command_id]
            found.append(Probe(target, tuple(ids)))

    async with anyio.create_task_group() as group:
        for target in sample:
            group.start_soon(one, target)
    return found


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
        stream.write(f"  {item.target.describe():<60} {what}\n")
    share = len(with_pending) / len(probes)
    stream.write(
        f"  {len(with_pending)} of {len(probes)} sampled targets have cached commands "
        f"({commands} in all); a real run would cancel on about {share * total:,.0f} targets.\n"
    )
    if errors:
        stream.write(f"  {len(errors)} sampled targets answered with an error (see above).\n")
