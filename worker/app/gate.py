"""A stage's gate: after the settle delay, the verify sweep over the stage's targets, and a
decision that passes only when

- no command a cancel reply of this stage named is pending (state 1) again;
- no command a ``match:`` kept has been cancelled since (state 2: collateral; a kept command
  delivered or expired meanwhile is not collateral, and commands created after the cancel are
  not counted: only what the replies named, and what the run's own search kept, is checked);
- at most ``max_failed_percent`` of the stage's targets failed;
- every target that had something to check could be checked.

Each device is searched (``state = 1``, every page) through a dry-run engine on the run's
own limiter (so a pause or a new rate holds for it too); a kept command no longer pending is
then read with Get Command, whose state tells delivered or expired from cancelled. The
searches stay outside the audit chain, as the verify sweep's do (they change nothing); their
lines are ``gate-N-<UTC time>.jsonl`` (a file per gate, never rewritten), whose sha256 the
gate's audit record holds, so the chain vouches for the evidence. Memory stays bounded by
what is found: the journal is read again rather than held.
"""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
import anyio.lowlevel
import orjson

from worker.app.conducting import Conduct
from worker.app.wiring import build_engine
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.core.retry import Retrying, Verdict
from worker.enos import protocol as p
from worker.errors import EnOSError, RateLimitedError
from worker.jobs.stages import Sample
from worker.model import Attempt, Outcome, Target, TargetResult, key_digest
from worker.store.appendlog import AppendLog, iso
from worker.store.journal import read_journal, record_key
from worker.store.layout import RunDir
from worker.store.records import GateRecord, ResultRecord, StageState

SHOWN = 20  # ids listed in the gate's record (all are in its evidence file)


@dataclass
class _Searches:
    """The dry-run engine's Recorder: each device's search, a line of evidence; kept in
    memory only what was found pending, and what could not be searched."""

    out: AppendLog
    found: dict[int, set[str]] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    searched: int = 0

    def attempt(self, attempt: Attempt, action: str) -> None:
        """Searches change nothing: outside the chain (their lines carry request ids)."""

    def result(self, result: TargetResult) -> None:
        """A device searched: its line of evidence; what is pending, or why not searched."""
        target, digest = result.target, result.target.digest()
        self.searched += 1
        failed = result.outcome is Outcome.FAILED
        if failed:
            self.failed[digest] = result.error or "the search failed"
        elif result.found_command_ids:
            self.found.setdefault(digest, set()).update(result.found_command_ids)
        self.out.append_line(
            orjson.dumps(
                {
                    "search": target.selector(),
                    "org_id": target.org_id,
                    "pending_now": list(result.found_command_ids),
                    "error": result.error if failed else None,
                    "request_id": result.request_id,
                    "at": iso(result.finished_at),
                }
            )
        )


@dataclass
class _Verdict:
    """What the gate found over the stage's lines."""

    targets: int = 0
    checked: int = 0
    failed: int = 0
    unverified: int = 0
    pending: list[str] = field(default_factory=list)
    collateral: list[str] = field(default_factory=list)
    acknowledged: list[str] = field(default_factory=list)


def device_of(line: ResultRecord) -> Target:
    """The device a result line is about, as a search names it (no command, no match)."""
    selector = line["target"]
    return Target(
        org_id=line["org_id"],
        asset_id=selector.get("asset_id"),
        product_key=selector.get("product_key"),
        device_key=selector.get("device_key"),
    )


def _device_text(line: ResultRecord) -> str:
    """How the gate's record names a device: its asset id, or product key/device key."""
    selector = line["target"]
    asset = selector.get("asset_id")
    return (
        asset
        if asset is not None
        else f"{selector.get('product_key')}/{selector.get('device_key')}"
    )


def _to_check(line: ResultRecord) -> bool:
    """Whether a line has anything for the gate: ids its replies named, or ids its match kept."""
    return bool(line.get("cancelled_command_ids") or line.get("kept_command_ids"))


class _StageLines:
    """A stage's final result lines, read from the journal as often as needed (a target run
    again with --retry-failed: its last line)."""

    def __init__(self, run: RunDir, sample: Sample, index: int) -> None:
        self.path, self.sample, self.index = run.results, sample, index
        seen: set[int] = set()
        self.later: dict[int, int] = {}  # targets with more lines: how many before the last
        for line in self._mine():
            digest = key_digest(record_key(line))
            if digest in seen:
                self.later[digest] = self.later.get(digest, 0) + 1
            seen.add(digest)

    def _mine(self) -> Iterator[ResultRecord]:
        """The journal's lines of this stage's targets, in journal order."""
        for line in read_journal(self.path):
            if self.sample.stage_of(record_key(line)) == self.index:
                yield line

    def final(self) -> Iterator[ResultRecord]:
        """Each target's final line."""
        left = dict(self.later)
        for line in self._mine():
            digest = key_digest(record_key(line))
            if left.get(digest, 0) > 0:
                left[digest] -= 1
                continue
            yield line


async def run_gate(
    conductor: Conduct,
    index: int,
    item: StageState,
    sample: Sample,
    acknowledged: set[str],
) -> GateRecord | None:
    """The gate of stage `index` (from 0); None when the run was stopped meanwhile (the
    stage stays "verifying": a resume runs its gate again)."""
    run, stage = conductor.run, item["stage"]
    phase = f"verifying stage {stage}"
    settle_until = time.monotonic() + conductor.options.verify_settle_s
    if not await conductor.hold_until(lambda: time.monotonic() >= settle_until, phase, held=False):
        return None
    conductor.phase = phase
    lines = _StageLines(run, sample, index)
    evidence = run.gate_lines(stage, datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ"))
    searches = _Searches(AppendLog(evidence))
    try:
        if not await _search(conductor, lines, searches):
            return None
        verdict = await _judge(conductor, lines, searches, acknowledged)
    finally:
        searches.out.close()
    if verdict is None:
        return None
    return _decision(verdict, item, evidence)


async def _search(conductor: Conduct, lines: _StageLines, searches: _Searches) -> bool:
    """Every device with something to check, searched by a dry-run engine that stops with
    the run and holds with its pause; False when stopped."""
    probes = (
        (ordinal, device_of(line)) for ordinal, line in enumerate(lines.final()) if _to_check(line)
    )
    engine = build_engine(
        conductor.client,
        searches,
        conductor.options,
        limiter=conductor.engine.limiter,
        dry_run=True,
    )
    conductor.gate_engine = engine
    if conductor.paused:
        engine.set_concurrency(0)
    try:
        async with anyio.create_task_group() as group:
            group.start_soon(_follow, conductor, engine)
            await engine.run(probes)
            group.cancel_scope.cancel()
    finally:
        conductor.gate_engine = None
    return not conductor.engine.stopping and engine.stop_reason is StopReason.FINISHED


async def _follow(conductor: Conduct, engine: Engine) -> None:
    """The gate's engine stops when the run does (a signal, worker ctl stop, the window)."""
    while True:  # the engine has no stop event to wait on: a look five times a second
        if conductor.engine.stopping:
            break
        await anyio.sleep(0.2)
    engine.stop(conductor.engine.stop_reason, conductor.engine.stop_message)


async def _judge(
    conductor: Conduct, lines: _StageLines, searches: _Searches, acknowledged: set[str]
) -> _Verdict | None:
    """The stage's final lines against what the searches found (and Gets of kept commands
    gone from the pending list); None when stopped."""
    verdict = _Verdict()
    rng = random.Random(conductor.options.seed)
    for line in lines.final():
        if verdict.targets % 1000 == 999:
            await anyio.lowlevel.checkpoint()  # the status file and worker ctl meanwhile
        verdict.targets += 1
        verdict.failed += line.get("outcome") == Outcome.FAILED
        if not _to_check(line):
            continue
        digest = device_of(line).digest()
        if digest in searches.failed:
            verdict.unverified += 1
            continue
        verdict.checked += 1
        now_pending = searches.found.get(digest, set())
        device = _device_text(line)
        named = line.get("cancelled_command_ids") or []
        verdict.pending += [f"{device} {cid}" for cid in named if cid in now_pending]
        gone = [cid for cid in line.get("kept_command_ids") or [] if cid not in now_pending]
        for command_id in gone:
            state = await _state_of(conductor, device_of(line), command_id, rng)
            if conductor.engine.stopping:
                return None
            text = f"{device} {command_id}"
            searches.out.append_line(
                orjson.dumps(
                    {"get": text, "kept_by_match": True, "state": state, "at": iso(time.time())}
                )
            )
            if not isinstance(state, int):
                verdict.unverified += 1
            elif state == p.CommandState.CANCELED:
                (verdict.acknowledged if text in acknowledged else verdict.collateral).append(text)
    return verdict


async def _state_of(
    conductor: Conduct, device: Target, command_id: str, rng: random.Random
) -> int | str:
    """A kept command's state now (Get Command, paced by the run's limiter and retried as
    any call), or why it could not be read."""
    limiter, retrying = conductor.engine.limiter, Retrying(conductor.options.policy())
    while not conductor.engine.stopping:
        wait, held = limiter.reserve()
        if wait > 0 or not held:
            if held:
                limiter.release()
            await anyio.sleep(min(max(wait, 0.01), 0.25))
            continue
        try:
            command = await conductor.client.get_command(device, command_id)
        except RateLimitedError as error:
            limiter.throttle(error.retry_after)
            continue
        except EnOSError as error:
            decision = retrying.failed(error, rng)
            if decision.verdict is not Verdict.RETRY:
                return f"Get Command failed: {error}"
            limiter.rejected()
            await anyio.sleep(decision.wait_s or 0.5)
            continue
        limiter.accepted()
        return command.state if command.state is not None else "Get Command showed no state"
    return "stopped"


def _decision(verdict: _Verdict, item: StageState, evidence: Path) -> GateRecord:
    """Pass or fail, with the reasons and the evidence's sha256."""
    targets = max(verdict.targets, 1)
    failed_percent = round(100 * verdict.failed / targets, 3)
    limit = item["max_failed_percent"]
    reasons = []
    if verdict.pending:
        reasons.append(
            f"{len(verdict.pending)} command(s) that a cancel reply of this stage named are "
            "pending again"
        )
    if verdict.collateral:
        reasons.append(
            f"{len(verdict.collateral)} command(s) that the match kept have been cancelled "
            "since (collateral)"
        )
    if failed_percent > limit:
        reasons.append(
            f"{verdict.failed} of {verdict.targets} targets failed ({failed_percent:g} %), "
            f"above max_failed_percent {limit:g}"
        )
    if verdict.unverified:
        reasons.append(
            f"{verdict.unverified} target(s) or kept command(s) could not be checked: the gate "
            "cannot say nothing is pending or cancelled there"
        )
    return {
        "stage": item["stage"],
        "passed": not reasons,
        "targets": verdict.targets,
        "checked": verdict.checked,
        "failed": verdict.failed,
        "failed_percent": failed_percent,
        "max_failed_percent": limit,
        "pending": verdict.pending[:SHOWN],
        "pending_count": len(verdict.pending),
        "collateral": verdict.collateral[:SHOWN],
        "collateral_count": len(verdict.collateral),
        "acknowledged": verdict.acknowledged[:SHOWN],
        "unverified": verdict.unverified,
        "reasons": reasons,
        "evidence": evidence.name,
        "evidence_sha256": hashlib.sha256(evidence.read_bytes()).hexdigest(),
        "finished_at": iso(time.time()),
    }


def acknowledged_collateral(run: RunDir, item: StageState) -> set[str]:
    """The collateral a failed gate reported, from its evidence file when that still hashes
    as its audit record says (else only what the record lists): a resume with --force
    acknowledges it, so the gate checked again does not count it twice."""
    gate = item.get("gate")
    if gate is None:
        return set()
    found = set(gate.get("collateral", [])) | set(gate.get("acknowledged", []))
    evidence = run.path / gate["evidence"]
    try:
        data = evidence.read_bytes()
    except OSError:
        return found
    if hashlib.sha256(data).hexdigest() != gate["evidence_sha256"]:
        return found
    for raw in data.splitlines():
        line = orjson.loads(raw)
        if line.get("state") == p.CommandState.CANCELED and "get" in line:
            found.add(line["get"])
    return found
