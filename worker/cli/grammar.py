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

Handler = Callable[[argparse.Namespace], int]
SIM_APP_KEY, SIM_APP_SECRET = "sim-app-key", "sim-app-secret"
CONFIRM_ABOVE = 1000

EXIT_CODES = """exit codes:
  0  every target was cancelled or had nothing to cancel
  1  the run finished; some targets failed
  2  bad usage or an invalid job file: nothing was sent
  3  aborted (credentials, permission, wrong gateway, abort rule, outage, internal error);
     resumable
  4  interrupted (SIGINT/SIGTERM) or the deadline was reached; resumable"""

WATCH_EXIT_CODES = """exit codes:
  0  stopped (or, with --once, nothing left to do)
  1  a job could not be run by this watcher (a crash or an unreadable run directory: it
     stays in running/, resumable; the log says why)
  2  bad usage
  4  stopped by SIGINT/SIGTERM with jobs left in running/ (the next watcher resumes them)"""

SWEEP_EXIT_CODES = """exit codes:
  0  every searched target is verified: nothing the job asked to cancel is pending
  1  some targets still have such a command pending, or could not be searched
  2  bad usage (not a run directory, a run in progress)
  3  the gateway or the credentials cannot be used"""

EXAMPLES = {
    "worker": """examples:
  worker demo                                    the simulator and an example job, in process
  worker validate jobs/maintenance.yaml          check a job and print its plan; sends nothing
  worker run jobs/maintenance.yaml --gateway https://apim-ppe1.envisioniot.com
  worker run JOB.yaml --resume runs/JOB-20261201T120000Z
  worker report runs/JOB-20261201T120000Z        the summary again, and report.html""",
    "run": """examples:
  worker run jobs/maintenance.yaml --gateway https://apim.example.com
  worker run JOB.yaml --rate auto --concurrency 64 --deadline 1h --yes
  worker run JOB.yaml --dry-run --sample 20      token + 20 sampled searches; no cancel
  worker run JOB.yaml --resume DIR --retry-failed""",
    "validate": """examples:
  worker validate jobs/incident.yaml
  worker validate JOB.yaml --rate 200 --json""",
    "simulate": """examples:
  worker simulate --devices 10000 --commands 4
  worker simulate --port 0 --error-rate 0.2 --rate-cap 300
  curl -X POST localhost:8080/_sim/faults -d '{"down_for_s": 5}'""",
    "report": """examples:
  worker report runs/JOB-20261201T120000Z
  worker report shard-0 shard-1 shard-2 --html incident.html
  worker report DIR --json""",
    "watch": """examples:
  worker watch /srv/spool --rate 100             run every job file dropped in incoming/
  worker watch /srv/spool --rate 100 --jobs 4    four jobs at once, sharing 100 requests/s
  worker watch /srv/spool --once                 what is there now, then exit (cron)""",
    "sweep": """examples:
  worker verify runs/JOB-20261201T120000Z        search each target: is anything still pending?
  worker verify DIR --rate 50
  worker run JOB.yaml --verify                   the run, then the sweep""",
    "verify": """examples:
  worker audit verify runs/JOB-20261201T120000Z
  worker audit verify DIR --head SHA256            (the audit head the run printed)""",
}


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
    )
    validate.add_argument("job", type=Path, help="the job file (YAML)")
    validate.add_argument("--gateway", help="shown in the plan (else ENOS_GATEWAY, else the job's)")
    validate.add_argument("--json", action="store_true", help="print the plan as JSON")
    _limit_flags(validate)
    _simulate_flags(
        _command(
            commands,
            "simulate",
            handlers["simulate"],
            "serve a local EnOS gateway simulator",
            EXAMPLES["simulate"],
        )
    )
    demo = _command(
        commands,
        "demo",
        handlers["demo"],
        "run the example job against the built-in simulator, in process",
        "examples:\n  worker demo\n  worker demo --out /tmp/demo",
    )
    demo.add_argument("--out", type=Path, help="run directory (default: runs/<job>-<UTC time>/)")
    _report_command(
        _command(
            commands,
            "report",
            handlers["report"],
            "print the summary of run directories and write report.html",
            EXAMPLES["report"],
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
    )
    check.add_argument("dirs", nargs="+", metavar="DIR", help="run directories")
    check.add_argument(
        "--head", metavar="SHA256", help="the audit head the run printed: the chain must end there"
    )
    return parser


def _run_command(run: argparse.ArgumentParser) -> None:
    run.add_argument("job", type=Path, help="the job file (YAML)")
    _limit_flags(run)
    run.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run directory; must not exist or be empty (default: runs/<job name>-<UTC time>/)",
    )
    run.add_argument(
        "--gateway",
        metavar="URL",
        help="API gateway base URL (default: ENOS_GATEWAY, else the job's gateway:)",
    )
    _connection_flags(run)
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
        help="with --resume: even though the job file or its targets changed",
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


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    """How a command that talks to the gateway authenticates and trusts it (run, verify,
    watch: one text for the three)."""
    parser.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="a chmod-600 file with ENOS_APP_KEY=... and ENOS_APP_SECRET=... lines "
        "(default: the environment)",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="PEM file of CA certificates to verify the gateway with (default: the "
        "system store, which honours SSL_CERT_FILE)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain http to a host that is not loopback"
    )


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
        help="claim a job file only once it has not changed for this long (a producer writing "
        "in place must not have half a job run)",
    )
    watch.add_argument(
        "--gateway", metavar="URL", help="(default: ENOS_GATEWAY, else each job's gateway:)"
    )
    _connection_flags(watch)
    watch.add_argument(
        "--metrics-port",
        metavar="[HOST:]PORT",
        help="serve Prometheus metrics of every job and of the watcher at /metrics",
    )


def _verify_command(verify: argparse.ArgumentParser) -> None:
    verify.add_argument("dir", type=Path, metavar="DIR", help="a run directory")
    verify.add_argument("--gateway", metavar="URL", help="(default: the run's gateway)")
    _connection_flags(verify)
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


def _limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        metavar="N|auto|unlimited",
        help="requests per second for the whole run; 'auto' finds the "
        "gateway's limit (default: the job's limits.rate, else 10)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="requests in flight (default: the job's, else 16)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="only shard K of N (K from 0, as JOB_COMPLETION_INDEX): a stable split by a hash "
        "of each target, so N processes cover every target exactly once",
    )
    parser.add_argument(
        "--assets-per-call",
        type=int,
        metavar="N",
        help="cancel up to N assets (by asset_id, all their commands) in one call as "
        "assetId=a1,a2,...; opt-in, verified on the gateway, falls back to 1 (default: the "
        "job's limits.assets_per_call, else 1; at most 100)",
    )
    parser.add_argument(
        "--deadline",
        metavar="DURATION",
        help="stop cleanly after this long, e.g. 90s, 45m, 2h, 1h30m (default: "
        "the job's, else none)",
    )


def _simulate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks one")
    parser.add_argument(
        "--app-key", help=f"the accepted app key (default: ENOS_APP_KEY, else {SIM_APP_KEY})"
    )
    parser.add_argument(
        "--app-secret-file",
        type=Path,
        metavar="FILE",
        help=f"a chmod-600 file holding its secret (default: ENOS_APP_SECRET, else "
        f"{SIM_APP_SECRET}); never on the command line, where ps shows it",
    )
    parser.add_argument(
        "--job",
        type=Path,
        metavar="JOB.yaml",
        help="make every target of this job exist, with cached commands",
    )
    parser.add_argument(
        "--devices", type=int, default=1000, help="generated devices (as000000, as000001, ...)"
    )
    parser.add_argument(
        "--commands",
        type=int,
        default=3,
        help="cached commands per device (names cycle setPoint42, restart, "
        "firmwareCheck, setPoint7)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the data and the faults")
    faults = parser.add_argument_group("faults (more over POST /_sim/faults; see the README)")
    faults.add_argument("--latency-ms", type=float, default=0.0, help="added to every call")
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of calls answered HTTP 500/502/503"
    )
    faults.add_argument(
        "--rate-cap",
        type=float,
        metavar="N",
        help="calls per second above which to answer 429 (default: none)",
    )
    faults.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="share of connections closed after the call took effect",
    )
    faults.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share of answers garbled or cut short"
    )
    faults.add_argument("--token-ttl", type=int, default=7200, help="token lifetime in seconds")
    faults.add_argument(
        "--deny-org", action="append", metavar="ORG", help="answer 99403 for this org (repeatable)"
    )
    faults.add_argument(
        "--expired-token-answer",
        choices=("401", "1203"),
        default="401",
        help="how an expired token is refused",
    )
    faults.add_argument(
        "--require-command-id",
        action="store_true",
        help="refuse a cancel without commandId, as the 2.3.0 docs say",
    )
    faults.add_argument(
        "--multi-asset",
        choices=("off", "strict", "lenient", "first"),
        default="off",
        help="what a cancel with assetId=a1,a2,... does: off = the text is one (unknown) id, "
        "99404; strict = an unknown id fails the whole call (99404, no effect); lenient = "
        "unknown ids are ignored; first = only the first id is acted on, silently (to test "
        "the worker's self-verification)",
    )
    faults.add_argument(
        "--max-assets",
        type=int,
        default=100,
        metavar="N",
        help="with --multi-asset: a list of more asset ids is refused with 99400",
    )
    faults.add_argument(
        "--quota",
        default="",
        metavar="SPEC",
        help="the gateway's quota: windows aligned to the UTC second/minute/hour/day/month/year, "
        "e.g. second=100,minute=5000,day=100000 (day=2000/120: a 120-s 'day'); 429 once one is "
        "spent, refused calls do not count",
    )
    faults.add_argument(
        "--quota-headers",
        choices=("x-ratelimit", "ietf", "both", "none"),
        default="x-ratelimit",
        help="how every business answer states the quota: X-RateLimit-Limit/Remaining-<Period>, "
        "the IETF draft's RateLimit-Limit/Remaining/Reset (the window with the fewest left), "
        "both, or none",
    )
    faults.add_argument(
        "--quota-retry-after",
        choices=("exact", "absent", "capped"),
        default="exact",
        help="Retry-After on the quota's 429: the rest of the window, none, or at most 1 s",
    )
    faults.add_argument(
        "--late-504-rate",
        type=float,
        default=0.0,
        help="share of calls answered HTTP 504 after they took effect",
    )
    faults.add_argument(
        "--search-lag",
        type=float,
        default=0.0,
        metavar="S",
        help="Search Command shows each command as it was S seconds ago (EnOS: about 2)",
    )
    faults.add_argument(
        "--refresh-revokes", action="store_true", help="token/refresh revokes earlier tokens"
    )
    faults.add_argument(
        "--legacy-wire",
        action="store_true",
        help="2019 wire variants (numeric createTime, createLocalTime)",
    )
