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

from worker.app.wiring import RunOptions, build_engine, client_for, proven
from worker.model import Attempt, Outcome, Target, TargetResult
from worker.redact import printable

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


async def dry_run(
    options: RunOptions, sample: list[tuple[int, Target]]
) -> tuple[list[Probe], str | None]:
    """`--dry-run`: prove the gateway, then search the sampled targets (no cancel); returns
    the probes and why the gateway cannot be used or the searches stopped (None: neither)."""
    client = client_for(options)
    async with proven(client, options) as problem:
        if problem is not None or not sample:
            return [], problem
        probes = _Probes()
        engine = build_engine(client, probes, options, dry_run=True)
        await engine.run(iter(sample))
        return probes.found, engine.stop_message or None


def render(probes: list[Probe], total: int, out: TextIO | None = None) -> None:
    """What the sample says a real run would cancel."""
    stream = out or sys.stdout
    if not probes:
        _say(
            stream, "Dry run: credentials and gateway accepted (token obtained). No cancel sent.\n"
        )
        return
    with_pending = [p for p in probes if p.would_cancel]
    commands = sum(len(p.would_cancel) for p in probes)
    errors = [p for p in probes if p.error]
    _say(
        stream,
        f"Dry run: token obtained; searched {len(probes)} random targets of {total:,}. "
        "No cancel sent.\n",
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
        _say(stream, f"  {item.target.describe():<60} {what}\n")
    share = len(with_pending) / len(probes)
    _say(
        stream,
        f"  {len(with_pending)} of {len(probes)} sampled targets have commands to cancel "
        f"({commands} in all); a real run would cancel on about {share * total:,.0f} targets.\n",
    )
    if errors:
        _say(stream, f"  {len(errors)} sampled targets answered with an error (see above).\n")


def _say(stream: TextIO, text: str) -> None:
    """A line for people: what came from the gateway is shown escaped, never obeyed."""
    stream.write("\n".join(printable(line) for line in text.split("\n")))
