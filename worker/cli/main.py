"""The command line's entry point: parse, configure logging, run the command, map what went
wrong to the contract's exit code, in one line an operator can act on (never a traceback:
the JSON log, with --log-json or off a terminal, keeps one for a bug). The commands live in
:mod:`worker.cli.run`, :mod:`worker.cli.validate` and :mod:`worker.cli.tools`; the grammar in
:mod:`worker.cli.grammar`.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO, cast

import structlog

from worker import logs
from worker.cli.ctl import cmd_ctl
from worker.cli.grammar import build_parser
from worker.cli.resolve import cmd_resolve
from worker.cli.run import cmd_run, cmd_verify, cmd_watch
from worker.cli.tools import cmd_audit_verify, cmd_demo, cmd_report, cmd_simulate
from worker.cli.validate import cmd_validate
from worker.errors import ExitCode, StoreError, UsageError
from worker.redact import printable
from worker.store.lock import RunDirBusy

HANDLERS = {
    "run": cmd_run,
    "validate": cmd_validate,
    "resolve": cmd_resolve,
    "simulate": cmd_simulate,
    "demo": cmd_demo,
    "report": cmd_report,
    "audit verify": cmd_audit_verify,
    "verify": cmd_verify,
    "watch": cmd_watch,
    "ctl": cmd_ctl,
}
log = structlog.get_logger("worker")


class PipeSafe:
    """A standard stream whose reader may go away (``worker run ... | head -1``): once it has,
    writes are dropped (the descriptor points at /dev/null, so Python's last flush is quiet)
    and the command goes on; its files are the record, its exit code the real one."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        """Write, unless the reader is gone."""
        if not self.gone:
            try:
                return self._stream.write(text)
            except BrokenPipeError:
                self._reader_gone()
        return len(text)

    def flush(self) -> None:
        """Flush, unless the reader is gone."""
        if not self.gone:
            try:
                self._stream.flush()
            except BrokenPipeError:
                self._reader_gone()

    def isatty(self) -> bool:
        """Whether the stream is a terminal."""
        return not self.gone and self._stream.isatty()

    def fileno(self) -> int:
        """The stream's descriptor."""
        return self._stream.fileno()

    def _reader_gone(self) -> None:
        self.gone = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError):
            pass  # no descriptor to redirect: the writes are dropped here all the same


def _pipe_safe() -> None:
    """Wrap stdout and stderr (once): a closed pipe must not end a run with a traceback."""
    if not isinstance(sys.stdout, PipeSafe):
        sys.stdout = cast("TextIO", PipeSafe(sys.stdout))
    if not isinstance(sys.stderr, PipeSafe):
        sys.stderr = cast("TextIO", PipeSafe(sys.stderr))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `worker` console script."""
    _pipe_safe()
    args = build_parser(HANDLERS).parse_args(argv)
    level = logging.WARNING if args.quiet else logging.INFO
    logs.configure(json=True if args.log_json else None, level=level, stream=sys.stderr)
    try:
        return int(args.handler(args))
    except RunDirBusy as busy:
        sys.stderr.write(
            f"worker: busy: {busy.run} is in use by another worker ({busy.holder}); try again "
            "later, or stop that worker and resume\n"
        )
        return ExitCode.INTERRUPTED
    except (UsageError, StoreError) as exc:
        sys.stderr.write(f"worker: error: {printable(str(exc))}\n")
        return ExitCode.USAGE
    except KeyboardInterrupt:
        sys.stderr.write("worker: interrupted before the run started; nothing was sent\n")
        return ExitCode.INTERRUPTED
    except Exception as exc:  # a bug: one line here, the traceback in the JSON log
        if args.log_json or not sys.stderr.isatty():
            log.exception("worker.internal_error")
        why = printable(repr(exc))
        sys.stderr.write(f"worker: internal error: {why}; this is a bug, please report it\n")
        return ExitCode.ABORTED
