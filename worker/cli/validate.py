"""``worker validate``: check a job file and print the plan (targets, duplicates, orgs, limits,
calls, the estimated duration); sends nothing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO, TypedDict

import orjson

from worker.app.prepare import runnable_plan
from worker.cli.change_facts import StageFacts, WindowFacts, stage_facts, window_facts, write_change
from worker.cli.run import limits_of, shard_of
from worker.core.batching import planned_calls
from worker.jobs.parse import load_job
from worker.jobs.plan import Plan, run_targets
from worker.model import Job, Limits


class Calls(TypedDict):
    """The business calls a job needs: fewest, most, and the estimate."""

    min: int
    max: int
    estimated: int


class Abort(TypedDict):
    """The abort rule as validate shows it."""

    failure_ratio: float | None
    min_finished: int


class PlanFacts(TypedDict):
    """What validate says of a job, as data (printed as text, or as JSON with --json)."""

    job: str
    path: str
    targets: int
    shard: str | None
    duplicates_dropped: int
    cancel_all: int
    one_command: int
    selective: int
    match: str | None
    calls: Calls
    assets_per_call: int
    orgs: dict[str, int]
    more_orgs: int
    gateway: str | None
    rate: float | str | None
    rate_floor: float | None
    rate_max: float | None
    concurrency: int
    attempts: int
    timeout_s: float
    deadline_s: float | None
    abort: Abort
    estimated_s: float | None
    targets_sha256: str
    window: WindowFacts | None  # the job's window: the next opening, openings needed
    stages: list[StageFacts]  # a staged rollout: each stage's targets and gate


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a job file and print the plan; sends nothing."""
    job = load_job(Path(args.job))
    plan_ = runnable_plan(job, shard_of(args))
    facts = _plan_facts(job, plan_, limits_of(job.limits, args), args.gateway)
    if args.json:
        sys.stdout.write(orjson.dumps(facts, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    _write_plan(sys.stdout, job, facts)
    return 0


def _plan_facts(job: Job, plan_: Plan, limits: Limits, gateway: str | None) -> PlanFacts:
    """What validate says, as data (printed as text or as JSON)."""
    selective = (
        plan_.total
        if job.match is not None
        else sum(t.match is not None for t in job.inline_targets)
    )
    rate = "auto" if limits.adaptive else limits.rate  # None: unlimited
    per_call = limits.assets_per_call
    cancels = (
        planned_calls((t for _, t in run_targets(job, plan_)), per_call)
        if per_call > 1
        else plan_.total
    )
    calls = cancels + selective  # one match a selective target
    estimate = calls / limits.rate if limits.rate and not limits.adaptive else None
    return {
        "job": job.name,
        "path": str(job.path),
        "targets": plan_.total,
        "shard": str(plan_.shard) if plan_.shard is not None else None,
        "duplicates_dropped": plan_.listed - plan_.total,
        "cancel_all": plan_.cancel_all - selective,
        "one_command": plan_.total - plan_.cancel_all,
        "selective": selective,
        "match": job.match.describe() if job.match is not None else None,
        "calls": {
            "min": cancels,
            "max": plan_.total + 50 * selective,
            "estimated": calls,
        },
        "assets_per_call": per_call,
        "orgs": dict(plan_.orgs.most_common(5)),
        "more_orgs": max(0, len(plan_.orgs) - 5),
        "gateway": gateway or os.environ.get("ENOS_GATEWAY") or job.gateway,
        "rate": rate,
        "rate_floor": limits.rate_floor if limits.adaptive else None,
        "rate_max": limits.rate_max if limits.adaptive else None,
        "concurrency": limits.concurrency,
        "attempts": limits.attempts,
        "timeout_s": limits.timeout,
        "deadline_s": limits.deadline,
        "abort": {"failure_ratio": job.abort.failure_ratio, "min_finished": job.abort.min_finished},
        "estimated_s": estimate,
        "targets_sha256": plan_.targets_sha256,
        "window": window_facts(job, estimate),
        "stages": stage_facts(job, plan_),
    }


def _write_plan(out: TextIO, job: Job, facts: PlanFacts) -> None:
    out.write(f"Job {job.name} ({job.path}) is valid.\n")
    out.write(
        f"  targets           {_count(facts['targets'], 'target')} "
        f"({_count(facts['duplicates_dropped'], 'duplicate')} dropped)"
        f"{' in shard ' + facts['shard'] if facts['shard'] else ''}\n"
    )
    out.write(
        f"  cancel            all cached on {_count(facts['cancel_all'], 'device')}; one "
        f"command on {facts['one_command']:,}; selective (match) on "
        f"{facts['selective']:,}\n"
    )
    orgs = ", ".join(f"{org} ({n:,})" for org, n in facts["orgs"].items())
    more = f" and {facts['more_orgs']:,} more" if facts["more_orgs"] else ""
    out.write(f"  orgs              {orgs}{more}\n")
    out.write(f"  gateway           {facts['gateway'] or '(not set)'}\n")
    out.write(
        f"  limits            rate {_rate_text(facts)}, concurrency {facts['concurrency']}, "
        f"attempts {facts['attempts']}, timeout {facts['timeout_s']:g} s\n"
    )
    deadline = facts["deadline_s"]
    out.write(f"  deadline          {_duration(deadline) if deadline else 'none'}\n")
    abort = facts["abort"]
    rule = (
        f"stop when {abort['failure_ratio']:.0%} of the finished targets failed (after "
        f"{abort['min_finished']:,})"
        if abort["failure_ratio"]
        else "none (rejected credentials, 99403 and an outage always stop the run)"
    )
    out.write(f"  abort rule        {rule}\n")
    if facts["selective"]:
        out.write(f"  match             {facts['match'] or 'per target (inline)'}\n")
        out.write(
            f"  calls             per selective target 1 search (at most 50 cached commands: "
            f"one page) + 1 cancel per match: {facts['calls']['min']:,} to "
            f"{facts['calls']['max']:,}\n"
        )
    if facts["assets_per_call"] > 1:
        out.write(
            f"  assets per call   up to {facts['assets_per_call']} (assetId=a1,a2,...; opt-in, "
            f"verified on the gateway first): {facts['calls']['min']:,} cancel calls for "
            f"{facts['targets']:,} targets if the gateway accepts lists, "
            f"{facts['targets']:,} if not\n"
        )
    _write_estimate(out, facts)
    write_change(out, job, facts["window"], facts["stages"])
    out.write(f"  targets sha256    {facts['targets_sha256']}\n")


def _write_estimate(out: TextIO, facts: PlanFacts) -> None:
    estimate = facts["estimated_s"]
    if estimate is None:
        why = "rate: auto finds the gateway's limit" if facts["rate"] == "auto" else "no rate limit"
        out.write(f"  estimated time    unknown ({why})\n")
        return
    basis = "one match a selective target, no retries" if facts["selective"] else "no retries"
    out.write(f"  estimated time    {_duration(estimate)} at {facts['rate']:g}/s ({basis})\n")
    deadline = facts["deadline_s"]
    if deadline and estimate > deadline:
        out.write(
            f"  WARNING           the deadline ({_duration(deadline)}) comes before the "
            "estimated end: the run will stop early, resumable\n"
        )


def _rate_text(facts: PlanFacts) -> str:
    if facts["rate"] == "auto":
        upper = f" up to {facts['rate_max']:g}/s" if facts["rate_max"] else ""
        return f"auto (from {facts['rate_floor']:g}/s{upper})"
    return "unlimited" if facts["rate"] is None else f"{facts['rate']:g}/s"


def _count(number: int, noun: str) -> str:
    """'1 target', '2 targets'."""
    return f"{number:,} {noun}{'' if number == 1 else 's'}"


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"
