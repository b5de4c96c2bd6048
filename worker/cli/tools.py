"""The commands that need no gateway of their own: ``simulate``, ``demo``, ``report`` and
``audit verify``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.resources
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import NoReturn

import anyio
import orjson
import structlog

from worker.app.prepare import (
    new_manifest,
    new_run_dir,
    new_run_id,
    runnable_plan,
    snapshot_targets,
)
from worker.app.run import SegmentStart, execute
from worker.app.settings import read_secret_file
from worker.app.wiring import RunOptions
from worker.cli.help import SIM_APP_KEY, SIM_APP_SECRET
from worker.cli.run import run_async
from worker.errors import UsageError, shown
from worker.jobs.parse import load_job
from worker.jobs.plan import all_targets
from worker.model import Credentials, JsonObject
from worker.report import auditverify
from worker.report.console import render
from worker.report.details import RunReport, load_run
from worker.report.hints import resume_command
from worker.report.html import Totals, combine, write_report
from worker.report.query import differing_totals
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store.done import Finished
from worker.store.layout import RunDir
from worker.store.lock import holder_of, run_dir_lock
from worker.store.tally import JournalFold

log = structlog.get_logger("worker")


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
        device_page_max=args.device_page_max,
        device_reshuffle_every=args.reshuffle_every,
        device_drift_every=args.drift_every,
        leak_secrets=args.leak_secrets,
    )
    try:
        simulator = Simulator(
            apps={key: secret},
            devices=args.devices,
            commands=args.commands,
            seed=args.seed,
            faults=faults,
            products=args.products,
        )
    except ValueError as exc:  # a --quota that names no window
        raise UsageError(str(exc)) from None
    if args.job:
        seeded = simulator.store.seed_targets(all_targets(load_job(Path(args.job))))
        log.info("worker.simulator_seeded", job=args.job, targets=seeded)
    return simulator


def _check_simulate(args: argparse.Namespace) -> None:
    """Refuse what the simulator would otherwise take silently (port 99999 served elsewhere)."""
    problems = []
    if not 0 <= args.port <= 65535:
        problems.append(f"--port {args.port} is not 0 to 65535 (0 picks a free one)")
    if args.devices < 0 or args.commands < 0:
        problems.append("--devices and --commands must be 0 or more")
    if args.products < 1 or args.device_page_max < 1:
        problems.append("--products and --device-page-max must be 1 or more")
    if args.reshuffle_every < 0 or args.drift_every < 0:
        problems.append("--reshuffle-every and --drift-every must be 0 (off) or more")
    for flag in ("error_rate", "drop_rate", "malformed_rate"):
        share = getattr(args, flag)
        if not 0.0 <= share <= 1.0:
            problems.append(f"--{flag.replace('_', '-')} {share:g} is not a share from 0 to 1")
    if (
        args.latency_ms < 0
        or args.token_ttl < 1
        or (args.rate_cap is not None and args.rate_cap <= 0)
    ):
        problems.append("--latency-ms must be 0 or more, --token-ttl and --rate-cap above 0")
    if problems:
        raise UsageError("; ".join(problems))


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve the gateway simulator until interrupted."""
    _check_simulate(args)
    simulator = _simulator(args)
    ((app_key, secret),) = simulator.apps.items()

    async def serve_until_stopped() -> None:
        # The signals are taken before the URL is said: whoever reads it may stop us at once.
        with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with serve(simulator, args.host, args.port) as url:
                said = _credentials_said(url, app_key, secret)
                sys.stdout.write(f"worker simulate: serving {url}\n{said}")
                sys.stdout.flush()
                async for _ in signals:  # Ctrl-C or SIGTERM: a clean stop, exit 0
                    return

    try:
        with contextlib.suppress(KeyboardInterrupt):
            run_async(serve_until_stopped)
    except OSError as exc:  # the address is taken, or not this machine's
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror}; pick another --port "
            "(0 picks a free one)"
        ) from None
    _leave_at_once()


def _leave_at_once() -> NoReturn:
    """Exit 0 without freeing the simulator's state object by object: after a run over a
    million devices that took longer than a supervisor (or the benches) waits for a stopped
    process, over 10 s. Nothing is left to write: the server is closed, the output flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _credentials_said(url: str, app_key: str, secret: str) -> str:
    """What the simulator accepts, and the line that points a shell at it. The built-in default
    secret is public; a secret the operator gave is never printed."""
    if secret == SIM_APP_SECRET:
        return (
            f"  it accepts ENOS_APP_KEY={app_key} ENOS_APP_SECRET={secret}\n"
            f"  export ENOS_GATEWAY={url} ENOS_APP_KEY={app_key} ENOS_APP_SECRET={secret}\n"
        )
    return (
        f"  it accepts ENOS_APP_KEY={app_key} and the secret you gave (not printed)\n"
        f"  export ENOS_GATEWAY={url} ENOS_APP_KEY={app_key}   # and ENOS_APP_SECRET, yours\n"
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """Start the simulator in process, run jobs/example.yaml against it, show the summary."""
    job_path = _find_example()
    job = load_job(job_path)
    made = runnable_plan(job)
    credentials = Credentials("demo-" + secrets.token_hex(4), secrets.token_hex(16))
    simulator = Simulator(apps={credentials.app_key: credentials.app_secret}, devices=1000, seed=7)
    run_id = new_run_id(job)
    run = new_run_dir(args.out, job, run_id)
    progress = not (args.quiet or args.no_progress)

    async def demo() -> int:
        async with serve(simulator) as url:
            options = RunOptions(url, credentials, job.limits, run, progress=progress)
            manifest = new_manifest(job, made, gateway=url, limits=job.limits, run_id=run_id)
            start = SegmentStart(job, made, manifest, Finished(), JournalFold())
            return await execute(snapshot_targets(start, run), options)

    sys.stdout.write(f"worker demo: running {job_path} against the built-in simulator\n")
    with run_dir_lock(run):
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
    reports = [load_run(RunDir(Path(name))) for name in args.dirs]
    page = args.html or (reports[0].run.report if len(reports) == 1 else Path("report.html"))
    _check_writable(page, "--html" if args.html else "the report")
    if args.json:
        data: JsonObject = {"runs": [r.summary.to_json() for r in reports]}
        if len(reports) > 1:
            data["total"] = dataclasses.asdict(combine([r.summary for r in reports]))
            data["query_totals_differ"] = differing_totals([r.summary for r in reports])
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for report in reports:
            render(report.summary, report.run)
            _print_what_next(report)
        if len(reports) > 1:
            _print_total(combine([r.summary for r in reports]), len(reports))
            differing = differing_totals([r.summary for r in reports])
            if differing is not None:
                sys.stdout.write(f"WARNING: {differing}\n")
    try:
        followups = write_report(reports, page)
    except OSError as exc:
        raise UsageError(
            f"cannot write the report {exc.filename or page}: {exc.strerror}; pass --html FILE "
            "somewhere writable (failed.csv and followup.yaml go beside each run)"
        ) from None
    if not args.json:
        sys.stdout.write(f"HTML report: {page}\n")
        for followup in followups:
            sys.stdout.write(f"Follow-up job for the failed targets: {followup}\n")
    return 0


def _print_what_next(report: RunReport) -> None:
    """A run held by a live worker is running (its numbers still move); one that stopped or
    died is resumable, with the command that does it."""
    holder = holder_of(report.run)
    if holder is not None:
        sys.stdout.write(f"  (this run is running now: {holder}; check again later)\n")
        return
    if report.summary.finished and not report.summary.not_attempted:
        return
    state = "did not finish (it died)" if not report.summary.finished else "stopped early"
    failed = bool(report.summary.outcomes.get("failed"))
    command = resume_command(report.manifest.job, report.run, retry_failed=failed)
    sys.stdout.write(f"  (this run {state}; continue it: {command})\n")


def _print_total(total: Totals, runs: int) -> None:
    outcomes = total.outcomes
    sys.stdout.write(
        f"All {runs} runs: {total.targets:,} targets, {outcomes['cancelled']:,} "
        f"cancelled, {outcomes['nothing_to_cancel']:,} nothing to cancel, "
        f"{outcomes['failed']:,} failed, {total.not_attempted:,} not attempted\n"
    )


def _check_writable(page: Path, flag: str) -> None:
    """An output path: its folder exists and can be written, and it is not a folder itself."""
    if page.is_dir():
        raise UsageError(f"{flag} {page} is a directory; give a file name, e.g. {page}/report.html")
    if not page.parent.is_dir():
        raise UsageError(f"{flag} {page}: the folder {page.parent} does not exist; create it first")
    if not os.access(page.parent, os.W_OK | os.X_OK) or (
        page.exists() and not os.access(page, os.W_OK)
    ):
        raise UsageError(f"cannot write {flag} {page}; pass --html FILE somewhere writable")


def cmd_audit_verify(args: argparse.Namespace) -> int:
    """Check each run directory's audit chain and its agreement with results and summary."""
    if args.head is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", args.head):
        raise UsageError(
            f"--head {shown(args.head)} is not a sha256 (64 hex digits); give the audit head "
            "the run printed"
        )
    worst = 0
    for name in args.dirs:
        try:
            found = auditverify.verify(RunDir(Path(name)), head=args.head)
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
