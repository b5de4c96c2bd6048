"""``worker validate``: check a job file and print the plan (targets, duplicates, orgs, limits,
calls, the estimated duration); sends nothing."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NotRequired, TextIO, TypedDict

import orjson

from worker.app.prepare import checked_plan, runnable_plan
from worker.app.probe import MAX_QUERY_PROBES, Fit, Probed, fit, probe_budget, query_calls
from worker.app.settings import ca_bundle, resolve_gateway
from worker.app.wiring import RunOptions
from worker.cli.change_facts import StageFacts, WindowFacts, stage_facts, window_facts, write_change
from worker.cli.run import credentials_of, limits_of, run_async, shard_of
from worker.core.batching import planned_calls
from worker.jobs.parse import load_job
from worker.jobs.plan import Plan, run_targets
from worker.jobs.query import describe, expressions
from worker.model import Job, Limits
from worker.redact import printable
from worker.store.layout import RunDir


class Calls(TypedDict):
    """The business calls a job needs: fewest, most, and the estimate."""

    min: int
    max: int
    estimated: int


class Abort(TypedDict):
    """The abort rule as validate shows it."""

    failure_ratio: float | None
    min_finished: int


class QueryFacts(TypedDict):
    """A targets_query as validate says it: in words, and the searches it sends."""

    query: str
    org_id: str
    expressions: list[str]


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
    targets_query: NotRequired[QueryFacts]  # targets from a query: found when a run starts
    probe: NotRequired[ProbeFacts]


class ProbeFacts(TypedDict):
    """What --probe found: the budget the gateway states, and whether the job fits."""

    budget: str | None
    windows: list[str]
    problem: str | None
    fits: bool | None
    said: str | None
    devices_counted: int | None  # a targets_query: the devices its searches count now


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a job file and print the plan; sends nothing (with --probe, a token and one
    read-only call)."""
    job = load_job(Path(args.job))
    if job.query is not None:  # nothing to count before the run resolves it; nothing is sent
        plan_ = checked_plan(job, shard_of(args))
    else:
        plan_ = runnable_plan(job, shard_of(args))
    limits = limits_of(job.limits, args)
    facts = _plan_facts(job, plan_, limits, args.gateway)
    if job.query is not None:
        facts["estimated_s"] = None  # the count is known when the run has resolved it
        facts["targets_query"] = {
            "query": describe(job.query),
            "org_id": job.query.org_id,
            "expressions": expressions(job.query),
        }
    code = 0
    if args.probe:
        calls = None if job.query is not None else facts["calls"]["estimated"]
        probed, verdict = _probe(args, job, plan_, limits, calls)
        facts["probe"] = {
            "budget": probed.budget.describe() if probed.budget else None,
            "windows": [w.describe() for w in probed.budget.windows] if probed.budget else [],
            "problem": probed.problem,
            "fits": verdict.fits if verdict else None,
            "said": verdict.said if verdict else None,
            "devices_counted": sum(probed.counted) if probed.counted else None,
        }
        code = 3 if verdict is None else 0 if verdict.fits else 1
    if args.json:
        sys.stdout.write(orjson.dumps(facts, option=orjson.OPT_INDENT_2).decode() + "\n")
        return code
    _write_plan(sys.stdout, job, facts)
    return code


def _probe(
    args: argparse.Namespace, job: Job, plan_: Plan, limits: Limits, calls: int | None
) -> tuple[Probed, Fit | None]:
    """One token call and one read-only call against the gateway (as `run` would reach it)."""
    credentials = credentials_of(args)
    gateway = resolve_gateway(args.gateway, job, insecure=args.insecure)
    options = RunOptions(
        gateway, credentials, limits, RunDir(Path()), ca_bundle=ca_bundle(args.ca_bundle)
    )
    first = job.query if job.query is not None else next(run_targets(job, plan_))[1]
    probed = run_async(lambda: probe_budget(options, first))
    if probed.problem is not None:
        return probed, None
    query = job.query
    if query is not None and probed.counted and len(expressions(query)) <= MAX_QUERY_PROBES:
        selective = job.match is not None
        per_call = limits.assets_per_call
        calls = query_calls(probed.counted, selective=selective, assets_per_call=per_call)
    return probed, fit(probed, calls)


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
    if "targets_query" in facts:
        _write_query(out, job, facts)
    else:
        _write_targets(out, facts)
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
    if "targets_query" not in facts:
        _write_estimate(out, facts)
    write_change(out, job, facts["window"], facts["stages"])
    if "targets_query" not in facts:
        out.write(f"  targets sha256    {facts['targets_sha256']}\n")
    if "probe" in facts:
        _write_probe(out, facts["probe"])


def _write_probe(out: TextIO, probe: ProbeFacts) -> None:
    """What the gateway said of its budget (--probe), window by window, and the verdict."""
    if probe["problem"] is not None:
        out.write(
            f"  probe             could not probe the gateway: {printable(probe['problem'])}\n"
        )
        return
    windows = probe["windows"] or ["no budget stated in its answer headers"]
    out.write(f"  gateway budget    {windows[0]}\n")
    for window in windows[1:]:
        out.write(f"                    {window}\n")
    if probe["devices_counted"] is not None:
        out.write(f"  query counts      {probe['devices_counted']:,} devices now\n")
    out.write(f"  fits              {'yes' if probe['fits'] else 'NO'}: {probe['said']}\n")


def _write_targets(out: TextIO, facts: PlanFacts) -> None:
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


def _write_query(out: TextIO, job: Job, facts: PlanFacts) -> None:
    """The targets of a query job: what it asks for, in words and as sent; none counted yet."""
    query = facts["targets_query"]
    shard = f"; this process keeps shard {facts['shard']}" if facts["shard"] else ""
    out.write(
        "  targets           from a query (Search Device), found when the run starts: "
        f"{query['query']}{shard}\n"
    )
    for expression in query["expressions"]:
        out.write(f"  search            {expression}\n")
    if job.match is not None:
        cancel = f"the cached commands that match ({job.match.describe()})"
    else:
        cancel = f"command {job.command_id}" if job.command_id else "all cached commands"
    out.write(f"  cancel            {cancel} of each device found\n")
    out.write(
        "  nothing sent      'worker resolve JOB --out FILE' lists the devices it finds "
        "(read-only)\n"
    )


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
