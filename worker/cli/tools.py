"""The commands that need no gateway of their own: ``simulate``, ``demo``, ``report`` and
``audit verify``."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.resources
import os
import secrets
import sys
from pathlib import Path

import anyio
import orjson
import structlog

from worker.app.prepare import checked_plan, new_manifest, new_run_dir
from worker.app.run import SegmentStart, execute
from worker.app.settings import read_secret_file
from worker.app.wiring import RunOptions
from worker.cli.grammar import SIM_APP_KEY, SIM_APP_SECRET
from worker.cli.run import run_async
from worker.errors import UsageError
from worker.jobs.parse import load_job
from worker.jobs.plan import all_targets
from worker.model import Credentials, JsonObject
from worker.report import auditverify
from worker.report.console import render
from worker.report.details import RunReport, load_run
from worker.report.hints import resume_command
from worker.report.html import Totals, combine, write_report
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store.done import Finished
from worker.store.layout import RunDir
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
    )
    simulator = Simulator(
        apps={key: secret},
        devices=args.devices,
        commands=args.commands,
        seed=args.seed,
        faults=faults,
    )
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
    made = checked_plan(job)
    credentials = Credentials("demo-" + secrets.token_hex(4), secrets.token_hex(16))
    simulator = Simulator(apps={credentials.app_key: credentials.app_secret}, devices=1000, seed=7)
    run = new_run_dir(args.out, job)

    async def demo() -> int:
        async with serve(simulator) as url:
            options = RunOptions(url, credentials, job.limits, run, progress=not args.quiet)
            manifest = new_manifest(job, made, gateway=url, limits=job.limits)
            start = SegmentStart(job, made, manifest, Finished(), JournalFold())
            return await execute(start, options)

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
    reports = [load_run(RunDir(Path(name))) for name in args.dirs]
    page = args.html or (reports[0].run.report if len(reports) == 1 else Path("report.html"))
    _check_writable(page, "--html")
    if args.json:
        data: JsonObject = {"runs": [r.summary.to_json() for r in reports]}
        if len(reports) > 1:
            data["total"] = dataclasses.asdict(combine([r.summary for r in reports]))
        sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        for report in reports:
            render(report.summary, report.run)
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
