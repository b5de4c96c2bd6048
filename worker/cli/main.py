"""The command line: parse, build frozen settings, hand them down, map the outcome to an exit code.

The composition root: it is the only module that reads the environment or prints for people.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.resources
import importlib.util
import logging
import os
import random
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, TextIO, TypeVar

import anyio
import orjson
import structlog

from worker import logs
from worker.app import dryrun
from worker.app.metrics import MetricsAddress
from worker.app.run import RunOptions, dry_run, execute, new_manifest, verify_run
from worker.app.settings import (
    ca_bundle,
    check_gateway,
    load_credentials,
    merge_limits,
    new_run_dir,
    read_secret_file,
    resolve_gateway,
)
from worker.app.watch import Watcher, WatchOptions
from worker.cli.grammar import CONFIRM_ABOVE, SIM_APP_KEY, SIM_APP_SECRET, build_parser
from worker.core.batching import planned_calls
from worker.errors import UsageError
from worker.jobs.jobfile import Plan, all_targets, load_job, plan, run_targets
from worker.jobs.units import parse_shard
from worker.model import Credentials, Job, Limits, Shard
from worker.report import auditverify
from worker.report.details import RunReport, RunTally, load_run, read_for_resume
from worker.report.html import Totals, combine, write_report
from worker.report.summary import render
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store.rundir import Finished, read_manifest, run_dir_lock
from worker.store.state import ExitCode, Manifest

log = structlog.get_logger("worker")
T = TypeVar("T")


def run_async(function: Callable[[], Awaitable[T]]) -> T:
    """Run on asyncio, with uvloop when it is installed (measured: -27 % CPU per request)."""
    use_uvloop = importlib.util.find_spec("uvloop") is not None
    # The job, the plan and the imports are long-lived: move them out of the collector's way,
    # and collect young objects less often (each request allocates a few hundred of them).
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 50, 100)
    return anyio.run(function, backend="asyncio", backend_options={"use_uvloop": use_uvloop})


# -- worker run ----------------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job (or continue one with --resume)."""
    _refuse_lone_flags(args)
    job = load_job(Path(args.job))
    shard = _shard(args)
    credentials = load_credentials(args.credentials)
    logs.register_secret(credentials.app_secret)
    bundle = ca_bundle(args.ca_bundle)  # every input is checked before anything is created
    metrics = _metrics_address(args.metrics_port)
    if args.resume_existing and (args.out / "run.json").exists():
        args.resume = args.out
    if args.resume is not None and not args.dry_run:
        return _resume_run(args, job, shard=shard, credentials=credentials, bundle=bundle,
                           metrics=metrics)  # fmt: skip
    plan_ = _runnable_plan(job, shard)
    if args.resume is not None:  # a dry run of a run's gateway and limits
        _, _, limits, gateway = _resume(args, job, plan_)
    else:
        gateway = resolve_gateway(args.gateway, job, insecure=args.insecure)
        limits = _limits(job.limits, args)
    if args.dry_run:
        options = RunOptions(gateway, credentials, limits, Path(), ca_bundle=bundle)
        return _dry_run(job, plan_, options, sample=args.sample)
    _confirm(plan_.total, gateway, assume_yes=args.yes)
    run_dir = new_run_dir(args.out, job)
    with run_dir_lock(run_dir):
        options = RunOptions(gateway, credentials, limits, run_dir, ca_bundle=bundle,
                             progress=not (args.no_progress or args.quiet),
                             metrics=metrics)  # fmt: skip
        manifest = new_manifest(job, plan_, options)
        return _start(args, job, plan_, options, manifest=manifest, finished=Finished())


def _runnable_plan(job: Job, shard: Shard | None, done: set[int] | None = None) -> Plan:
    plan_ = _plan_with_warnings(job, shard, done)
    if plan_.total == 0:
        raise UsageError(f"{job.path} lists no targets{_in_shard(plan_)}; nothing to do")
    return plan_


def _resume_run(
    args: argparse.Namespace,
    job: Job,
    *,
    shard: Shard | None,
    credentials: Credentials,
    bundle: Path | None,
    metrics: MetricsAddress | None,
) -> int:
    """--resume DIR: under the directory's lock, what is final first, then the plan, which
    marks what is still pending (a finished run's resume reads its targets file once)."""
    run_dir = Path(args.resume)
    read_manifest(run_dir)  # a clear error before the lock for a directory that is no run
    with run_dir_lock(run_dir):
        counted, finished = read_for_resume(run_dir, retry_failed=args.retry_failed)
        plan_ = _runnable_plan(job, shard, finished.done)
        run_dir, manifest, limits, gateway = _resume(args, job, plan_)
        _confirm(plan_.pending_count or 0, gateway, assume_yes=args.yes)
        options = RunOptions(gateway, credentials, limits, run_dir, resume=True,
                             ca_bundle=bundle, progress=not (args.no_progress or args.quiet),
                             metrics=metrics)  # fmt: skip
        return _start(args, job, plan_, options, manifest=manifest, finished=finished,
                      counted=counted)  # fmt: skip


def _start(
    args: argparse.Namespace,
    job: Job,
    plan_: Plan,
    options: RunOptions,
    *,
    manifest: Manifest,
    finished: Finished,
    counted: RunTally | None = None,
) -> int:
    """The segment (and the verify sweep after it, when asked), under the held lock."""
    limits = options.limits
    log.info(
        "worker.run_starting",
        run_dir=str(options.run_dir),
        targets=plan_.total,
        already_final=len(finished.done),
        gateway=options.gateway,
        rate=limits.rate,
        concurrency=limits.concurrency,
    )
    code = run_async(lambda: execute(job, plan_, options, manifest=manifest, finished=finished,
                                     counted=counted))  # fmt: skip
    if args.verify and code in (ExitCode.OK, ExitCode.FAILED):
        code = max(code, run_async(lambda: verify_run(options)))
    return code


def cmd_watch(args: argparse.Namespace) -> int:
    """Run the job files dropped into a spool directory, until SIGINT/SIGTERM."""
    if args.jobs < 1 or args.poll <= 0:
        raise UsageError("--jobs must be 1 or more and --poll above 0")
    credentials = load_credentials(args.credentials)
    logs.register_secret(credentials.app_secret)
    limits = merge_limits(Limits(), rate=args.rate, concurrency=None, deadline=None)
    gateway = check_gateway(args.gateway, insecure=args.insecure) if args.gateway else None
    options = WatchOptions(
        spool=Path(args.spool), credentials=credentials, limits=limits, gateway=gateway,
        insecure=args.insecure, jobs=args.jobs, poll_s=args.poll, once=args.once,
        ca_bundle=ca_bundle(args.ca_bundle), metrics=_metrics_address(args.metrics_port),
        quiet_s=max(0.0, args.unchanged_for),
    )  # fmt: skip
    log.info("worker.watching", spool=str(options.spool), rate=limits.rate, jobs=args.jobs)
    return run_async(Watcher(options).run)


def cmd_verify(args: argparse.Namespace) -> int:
    """Search each finished target of a run: is anything it asked to cancel still pending?"""
    run_dir = Path(args.dir)
    if not (run_dir / "run.json").exists():
        raise UsageError(f"{run_dir} is not a run directory (it has no run.json)")
    manifest = read_manifest(run_dir)
    credentials = load_credentials(args.credentials)
    logs.register_secret(credentials.app_secret)
    bundle = ca_bundle(args.ca_bundle)
    gateway = check_gateway(args.gateway or manifest.gateway, insecure=args.insecure)
    limits = merge_limits(manifest.limits, rate=args.rate, concurrency=args.concurrency,
                          deadline=None)  # fmt: skip
    with run_dir_lock(run_dir):
        options = RunOptions(gateway, credentials, limits, run_dir, ca_bundle=bundle,
                             progress=not args.quiet)  # fmt: skip
        return run_async(lambda: verify_run(options))


def _metrics_address(text: str | None) -> MetricsAddress | None:
    if text is None:
        return None
    try:
        return MetricsAddress.parse(text)
    except ValueError as exc:
        raise UsageError(f"--metrics-port {exc}") from None


def _refuse_lone_flags(args: argparse.Namespace) -> None:
    """Flags that only mean something beside another are refused alone, not ignored: a lone
    --sample would otherwise run a real cancel of every target."""
    for flag, value, needs, present in (
        ("--sample", args.sample, "--dry-run", args.dry_run),
        ("--retry-failed", args.retry_failed, "--resume DIR", args.resume is not None),
        ("--force", args.force, "--resume DIR", args.resume is not None),
        ("--resume-existing", args.resume_existing, "--out DIR", args.out is not None),
    ):
        if value and not present:
            raise UsageError(f"{flag} only works with {needs}; add {needs}, or drop {flag}")


def _confirm(pending: int, gateway: str, *, assume_yes: bool) -> None:
    """Above CONFIRM_ABOVE targets, an operator types the count; a script passes --yes."""
    if pending <= CONFIRM_ABOVE or assume_yes:
        return
    if not sys.stdin.isatty():
        raise UsageError(
            f"this run would cancel commands on {pending:,} targets; without a terminal to "
            "confirm on, pass --yes (scheduled batches) or run it interactively"
        )
    sys.stderr.write(
        f"About to cancel cached commands on {pending:,} targets via {gateway}.\n"
        f"Type the number of targets ({pending}) to go on: "
    )
    sys.stderr.flush()
    answer = sys.stdin.readline().strip().replace(",", "").replace("_", "")
    if answer != str(pending):
        raise UsageError("not confirmed; nothing was sent")


def _dry_run(job: Job, plan_: Plan, options: RunOptions, *, sample: int) -> int:
    """Token + optional sampled searches; never a cancel."""
    chosen = dryrun.reservoir(run_targets(job, plan_), sample, random.Random()) if sample else []
    probes, problem = run_async(lambda: dry_run(options, chosen))
    if problem is not None:
        sys.stderr.write(f"worker: dry run stopped: {problem}\n")
        return ExitCode.ABORTED
    dryrun.render(probes, plan_.total)
    return 0


def _limits(base: Limits, args: argparse.Namespace) -> Limits:
    return merge_limits(
        base,
        rate=args.rate,
        concurrency=args.concurrency,
        deadline=args.deadline,
        assets_per_call=getattr(args, "assets_per_call", None),
    )


def _resume(args: argparse.Namespace, job: Job, plan_: Plan) -> tuple[Path, Manifest, Limits, str]:
    run_dir = Path(args.resume)
    manifest = read_manifest(run_dir)
    for field_name, then, now in manifest.changes(job.sha256, plan_.targets_sha256):
        if not args.force:
            raise UsageError(
                f"the {field_name} changed since this run started (sha256 {then[:12]}... then, "
                f"{now[:12]}... now); resuming would mix two different runs. Start a new run, or "
                "pass --force to resume anyway"
            )
    asked = str(plan_.shard) if plan_.shard is not None else None
    if asked != manifest.shard:
        covers = f"shard {manifest.shard}" if manifest.shard else "every target (no shard)"
        fix = f"pass --shard {manifest.shard}" if manifest.shard else "drop --shard"
        raise UsageError(f"the run in {run_dir} covers {covers}; {fix} to resume it")
    gateway = resolve_gateway(args.gateway or manifest.gateway, job, insecure=args.insecure)
    manifest.targets = plan_.total
    return run_dir, manifest, _limits(manifest.limits, args), gateway


def _shard(args: argparse.Namespace) -> Shard | None:
    if getattr(args, "shard", None) is None:
        return None
    try:
        return parse_shard(args.shard)
    except ValueError as exc:
        raise UsageError(f"--shard {exc}; give K/N with K from 0 to N-1, e.g. 2/4") from None


def _in_shard(plan_: Plan) -> str:
    return f" in shard {plan_.shard}" if plan_.shard is not None else ""


def _plan_with_warnings(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
    plan_ = plan(job, shard, done)
    for note in plan_.duplicate_notes[:20]:
        log.warning("worker.duplicate_target", note=note)
    if len(plan_.duplicate_notes) > 20:
        log.warning("worker.more_duplicates", count=len(plan_.duplicate_notes) - 20)
    return plan_


# -- worker validate -----------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    """Check a job file and print the plan; sends nothing."""
    job = load_job(Path(args.job))
    plan_ = _plan_with_warnings(job, _shard(args))
    facts = _plan_facts(job, plan_, _limits(job.limits, args), args.gateway)
    if args.json:
        sys.stdout.write(orjson.dumps(facts, option=orjson.OPT_INDENT_2).decode() + "\n")
        return 0
    _write_plan(sys.stdout, job, facts)
    return 0


def _plan_facts(job: Job, plan_: Plan, limits: Limits, gateway: str | None) -> dict[str, Any]:
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
    }


def _write_plan(out: TextIO, job: Job, facts: dict[str, Any]) -> None:
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
    out.write(f"  targets sha256    {facts['targets_sha256']}\n")


def _write_estimate(out: TextIO, facts: dict[str, Any]) -> None:
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


def _rate_text(facts: dict[str, Any]) -> str:
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


# -- worker simulate / demo / report -------------------------------------------------------


def _simulator(args: argparse.Namespace) -> Simulator:
    key = args.app_key or os.environ.get("ENOS_APP_KEY") or SIM_APP_KEY
    secret = (
        read_secret_file(args.app_secret_file)
        if args.app_secret_file
        else os.environ.get("ENOS_APP_SECRET") or SIM_APP_SECRET
    )
    faults = Faults(
        latency_ms=args.latency_ms,
        error_rate=args.error_rate,
        rate_cap=args.rate_cap,
        drop_rate=args.drop_rate,
        malformed_rate=args.malformed_rate,
        token_ttl_s=args.token_ttl,
        denied_orgs=frozenset(args.deny_org or ()),
        expired_token_answer=args.expired_token_answer,
        require_command_id=args.require_command_id,
        legacy_wire=args.legacy_wire,
        multi_asset=args.multi_asset,
        max_assets=args.max_assets,
        quota=args.quota,
        quota_headers=args.quota_headers,
        quota_retry_after=args.quota_retry_after,
        late_504_rate=args.late_504_rate,
        search_lag_s=args.search_lag,
        refresh_revokes=args.refresh_revokes,
    )
    try:
        simulator = Simulator(
            apps={key: secret},
            devices=args.devices,
            commands=args.commands,
            seed=args.seed,
            faults=faults,
        )
    except ValueError as exc:  # a --quota that names no window
        raise UsageError(str(exc)) from None
    if args.job:
        seeded = simulator.store.seed_targets(all_targets(load_job(Path(args.job))))
        log.info("worker.simulator_seeded", job=args.job, targets=seeded)
    return simulator


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve the gateway simulator until interrupted."""
    simulator = _simulator(args)

    async def serve_forever() -> None:
        async with serve(simulator, args.host, args.port) as url:
            sys.stdout.write(f"worker simulate: serving {url}\n")
            sys.stdout.flush()
            await anyio.sleep_forever()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve_forever)
    except OSError as exc:  # the address is taken, or not this machine's
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror}; pick another --port "
            "(0 picks a free one)"
        ) from None
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the simulator in process, run jobs/example.yaml against it, show the summary."""
    job_path = _find_example()
    job = load_job(job_path)
    plan_ = _plan_with_warnings(job)
    credentials = Credentials("demo-" + secrets.token_hex(4), secrets.token_hex(16))
    simulator = Simulator(apps={credentials.app_key: credentials.app_secret}, devices=1000, seed=7)
    run_dir = new_run_dir(args.out, job)

    async def demo() -> int:
        async with serve(simulator) as url:
            options = RunOptions(url, credentials, job.limits, run_dir, progress=not args.quiet)
            manifest = new_manifest(job, plan_, options)
            return await execute(job, plan_, options, manifest=manifest, finished=Finished())

    sys.stdout.write(f"worker demo: running {job_path} against the built-in simulator\n")
    return run_async(demo)


def _find_example() -> Path:
    """The example job shipped inside the package (so `worker demo` works from any install)."""
    example = Path(str(importlib.resources.files("worker") / "examples" / "example.yaml"))
    if not example.is_file():
        raise UsageError(f"the example job is missing from this install ({example}); reinstall")
    return example


def cmd_report(args: argparse.Namespace) -> int:
    """Print the summary of each run directory (recomputed from its journal), a total when
    there are several, and write the HTML report (with failed.csv and followup.yaml)."""
    reports = [load_run(Path(name)) for name in args.dirs]
    page = args.html or (
        reports[0].run_dir / "report.html" if len(reports) == 1 else Path("report.html")
    )
    _check_writable(page, "--html")
    if args.json:
        data: dict[str, Any] = {"runs": [r.summary.to_json() for r in reports]}
        if len(reports) > 1:
            data["total"] = dataclasses.asdict(combine([r.summary for r in reports]))
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for report in reports:
            render(report.summary, report.run_dir)
            if not report.summary.finished or report.summary.not_attempted:
                _print_resume(report)
        if len(reports) > 1:
            _print_total(combine([r.summary for r in reports]), len(reports))
    followups = write_report(reports, page)
    if not args.json:
        sys.stdout.write(f"HTML report: {page}\n")
        for followup in followups:
            sys.stdout.write(f"Follow-up job for the failed targets: {followup}\n")
    return 0


def _print_resume(report: RunReport) -> None:
    state = "did not finish (it died)" if not report.summary.finished else "stopped early"
    flag = " --retry-failed" if report.summary.outcomes.get("failed") else ""
    sys.stdout.write(
        f"  (this run {state}; continue it: worker run {report.manifest.job} "
        f"--resume {report.run_dir}{flag})\n"
    )


def _print_total(total: Totals, runs: int) -> None:
    outcomes = total.outcomes
    sys.stdout.write(
        f"All {runs} runs: {total.targets:,} targets, {outcomes['cancelled']:,} "
        f"cancelled, {outcomes['nothing_to_cancel']:,} nothing to cancel, "
        f"{outcomes['failed']:,} failed, {total.not_attempted:,} not attempted\n"
    )


def _check_writable(page: Path, flag: str) -> None:
    """An output path an operator gave: its folder exists, and it is not a folder itself."""
    if page.is_dir():
        raise UsageError(f"{flag} {page} is a directory; give a file name, e.g. {page}/report.html")
    if not page.parent.is_dir():
        raise UsageError(f"{flag} {page}: the folder {page.parent} does not exist; create it first")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check each run directory's audit chain and its agreement with results and summary."""
    worst = 0
    for name in args.dirs:
        try:
            found = auditverify.verify(Path(name), head=args.head)
        except auditverify.AuditBroken as exc:
            sys.stdout.write(f"FAILED  {exc}\n")
            worst = 1
            continue
        sys.stdout.write(
            f"OK      {name}: {found.records:,} audit records in {found.segments} segment(s), "
            f"chain intact; {found.results:,} results, each with its attempts "
            f"({found.attempts:,}); summary agrees\n        audit head {found.head}\n"
        )
        for note in found.notes:
            sys.stdout.write(f"        note: {note}\n")
    return worst


# -- the parser ----------------------------------------------------------------------------


HANDLERS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "report": cmd_report,
    "audit verify": cmd_audit_verify,
    "verify": cmd_verify,
    "watch": cmd_watch,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `worker` console script."""
    args = build_parser(HANDLERS).parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logs.configure(json=True if args.log_json else None, level=level)
    try:
        return int(args.handler(args))
    except UsageError as exc:
        sys.stderr.write(f"worker: error: {exc}\n")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        sys.stderr.write("worker: interrupted before the run started; nothing was sent\n")
        return 4
