"""structlog configuration, done once at the edge: readable on a TTY, JSON lines otherwise.

Redaction is part of the pipeline, not a convention: any key that names a secret is masked,
and any value containing a registered secret (the app secret, every access token: see
:mod:`worker.redact`) is masked too, tracebacks included. Keys and the event name are ours and
never rewritten: a gateway must not be able to censor them by choosing its token.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping
from typing import Any, TextIO

import structlog

from worker import redact as redact_values

_SECRET_KEYS = ("secret", "token", "signature", "password", "encryption", "authorization")
REDACTED = redact_values.REDACTED


def register_secret(value: str) -> None:
    """Mask this exact text wherever it would appear in a log line (or any output)."""
    redact_values.register(value)


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """A structlog processor that masks secret-looking keys and registered secret values."""
    for key, value in list(event.items()):
        lowered = key.lower()
        if any(word in lowered for word in _SECRET_KEYS) and not lowered.endswith(("_s", "_ms")):
            event[key] = REDACTED
        elif isinstance(value, str) and key != "event":
            event[key] = redact_values.scrub_own(value)
    return event


def _printable(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Every text value escaped for a terminal (ESC, CR/LF, OSC... shown, never obeyed)."""
    for key, value in event.items():
        if isinstance(value, str):
            event[key] = redact_values.printable(value)
    return event


def _clear_progress_line(_: Any, __: str, line: str) -> str:
    """On a terminal, a log line first clears the live progress line (which redraws below)."""
    return "\r\x1b[K" + line


def configure(
    *, json: bool | None = None, level: int = logging.INFO, stream: TextIO | None = None
) -> None:
    """Set up structlog for the process: console renderer on a TTY, JSON lines otherwise."""
    out = stream or sys.stderr
    as_json = not out.isatty() if json is None else json
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty() and not os.environ.get("NO_COLOR"))
    )
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        *([structlog.processors.format_exc_info] if as_json else []),  # the traceback, as text
        redact,
        renderer,
    ]
    if not as_json:  # a console: what came from the gateway or a file is shown, not obeyed
        processors.insert(-1, _printable)
    if not as_json and out.isatty():
        processors.append(_clear_progress_line)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
