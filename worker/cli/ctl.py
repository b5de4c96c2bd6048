"""``worker ctl``: act on running runs through their run directories (the story is
:mod:`worker.app.ctl`)."""

from __future__ import annotations

import argparse

from worker.app.ctl import control, parse_words


def cmd_ctl(args: argparse.Namespace) -> int:
    """Pause, resume, set the rate or concurrency, stop, promote, or show the status of runs."""
    paths, action, value = parse_words(list(args.words))
    return control(paths, action, value, timeout=args.timeout, json=args.json)
