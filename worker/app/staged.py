"""A staged rollout (``stages:``): the run goes stage by stage, each behind a verify gate.

At a new run's start each target gets its stage from the job's sample
(:mod:`worker.jobs.stages`), and the plan (the seed, where each stage's sample ends, this
run's targets in each) goes into run.json, so every resume keeps it. Then, for each stage:
its targets (and any earlier stage's target still pending) run; the settle delay; the gate
(:mod:`worker.app.gate`); on a pass the run goes on, or waits for ``worker ctl promote`` when
the stage says so; on a fail it stops before the next stage (exit 3, resumable), the
evidence in the summary and the report. Each step is a ``stage`` (or ``gate``) audit record
and a state in run.json, written before the run goes on, so a crash in a gate's verify or in
a promotion wait resumes there: a gate interrupted is run again, a promotion is awaited
again, a promotion given is kept.

A run stopped by a failed gate resumes only with ``--force`` (a person looked at the
evidence and, usually, fixed the job): it goes on at the stage it was in (lines already
final stay as they are), whose gate is checked again, with fresh searches and the
thresholds as the job now says; collateral the failed gate already reported counts as
acknowledged.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import cast

from worker.app.conducting import Conduct
from worker.app.gate import acknowledged_collateral, run_gate
from worker.core.ports import StopReason
from worker.jobs.plan import Plan, plan, run_targets
from worker.jobs.stages import Sample, cuts, rank, reaches
from worker.model import Job
from worker.store.appendlog import iso
from worker.store.records import GateEventRecord, StageEventRecord, StagesRecord, StageState
from worker.store.state import Manifest

FINISHED_STATES = ("promoted", "empty")


def plan_stages(job: Job, made: Plan) -> StagesRecord:
    """A new run's stages: the sample's seed (the job's name), where each stage's sample ends
    (from the ranks of the whole job's targets, whatever the shard), and how many of this
    run's targets each stage holds."""
    seed = job.name
    whole = made if made.shard is None else plan(job)  # the whole job: every shard's sample
    upto = reaches(job.stages, whole.total)
    stage_cuts = cuts(upto, (rank(seed, target.key()) for _, target in run_targets(job, whole)))
    sample = Sample(seed, tuple(stage_cuts))
    held = Counter(sample.stage_of(target.key()) for _, target in run_targets(job, made))
    items: list[StageState] = [
        {
            "stage": index + 1,
            "goes_to": stage.describe(),
            "upto": upto[index],
            "cut": format(stage_cuts[index], "x") if stage_cuts[index] >= 0 else "-1",
            "targets": held[index],
            "wait_for_promotion": stage.wait_for_promotion,
            "max_failed_percent": stage.max_failed_percent,
            "state": "pending" if held[index] else "empty",
        }
        for index, stage in enumerate(job.stages)
    ]
    return {"seed": seed, "current": 1, "items": items}


def stage_problem(job: Job, manifest: Manifest, *, begun: bool, force: bool) -> str | None:
    """Why the run in `manifest` cannot go on with `job` as it now is (None: it can): its
    stages changed (a run keeps its sample), or a gate failed and the resume is not forced.
    `begun`: targets of the run are final already (before that, stages may still be added)."""
    record = manifest.stages
    if record is None:
        if job.stages and begun:
            return "the job now has stages: but its run started without; start a new run"
        return None
    written = [stage.describe() for stage in job.stages]
    planned = [item["goes_to"] for item in record.get("items", [])]
    if written != planned:
        return (
            f"the job's stages changed since the run started ({', '.join(planned)} then; "
            f"{', '.join(written) or 'none'} now): a run keeps its sample. Restore them (the "
            "thresholds and wait_for_promotion may change), or start a new run"
        )
    failed = [item for item in record.get("items", []) if item["state"] == "failed"]
    if failed and not force:
        stage = failed[0]
        reasons = "; ".join(stage.get("gate", {}).get("reasons", [])) or "see the report"
        evidence = stage.get("gate", {}).get("evidence", "its gate file")
        return (
            f"stage {stage['stage']}'s gate failed ({reasons}). Look at the evidence (the "
            f"summary, the report, {evidence}), fix the job if need be, and resume with "
            "--force: the run goes on at that stage and checks its gate again"
        )
    return None


class StagedRun:
    """One segment's walk through the stages."""

    def __init__(self, conductor: Conduct) -> None:
        self.conductor = conductor
        manifest, job = conductor.manifest, conductor.job
        if manifest.stages is None and job.stages and not conductor.done:
            manifest.stages = plan_stages(job, conductor.plan)  # nothing final yet: a new run
        self.record: StagesRecord = manifest.stages or {}
        self.items = self.record.get("items", [])
        seed = self.record.get("seed", job.name)
        self.sample = Sample(seed, tuple(int(item["cut"], 16) for item in self.items))
        self.first = True  # the segment's first stage also runs earlier stages' pending ones

    def ready(self) -> bool:
        """Whether the run may go on with the job as it is (else it stops, saying why); the
        thresholds and promotions follow the job file as now written."""
        conductor = self.conductor
        begun, force = bool(conductor.done), conductor.options.force
        problem = stage_problem(conductor.job, conductor.manifest, begun=begun, force=force)
        if problem is not None:
            conductor.engine.stop(StopReason.FATAL, problem)
            return False
        for item, stage in zip(self.items, conductor.job.stages, strict=True):
            item["wait_for_promotion"] = stage.wait_for_promotion
            item["max_failed_percent"] = stage.max_failed_percent
        return conductor.save()

    async def run(self) -> StopReason:
        """Every stage still to do, in order; why the segment ended."""
        engine, last = self.conductor.engine, len(self.items) - 1
        for index, item in enumerate(self.items):
            if item["state"] in FINISHED_STATES or (
                item["state"] == "passed" and not (item["wait_for_promotion"] and index < last)
            ):
                continue
            self.record["current"] = index + 1
            if item["state"] in ("pending", "running") and not await self._send(index, item):
                return engine.stop_reason
            if item["state"] in ("verifying", "failed") and not await self._gate(index, item):
                return engine.stop_reason
            if item["state"] == "passed" and item["wait_for_promotion"] and index < last:
                item["state"] = "waiting for promotion"
                if not (self.conductor.save() and self._event(item, "waiting for promotion")):
                    return engine.stop_reason
            if item["state"] == "waiting for promotion" and not await self._promotion(item):
                return engine.stop_reason
        self.record["current"] = 0
        self.conductor.save()
        return engine.stop_reason

    async def _send(self, index: int, item: StageState) -> bool:
        """The stage's targets (and earlier stages' still pending) through the engine."""
        conductor = self.conductor
        if not await conductor.unpaused():
            return False
        event = "started" if item["state"] == "pending" else "resumed"
        item["state"] = "running"
        if not (conductor.save() and self._event(item, event)):
            return False
        conductor.phase = f"running stage {item['stage']} of {len(self.items)}"
        conductor.say(
            f"stage {item['stage']} of {len(self.items)} {event}: up to {item['goes_to']} "
            f"({item['targets']:,} targets of this run in it)"
        )
        sample, earlier_too = self.sample, self.first
        self.first = False  # later stages of this segment: earlier ones are done by then
        targets = (
            (ordinal, target)
            for ordinal, target in run_targets(conductor.job, conductor.plan, conductor.done)
            if (stage := sample.stage_of(target.key())) == index or (earlier_too and stage < index)
        )
        await conductor.engine.run(targets)
        if conductor.engine.stopping:
            return False
        item["state"] = "verifying"
        return conductor.save()

    async def _gate(self, index: int, item: StageState) -> bool:
        """The stage's gate: a pass lets the run go on; a fail stops it (exit 3)."""
        conductor = self.conductor
        acknowledged: set[str] = set()
        if item["state"] == "failed":  # a resume with --force after a failed gate
            acknowledged = acknowledged_collateral(conductor.run, item)
            item["state"] = "verifying"
            note = f"resumed with --force; {len(acknowledged)} collateral acknowledged"
            if not (conductor.save() and self._event(item, "gate failed, resumed", note)):
                return False
        gate = await run_gate(conductor, index, item, self.sample, acknowledged)
        if gate is None:
            return False  # stopped meanwhile: the gate runs again on resume
        record = cast("GateEventRecord", {"type": "gate", "at": iso(time.time()), **gate})
        if not conductor.record(record):
            return False
        item["gate"] = gate
        item["state"] = "passed" if gate["passed"] else "failed"
        if not conductor.save():
            return False
        if gate["passed"]:
            conductor.say(f"stage {item['stage']}'s gate passed ({gate['checked']:,} searched)")
            return True
        message = (
            f"stage {item['stage']}'s gate failed: {'; '.join(gate['reasons'])}. Evidence: "
            f"{gate['evidence']} and the summary; fix the job if need be and resume with "
            "--force (the run goes on at this stage and checks its gate again)"
        )
        conductor.say(message)
        conductor.engine.stop(StopReason.ABORTED, message)
        return False

    async def _promotion(self, item: StageState) -> bool:
        """Wait for worker ctl promote (it sets the state and saves run.json itself)."""
        conductor = self.conductor
        conductor.say(
            f"stage {item['stage']} passed its gate and waits for promotion: "
            f"worker ctl {conductor.run} promote"
        )
        phase = f"waiting for promotion of stage {item['stage']}"
        if not await conductor.hold_until(lambda: item["state"] == "promoted", phase):
            return False
        return self._event(item, "promoted")

    def _event(self, item: StageState, event: str, note: str | None = None) -> bool:
        """A stage audit record (False: it could not be written, and the run stops)."""
        record: StageEventRecord = {
            "type": "stage",
            "at": iso(time.time()),
            "stage": item["stage"],
            "of": len(self.items),
            "event": event,
            "targets": item["targets"],
        }
        if note is not None:
            record["note"] = note
        return self.conductor.record(record)

    # -- for worker ctl and the status file ---------------------------------------------------

    def waiting(self) -> int | None:
        """The stage waiting for a promotion, if one is."""
        for item in self.items:
            if item["state"] == "waiting for promotion":
                return item["stage"]
        return None

    def promote(self, stage: int, who: str) -> None:
        """Promote the waiting stage: in run.json before the request is recorded as done."""
        item = self.items[stage - 1]
        item["state"] = "promoted"
        self.conductor.save()
        self.conductor.say(f"stage {stage} promoted by {who}")

    def where(self) -> str:
        """The stage the run is in, in words."""
        current = self.record.get("current", 0)
        if not current:
            return "every stage is done"
        return f"stage {current} of {len(self.items)} is {self.items[current - 1]['state']}"

    def status(self) -> dict[str, object]:
        """The current stage for the status file."""
        current = self.record.get("current", 0)
        if not current:
            return {"current": 0, "of": len(self.items), "state": "done"}
        item = self.items[current - 1]
        gate = item.get("gate")
        return {
            "current": current,
            "of": len(self.items),
            "state": item["state"],
            "goes_to": item["goes_to"],
            "targets": item["targets"],
            "gate": None
            if gate is None
            else {"passed": gate["passed"], "reasons": gate["reasons"]},
        }
