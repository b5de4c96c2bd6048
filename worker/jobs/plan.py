"""The plan: every target streamed once before anything is sent (validated, counted, hashed,
duplicates found, a shard's part chosen, a resume's finished targets marked), and the targets a
run goes over, streamed again in the same order with the same ordinals.

Target lists are never held in memory: at a million targets the plan keeps a set of hashes
and, for a resume, one byte per target.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

from worker.errors import JobFileError
from worker.jobs.targets import (
    BOTH_MATCH_AND_ID,
    MAX_PROBLEMS,
    file_rows,
    open_regular,
    row_target,
)
from worker.model import Job, Shard, Target, gc_paused, identity_key, key_digest, selector_problem


@dataclass(frozen=True)
class Plan:
    """What a run would do: validated once before anything is sent."""

    listed: int
    total: int
    skip: frozenset[int]
    duplicate_notes: tuple[str, ...]
    targets_sha256: str
    orgs: Counter[str] = field(default_factory=Counter)
    cancel_all: int = 0
    shard: Shard | None = None  # only this shard's targets are counted and run
    pending: bytes | None = None  # with a resume's done set: per ordinal, 1 if still to run

    @property
    def pending_count(self) -> int | None:
        """Targets still to run (None: not known, the plan had no done set)."""
        return None if self.pending is None else self.pending.count(1)


def all_targets(job: Job) -> Iterator[Target]:
    """Every listed target in order (inline first, then the file), duplicates included."""
    return (target for target in _listed(job, None) if target is not None)


def _listed(
    job: Job, done: set[int] | None, pending: bytes | None = None
) -> Iterator[Target | None]:
    """The listed targets; one whose digest is in `done`, or whose ordinal `pending` (the
    plan's marks) does not mark, is None (its place still counts) and is never built: resuming
    a run of a million skips the finished ones cheaply."""
    for ordinal, target in enumerate(job.inline_targets):
        skipped = pending is not None and not pending[ordinal]
        yield None if skipped or (done and target.digest() in done) else target
    if job.targets_file is None:
        return
    path = job.targets_file.path
    org_default, command_default = job.org_id or "", job.command_id or ""
    rows = enumerate(file_rows(job.targets_file), start=len(job.inline_targets))
    for ordinal, (line, row) in rows:
        if pending is not None and not pending[ordinal]:
            yield None
            continue
        if done:
            asset, product, device, command, org = row
            key = identity_key(
                org or org_default, asset, product, device, command or command_default
            )
            if key_digest(key) in done:
                yield None
                continue
        built = row_target(row, org_default, command_default, f"{path}:{line}", job.match)
        if isinstance(built, str):
            raise JobFileError([f"{path}:{line}: {built}"])
        yield built


def run_targets(
    job: Job, plan_: Plan, done: set[int] | None = None
) -> Iterator[tuple[int, Target]]:
    """The targets to run, in order, without duplicates and without those in `done`, each with
    its ordinal: its place in the job's list, the same in every segment of a run."""
    if plan_.pending is not None:  # the plan marked what is left (and the shard, duplicates)
        if plan_.pending.count(1):  # a finished run's resume does not read the file again
            marked = enumerate(_listed(job, None, plan_.pending))
            yield from ((ordinal, target) for ordinal, target in marked if target is not None)
        return
    skip, shard = plan_.skip, plan_.shard
    for ordinal, target in enumerate(_listed(job, done)):
        if target is None or ordinal in skip:
            continue
        if shard is None or shard.holds(target.digest()):
            yield ordinal, target


def plan(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
    """Stream every target once: validate, count, hash, find duplicates. Raises JobFileError.

    This is the only full pass before the first request, so it is written for speed: rows stay
    tuples, and duplicates are found by Python's hash of the row; a hash match is confirmed
    against the real keys before anything is dropped. With a `shard`, every row is still
    checked, but only the shard's are counted (duplicates share a shard: they share a key).
    With `done` (a resume's finished digests) it also marks which targets are still pending,
    so the run's pass builds only those, and a finished run's resume reads the file once.
    """
    seen: set[int] = set()
    pending = bytearray() if done is not None else None
    finished: set[int] = done if done is not None else set()
    candidates: dict[int, int] = {}  # ordinal of a probable duplicate -> its hash
    orgs: Counter[str] = Counter()
    cancel_all = 0
    with gc_paused():
        for ordinal, key in enumerate(_keys(job)):
            digest = key_digest(identity_key(*key)) if shard or pending is not None else 0
            if pending is not None:
                pending.append(digest not in finished and (shard is None or shard.holds(digest)))
            if shard is not None and not shard.holds(digest):
                continue
            number = hash(key)
            if number in seen:
                candidates[ordinal] = number
                continue
            seen.add(number)
            orgs[key[0]] += 1
            cancel_all += not key[4]
    skip, notes, distinct = _confirm_duplicates(job, candidates)
    for key in distinct:  # hash collisions: distinct targets after all
        orgs[key[0]] += 1
        cancel_all += not key[4]
    listed = len(seen) + len(candidates)
    return Plan(
        listed=listed,
        total=listed - len(skip),
        skip=frozenset(skip),
        duplicate_notes=notes,
        targets_sha256=targets_sha256(job),
        orgs=orgs,
        cancel_all=cancel_all,
        shard=shard,
        pending=_still_pending(pending, skip),
    )


def _still_pending(marks: bytearray | None, skip: set[int]) -> bytes | None:
    """One byte per listed target: 1 when it is to run (in the shard, not done, no duplicate)."""
    if marks is None:
        return None
    for ordinal in skip:
        marks[ordinal] = 0
    return bytes(marks)


Key = tuple[str, str, str, str, str]  # org, asset, product, device, command (defaults applied)


def _keys(job: Job) -> Iterator[Key]:
    """The identity of every listed target; bad rows collected and raised at the end."""
    for target in job.inline_targets:
        yield _target_key(target)
    if job.targets_file is None:
        return
    problems: list[str] = []
    org_default, command_default = job.org_id or "", job.command_id or ""
    path = job.targets_file.path
    try:
        for line, (asset, product, device, command, own_org) in file_rows(job.targets_file):
            org = own_org or org_default
            if job.match is not None and command:
                problems.append(f"{path}:{line}: {BOTH_MATCH_AND_ID}")
                continue
            if not org or not asset or product or device or "," in asset:  # common: no check
                problem = selector_problem(asset, product, device, org)
                if problem is not None:
                    problems.append(f"{path}:{line}: {problem}")
                    if len(problems) >= MAX_PROBLEMS:
                        break
                    continue
            yield org, asset, product, device, command or command_default
    except JobFileError as exc:
        problems.extend(exc.problems)
    if problems:
        raise JobFileError(problems[:MAX_PROBLEMS])


def _target_key(target: Target) -> Key:
    return (
        target.org_id,
        target.asset_id or "",
        target.product_key or "",
        target.device_key or "",
        target.command_id or "",
    )


def _confirm_duplicates(
    job: Job, candidates: dict[int, int]
) -> tuple[set[int], tuple[str, ...], list[Key]]:
    """Keep the candidates whose key really equals an earlier one, naming both places; return
    the keys of the others (hash collisions between distinct targets) too."""
    if not candidates:
        return set(), (), []
    wanted = set(candidates.values())
    first: dict[Key, str] = {}
    skip: set[int] = set()
    notes: list[str] = []
    distinct: list[Key] = []
    for ordinal, target in enumerate(all_targets(job)):
        key = _target_key(target)
        if hash(key) not in wanted:
            continue
        if key in first and ordinal in candidates:
            skip.add(ordinal)
            notes.append(f"{target.source}: duplicate of the target at {first[key]}; dropped")
            continue
        if ordinal in candidates:
            distinct.append(key)
        first.setdefault(key, target.source)
    return skip, tuple(notes), distinct


def inline_digest(job: Job) -> hashlib._Hash:
    """A sha256 of the inline targets (canonical, defaults applied), to go on with the targets
    file's bytes (as the plan hashes them, or as they are copied into the run directory)."""
    digest = hashlib.sha256()
    for target in job.inline_targets:
        digest.update(target.key().encode() + b"\n")
    return digest


def targets_sha256(job: Job) -> str:
    """sha256 of the inline targets (canonical, defaults applied) and the targets file's bytes.

    With no inline targets it is exactly ``sha256sum`` of the targets file.
    """
    digest = inline_digest(job)
    if job.targets_file is not None:
        with open_regular(job.targets_file.path) as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()
