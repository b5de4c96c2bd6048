"""The command line's entry point: parse, configure logging, run the command, map what went
wrong to the contract's exit code. The commands live in :mod:`worker.cli.run`,
:mod:`worker.cli.validate` and :mod:`worker.cli.tools`; the grammar in :mod:`worker.cli.grammar`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from worker import logs
from worker.cli.grammar import build_parser
from worker.cli.run import cmd_run, cmd_verify, cmd_watch
from worker.cli.tools import cmd_audit_verify, cmd_demo, cmd_report, cmd_simulate
from worker.cli.validate import cmd_validate
from worker.errors import ExitCode, UsageError

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
        return ExitCode.INTERRUPTED
