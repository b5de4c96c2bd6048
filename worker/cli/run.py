"""The commands that talk to a gateway: ``run`` (new, resumed, dry), ``verify`` and ``watch``.

Each builds frozen settings from the command line and the environment (the only place either
is read), prepares through :mod:`worker.app.prepare` and runs through the app layer.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import random
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import TypeVar

import anyio
import structlog

from worker import logs
from worker.app import dryrun
from worker.app.dryrun import dry_run
from worker.app.metrics import MetricsAddress
from worker.app.prepare import (
    check_recorded,
    check_same_run,
    new_run_dir,
    runnable_plan,
    snapshot_targets,
    start_new,
    start_resumed,
)
from worker.app.run import SegmentStart, execute
from worker.app.settings import (
    ca_bundle,
    check_gateway,
    load_credentials,
    merge_limits,
    resolve_gateway,
    watcher_gateway,
)
from worker.app.staged import stage_problem
from worker.app.sweep import verify_run
from worker.app.watch import Watcher, WatchOptions
from worker.app.wiring import RunOptions
from worker.cli.grammar import CONFIRM_ABOVE
from worker.errors import ExitCode, UsageError
from worker.jobs.parse import load_job
from worker.jobs.plan import Plan, run_targets
from worker.jobs.units import parse_shard
from worker.jobs.window import describe, local_text, next_open, utc_text
from worker.model import Credentials, Job, Limits, Shard
from worker.store.layout import RunDir, read_manifest
from worker.store.lock import run_dir_lock

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


def credentials_of(args: argparse.Namespace) -> Credentials:
    """--credentials FILE or the environment; the secret is masked from now on."""
    credentials = load_credentials(args.credentials)
    logs.register_secret(credentials.app_secret)
    return credentials


def cmd_run(args: argparse.Namespace) -> int:
    """Run a job (or continue one with --resume)."""
    _refuse_lone_flags(args)
    job = load_job(Path(args.job))
    shard = shard_of(args)
    credentials = credentials_of(args)
    bundle = ca_bundle(args.ca_bundle)  # every input is checked before anything is created
    metrics = metrics_address(args.metrics_port)
    if args.resume_existing and RunDir(args.out).holds_run():
        args.resume = args.out
    if args.dry_run:
        return _dry_run(args, job, shard, credentials, bundle)
    closed = window_closed(job, no_wait=args.no_wait)
    if closed is not None:
        sys.stderr.write(f"worker: {closed}\n")
        return ExitCode.INTERRUPTED
    options_for = partial(_options, args, credentials=credentials, bundle=bundle, metrics=metrics)
    if args.resume is not None:
        run = RunDir(Path(args.resume))
        read_manifest(run)  # a clear error before the lock for a directory that is no run
        with run_dir_lock(run):
            start = start_resumed(job, run, shard, retry_failed=args.retry_failed, force=args.force)
            begun = bool(start.finished.done)
            problem = stage_problem(job, start.manifest, begun=begun, force=args.force)
            if problem is not None:
                raise UsageError(f"{problem}; nothing was sent")
            gateway = resolve_gateway(
                args.gateway or start.manifest.gateway, job, insecure=args.insecure
            )
            check_recorded(run, start.manifest, gateway=gateway if args.gateway else None)
            limits = limits_of(start.manifest.limits, args)
            _confirm(start.plan.pending_count or 0, gateway, assume_yes=args.yes)
            return _start(args, start, options_for(gateway=gateway, limits=limits, run=run))
    gateway = resolve_gateway(args.gateway, job, insecure=args.insecure)
    limits = limits_of(job.limits, args)
    start = start_new(job, shard, gateway=gateway, limits=limits)
    _confirm(start.plan.total, gateway, assume_yes=args.yes)
    run = new_run_dir(args.out, job, start.manifest.run_id)
    with run_dir_lock(run):
        start = snapshot_targets(start, run)
        return _start(args, start, options_for(gateway=gateway, limits=limits, run=run))


def _options(
    args: argparse.Namespace,
    *,
    gateway: str,
    credentials: Credentials,
    limits: Limits,
    run: RunDir,
    bundle: Path | None,
    metrics: MetricsAddress | None,
) -> RunOptions:
    return RunOptions(
        gateway,
        credentials,
        limits,
        run,
        resume=args.resume is not None,
        ca_bundle=bundle,
        progress=not (args.no_progress or args.quiet),
        metrics=metrics,
        accept_incomplete=args.accept_incomplete,
        confirm=None if args.yes else partial(_confirm_resolved, gateway),
        force=args.force,
    )


def _confirm_resolved(gateway: str, count: int) -> str | None:
    """A targets_query's count, once resolved, confirmed as any run's (None: go on; else why
    not). Searches were sent by then, no cancel: the run stays resumable."""
    try:
        _confirm(count, gateway, assume_yes=False)
    except UsageError as refused:
        return (
            f"{refused} (the query found {count:,} targets; nothing was cancelled; they are kept "
            "in the run directory: resume it with --yes, or confirm, to run them)"
        )
    return None


def _start(args: argparse.Namespace, start: SegmentStart, options: RunOptions) -> int:
    """The segment (and the verify sweep after it, when asked), under the held lock."""
    limits = options.limits
    log.info(
        "worker.run_starting",
        run_dir=str(options.run),
        targets=start.plan.total,
        already_final=len(start.finished.done),
        gateway=options.gateway,
        rate=limits.rate,
        concurrency=limits.concurrency,
    )
    code = run_async(lambda: execute(start, options))
    if args.verify and code in (ExitCode.OK, ExitCode.FAILED):
        code = max(code, run_async(lambda: verify_run(options)))
    return code


def _dry_run(
    args: argparse.Namespace,
    job: Job,
    shard: Shard | None,
    credentials: Credentials,
    bundle: Path | None,
) -> int:
    """Token + optional sampled searches (with a run's gateway and limits, for --resume);
    never a cancel."""
    if job.query is not None:
        raise UsageError(
            f"{job.path} takes its targets from a query, found only when a run starts: list "
            "them with 'worker resolve JOB --out FILE' (read-only), and dry-run a job with "
            "that file as its targets_file"
        )
    made = runnable_plan(job, shard)
    if args.resume is not None:
        run = RunDir(Path(args.resume))
        manifest = read_manifest(run)
        check_same_run(run, manifest, job.sha256, made.targets_sha256, made.shard, force=args.force)
        gateway = resolve_gateway(args.gateway or manifest.gateway, job, insecure=args.insecure)
        limits = limits_of(manifest.limits, args)
    else:
        gateway = resolve_gateway(args.gateway, job, insecure=args.insecure)
        limits = limits_of(job.limits, args)
    options = RunOptions(gateway, credentials, limits, RunDir(Path()), ca_bundle=bundle)
    return _sampled(job, made, options, sample=args.sample)


def _sampled(job: Job, made: Plan, options: RunOptions, *, sample: int) -> int:
    chosen = []
    if sample:
        chosen = dryrun.reservoir(run_targets(job, made), sample, random.Random())
    probes, problem = run_async(lambda: dry_run(options, chosen))
    if problem is not None:
        sys.stderr.write(f"worker: dry run stopped: {problem}\n")
        return ExitCode.ABORTED
    dryrun.render(probes, made.total)
    return 0


def cmd_watch(args: argparse.Namespace) -> int:
    """Run the job files dropped into a spool directory, until SIGINT/SIGTERM. The watcher's
    own gateway (--gateway or ENOS_GATEWAY) is required: every job runs against it."""
    if args.jobs < 1 or args.poll <= 0:
        raise UsageError("--jobs must be 1 or more and --poll above 0")
    gateway = watcher_gateway(args.gateway, insecure=args.insecure)
    credentials = credentials_of(args)
    limits = merge_limits(Limits(), rate=args.rate, concurrency=None, deadline=None)
    options = WatchOptions(
        spool=Path(args.spool),
        credentials=credentials,
        limits=limits,
        gateway=gateway,
        jobs=args.jobs,
        poll_s=args.poll,
        once=args.once,
        ca_bundle=ca_bundle(args.ca_bundle),
        metrics=metrics_address(args.metrics_port),
        quiet_s=max(0.0, args.unchanged_for),
        create=args.create,
    )
    log.info(
        "worker.watching",
        spool=str(options.spool),
        gateway=gateway,
        rate=limits.rate,
        jobs=args.jobs,
    )
    return run_async(Watcher(options).run)


def cmd_verify(args: argparse.Namespace) -> int:
    """Search each finished target of a run: is anything it asked to cancel still pending?"""
    run = RunDir(Path(args.dir))
    if not run.holds_run():
        raise UsageError(f"{run} is not a run directory (it has no run.json)")
    manifest = read_manifest(run)
    credentials = credentials_of(args)
    bundle = ca_bundle(args.ca_bundle)
    gateway = check_gateway(args.gateway or manifest.gateway, insecure=args.insecure)
    limits = merge_limits(
        manifest.limits, rate=args.rate, concurrency=args.concurrency, deadline=None
    )
    with run_dir_lock(run):
        options = RunOptions(
            gateway, credentials, limits, run, ca_bundle=bundle, progress=not args.quiet
        )
        return run_async(lambda: verify_run(options))


def window_closed(job: Job, *, no_wait: bool, now: float | None = None) -> str | None:
    """With --no-wait, when the job's window is closed: when it opens (the run exits 4,
    nothing made or sent). A window that never opens again is bad input (exit 2) either way;
    without --no-wait the run waits for it, showing when it opens."""
    if job.window is None:
        return None
    moment = time.time() if now is None else now
    opens = next_open(job, moment)
    if opens is None:
        raise UsageError(
            f"the job's window ({describe(job.window)}) has ended and does not open again; "
            "change window: in the job file. Nothing was sent"
        )
    if opens <= moment or not no_wait:
        return None
    return (
        f"the job's window ({describe(job.window)}) is closed; it opens "
        f"{local_text(opens, job.window)} ({utc_text(opens)}). Nothing was sent (--no-wait); "
        "run again then, or without --no-wait to wait for it"
    )


def metrics_address(text: str | None) -> MetricsAddress | None:
    """--metrics-port [HOST:]PORT, checked."""
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


def limits_of(base: Limits, args: argparse.Namespace) -> Limits:
    """The job's (or the run's) limits with the command line's overrides."""
    return merge_limits(
        base,
        rate=args.rate,
        concurrency=args.concurrency,
        deadline=args.deadline,
        assets_per_call=getattr(args, "assets_per_call", None),
    )


def shard_of(args: argparse.Namespace) -> Shard | None:
    """--shard K/N, checked."""
    if getattr(args, "shard", None) is None:
        return None
    try:
        return parse_shard(args.shard)
    except ValueError as exc:
        raise UsageError(f"--shard {exc}; give K/N with K from 0 to N-1, e.g. 2/4") from None
