"""A staged rollout's sample: which stage each target belongs to.

Not the first lines of the file (a targets file is often sorted by site, so its first 5 % are
one site): every target has a rank, a 64-bit hash of its identity seeded by the job (its
name, fixed in run.json at the start, so a job fixed and resumed keeps its sample), and a
stage that goes to N targets of the job takes the N lowest ranks of the whole job. A shard
takes its part of the same sample (the ranks do not depend on the shard), so N shards'
stage 1 together is the job's stage 1. Pure: the caller streams the targets.
"""

from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass

from worker.jobparts import Stage

TOP_RANK = (1 << 64) - 1


def rank(seed: str, key: str) -> int:
    """A target's place in the job's sample (its identity key: Target.key())."""
    digest = hashlib.blake2b(seed.encode() + b"\x1e" + key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def reaches(stages: tuple[Stage, ...], total: int) -> list[int]:
    """How many of the job's `total` targets each stage goes to, counted from the start: a
    count as written, a percentage of the whole job rounded down; never less than the stage
    before (a stage that goes no further runs nothing); the last always reaches all."""
    found: list[int] = []
    for index, stage in enumerate(stages):
        if index == len(stages) - 1:
            upto = total
        elif stage.targets is not None:
            upto = min(total, stage.targets)
        else:
            upto = math.floor(total * (stage.percent or 0) / 100)
        found.append(max(upto, found[-1] if found else 0))
    return found


def cuts(upto: list[int], ranks: Iterable[int]) -> list[int]:
    """The highest rank each stage takes (-1: none), from the ranks of every distinct target
    of the job: the stage reaching N targets takes the N lowest. Holds only as many ranks as
    the largest stage short of the whole job."""
    total = upto[-1] if upto else 0
    partial = [n for n in upto if n < total]
    lowest = heapq.nsmallest(max(partial, default=0), ranks)
    return [TOP_RANK if n >= total else (lowest[n - 1] if n > 0 else -1) for n in upto]


@dataclass(frozen=True, slots=True)
class Sample:
    """The stage of a target: the first stage whose cut its rank is at or below."""

    seed: str
    cuts: tuple[int, ...]

    def stage_of(self, key: str) -> int:
        """The target's stage (0 = the first) by its identity key."""
        place = rank(self.seed, key)
        for index, cut in enumerate(self.cuts):
            if place <= cut:
                return index
        return len(self.cuts) - 1
