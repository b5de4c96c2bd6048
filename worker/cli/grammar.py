"""The command line's grammar: every command, argument, default, example and exit code.

Kept apart from `cli` (which carries the commands out) so that the whole interface reads in
one place. Global flags (``--log-json``, ``--quiet``) are accepted before or after the
subcommand.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from worker import __version__
from worker.cli.flags import accept_incomplete_flag, connection_flags, limit_flags
from worker.cli.help import (
    AUDIT_EXIT_CODES,
    CTL_EXIT_CODES,
    EXAMPLES,
    EXIT_CODES,
    REPORT_EXIT_CODES,
    RESOLVE_EXIT_CODES,
    SIMULATE_EXIT_CODES,
    SWEEP_EXIT_CODES,
    VALIDATE_EXIT_CODES,
    WATCH_EXIT_CODES,
)
from worker.cli.simulate_flags import simulate_flags

Handler = Callable[[argparse.Namespace], int]
CONFIRM_ABOVE = 1000


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Epilogs as written; every option's help ends with its default, when it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" not in text
            and action.option_strings
            and default not in (None, False, argparse.SUPPRESS)
        ):
            text += " (default: %(default)s)"
        return text


def _global_flags(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Flags accepted before and after the subcommand (SUPPRESS: a later one does not reset
    an earlier one)."""
    default: Any = False if top else argparse.SUPPRESS
    parser.add_argument(
        "--log-json",
        action="store_true",
        default=default,
        help="log JSON lines, also on a terminal",
    )
    parser.add_argument(
        "--quiet",
        action="store_true",
        default=default,
        help="no progress line and only warnings and errors in the log",
    )


def _command(
    commands: Any,
    name: str,
    handler: Handler,
    help_text: str,
    examples: str,
    *,
    exit_codes: str = EXIT_CODES,
) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        epilog=f"{examples}\n\n{exit_codes}",
        formatter_class=_HelpFormatter,
    )
    _global_flags(parser, top=False)
    parser.set_defaults(handler=handler)
    return parser


def build_parser(handlers: Mapping[str, Handler]) -> argparse.ArgumentParser:
    """The whole command line; `handlers` carry each command out."""
    parser = argparse.ArgumentParser(
        prog="worker",
        description="Cancel cached EnOS IoT commands across a fleet.",
        epilog=f"{EXAMPLES['worker']}\n\n{EXIT_CODES}",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"worker {__version__}")
    _global_flags(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _run_command(
        _command(
            commands, "run", handlers["run"], "run a job file against a gateway", EXAMPLES["run"]
        )
    )
    validate = _command(
        commands,
        "validate",
        handlers["validate"],
        "check a job file and print the plan; sends nothing",
        EXAMPLES["validate"],
        exit_codes=VALIDATE_EXIT_CODES,
    )
    _resolve_command(
        _command(
            commands,
            "resolve",
            handlers["resolve"],
            "page a job's targets_query through Search Device into a targets file to review "
            "(and run as a targets_file); read-only calls",
            EXAMPLES["resolve"],
            exit_codes=RESOLVE_EXIT_CODES,
        )
    )
    validate.add_argument("job", type=Path, help="the job file (YAML)")
    validate.add_argument("--gateway", help="shown in the plan (else ENOS_GATEWAY, else the job's)")
    validate.add_argument("--json", action="store_true", help="print the plan as JSON")
    validate.add_argument(
        "--probe",
        action="store_true",
        help="also ask the gateway (a token and one read-only search; never a cancel) what "
        "budget it states, and whether the job's calls fit in what is left",
    )
    connection_flags(validate)
    limit_flags(validate)
    simulate_flags(
        _command(
            commands,
            "simulate",
            handlers["simulate"],
            "serve a local EnOS gateway simulator",
            EXAMPLES["simulate"],
            exit_codes=SIMULATE_EXIT_CODES,
        )
    )
    demo = _command(
        commands,
        "demo",
        handlers["demo"],
        "run the example job against the built-in simulator, in process",
        "examples:\n  worker demo\n  worker demo --out /tmp/demo",
    )
    demo.add_argument(
        "--out", type=Path, help="run directory (default: runs/<job>-<UTC time>-<hex>/)"
    )
    demo.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress line (logs and the summary still come)",
    )
    _report_command(
        _command(
            commands,
            "report",
            handlers["report"],
            "print the summary of run directories and write report.html",
            EXAMPLES["report"],
            exit_codes=REPORT_EXIT_CODES,
        )
    )
    _watch_command(
        _command(
            commands,
            "watch",
            handlers["watch"],
            "a long-lived worker: claim the job files dropped in SPOOL/incoming/, run them "
            "(several at once, one shared rate), move them to done/ or failed/",
            EXAMPLES["watch"],
            exit_codes=WATCH_EXIT_CODES,
        )
    )
    _verify_command(
        _command(
            commands,
            "verify",
            handlers["verify"],
            "after a run: search each target's device and say whether anything the job "
            "asked to cancel is still pending (changes nothing)",
            EXAMPLES["sweep"],
            exit_codes=SWEEP_EXIT_CODES,
        )
    )
    _ctl_command(
        _command(
            commands,
            "ctl",
            handlers["ctl"],
            "act on running runs through their run directories: pause, resume, rate N, "
            "concurrency N, stop, promote, status",
            EXAMPLES["ctl"],
            exit_codes=CTL_EXIT_CODES,
        )
    )
    audit = commands.add_parser(
        "audit", help="check a run's audit log", formatter_class=_HelpFormatter
    )
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    check = _command(
        actions,
        "verify",
        handlers["audit verify"],
        "check the hash chain, and that the results and the summary agree with it "
        "(exit 0 when whole, 1 naming the first bad line)",
        EXAMPLES["verify"],
        exit_codes=AUDIT_EXIT_CODES,
    )
    check.add_argument("dirs", nargs="+", metavar="DIR", help="run directories")
    check.add_argument(
        "--head", metavar="SHA256", help="the audit head the run printed: the chain must end there"
    )
    return parser


def _run_command(run: argparse.ArgumentParser) -> None:
    run.add_argument("job", type=Path, help="the job file (YAML)")
    limit_flags(run)
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run directory; must not exist or be empty (default: "
        "runs/<job name>-<UTC time>-<hex>/)",
    )
    run.add_argument(
        "--gateway",
        metavar="URL",
        help="API gateway base URL (default: ENOS_GATEWAY, else the job's gateway:)",
    )
    connection_flags(run)
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run in DIR: targets already final there are skipped",
    )
    run.add_argument(
        "--resume-existing",
        action="store_true",
        help="with --out DIR: if DIR already holds this run, resume it (a retried Kubernetes "
        "index, a restarted job) instead of refusing",
    )
    run.add_argument(
        "--retry-failed", action="store_true", help="with --resume: run the failed targets again"
    )
    run.add_argument(
        "--force",
        action="store_true",
        help="with --resume: even though the job file or its targets changed, or a stage "
        "gate failed (after looking at its evidence: the run goes on at that stage and checks "
        "its gate again)",
    )
    run.add_argument(
        "--no-wait",
        action="store_true",
        help="when the job's window: is closed, exit 4 saying when it opens (default: wait "
        "for it, showing when it opens)",
    )
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="get a token (and with --sample, search); cancel nothing",
    )
    run.add_argument(
        "--sample",
        type=int,
        default=0,
        metavar="N",
        help="with --dry-run: search N random targets and show what a run would cancel",
    )
    run.add_argument(
        "--yes",
        action="store_true",
        help=f"do not ask for confirmation above {CONFIRM_ABOVE:,} targets",
    )
    accept_incomplete_flag(run)
    run.add_argument(
        "--verify",
        action="store_true",
        help="after the run, search each target's device: is anything it asked to cancel still "
        "pending? (as worker verify DIR)",
    )
    run.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics during the run (HOST "
        "127.0.0.1 unless given; 0.0.0.0:9464 in a pod)",
    )
    run.add_argument(
        "--no-progress",
        action="store_true",
        help="no live progress line (logs and the summary still come)",
    )


def _resolve_command(resolve: argparse.ArgumentParser) -> None:
    resolve.add_argument("job", type=Path, help="a job file with a targets_query (YAML)")
    resolve.add_argument(
        "--out",
        type=Path,
        metavar="FILE",
        help="the targets file to write (CSV: asset_id,org_id); never overwritten (default: "
        "<job name>-targets.csv)",
    )
    resolve.add_argument(
        "--rate", metavar="N|unlimited", help="searches per second (default: the job's, else 10)"
    )
    resolve.add_argument(
        "--gateway",
        metavar="URL",
        help="API gateway base URL (default: ENOS_GATEWAY, else the job's gateway:)",
    )
    connection_flags(resolve)
    accept_incomplete_flag(resolve)


def _watch_command(watch: argparse.ArgumentParser) -> None:
    watch.add_argument("spool", type=Path, metavar="SPOOL", help="the spool directory")
    watch.add_argument(
        "--rate",
        metavar="N|auto|unlimited",
        default="10",
        help="requests per second for the whole watcher, shared by its jobs",
    )
    watch.add_argument("--jobs", type=int, default=2, metavar="N", help="jobs run at once")
    watch.add_argument(
        "--poll", type=float, default=1.0, metavar="SECONDS", help="how often incoming/ is read"
    )
    watch.add_argument(
        "--once", action="store_true", help="exit when nothing is left to claim or resume"
    )
    watch.add_argument(
        "--unchanged-for",
        type=float,
        default=1.0,
        metavar="SECONDS",
        help="claim a job file, and plan its targets file, only once it has not changed for "
        "this long (a producer writing in place must not have half a job run)",
    )
    watch.add_argument(
        "--gateway", metavar="URL", help="every job's gateway (required: this or ENOS_GATEWAY)"
    )
    watch.add_argument("--create", action="store_true", help="make SPOOL if it does not exist")
    connection_flags(watch)
    watch.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics of every job and of the watcher at /metrics",
    )


def _ctl_command(ctl: argparse.ArgumentParser) -> None:
    ctl.usage = "worker ctl [--timeout SECONDS] [--json] DIR [DIR ...] ACTION [N]"
    ctl.add_argument(
        "words",
        nargs="+",
        metavar="DIR ... ACTION [N]",
        help="run directories (or a spool, for rate), then pause | resume | rate N | "
        "concurrency N | stop | promote | status; a rate for several directories is split "
        "evenly between them",
    )
    ctl.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the run to acknowledge (then a request nobody took is "
        "taken back)",
    )
    ctl.add_argument("--json", action="store_true", help="status: print the status file(s)")


def _verify_command(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("dir", type=Path, metavar="DIR", help="a run directory")
    verify.add_argument("--gateway", metavar="URL", help="(default: the run's gateway)")
    connection_flags(verify)
    verify.add_argument(
        "--rate", metavar="N|auto|unlimited", help="searches per second (default: the run's)"
    )
    verify.add_argument(
        "--concurrency", type=int, metavar="N", help="searches in flight (default: the run's)"
    )


def _report_command(report: argparse.ArgumentParser) -> None:
    report.add_argument("dirs", nargs="+", metavar="DIR", help="run directories (or shards)")
    report.add_argument(
        "--json", action="store_true", help="print the summaries (and their total) as JSON"
    )
    report.add_argument(
        "--html",
        type=Path,
        metavar="FILE",
        help="where to write the HTML report (default: DIR/report.html, or "
        "./report.html for several directories)",
    )
