"""``worker resolve JOB``: a job's ``targets_query`` paged through Search Device into a targets
file an operator can review, and then run as is through ``targets_file:`` (the same file a run
resolves into its directory). Read-only calls: nothing is cancelled, nothing is created on the
gateway.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path
from typing import TextIO

from worker.app.query import resolve_to_file
from worker.app.settings import ca_bundle, merge_limits, resolve_gateway
from worker.app.wiring import RunOptions
from worker.cli.run import credentials_of, run_async
from worker.errors import ExitCode, UsageError
from worker.jobs.parse import load_job
from worker.redact import printable
from worker.store.layout import RunDir
from worker.store.records import QueryRecord

SHOWN_GROUPS = 30  # (product, status) rows printed; the rest summed


def cmd_resolve(args: argparse.Namespace) -> int:
    """Resolve the job's query into a targets file; 0 complete, 3 incomplete or refused."""
    job = load_job(Path(args.job))
    if job.query is None:
        raise UsageError(
            f"{job.path} has no targets_query; worker resolve reads a job whose targets come "
            "from a query (targets_query: with product_key, status, ...)"
        )
    out = args.out if args.out is not None else Path(f"{job.name}-targets.csv")
    _check_out(out)
    credentials = credentials_of(args)
    gateway = resolve_gateway(args.gateway, job, insecure=args.insecure)
    limits = merge_limits(job.limits, rate=args.rate, concurrency=None, deadline=None)
    options = RunOptions(
        gateway,
        credentials,
        limits,
        RunDir(Path()),
        progress=False,
        ca_bundle=ca_bundle(args.ca_bundle),
        accept_incomplete=args.accept_incomplete,
    )
    try:
        record, result = run_async(lambda: resolve_to_file(job, options, out))
    except KeyboardInterrupt:
        sys.stderr.write(f"worker: interrupted; {out} was not written (read-only calls only)\n")
        return ExitCode.INTERRUPTED
    _write(sys.stdout, record, result.by_label, out)
    if record.get("targets_file") is None:
        return ExitCode.ABORTED
    return ExitCode.OK


def _check_out(out: Path) -> None:
    """A new file in a folder that exists and can be written: a reviewed file is never
    replaced by a second resolution."""
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise UsageError(f"{out} already exists; worker resolve never overwrites: give --out FILE")
    if out.suffix.lower() != ".csv":
        raise UsageError(f"--out {out}: the targets file is CSV; name it *.csv")
    if not out.parent.is_dir() or not os.access(out.parent, os.W_OK | os.X_OK):
        raise UsageError(f"--out {out}: cannot write in {out.parent}; give a writable folder")
    if partial.exists():
        partial.unlink()  # a previous try's rows: this resolution starts over


def _write(
    stream: TextIO, record: QueryRecord, by_label: Counter[tuple[str, str]], out: Path
) -> None:
    """What the query found, for the operator who reviews it before a run."""
    found, total = record.get("found", 0), record.get("total", 0)
    lines = [
        f"Query: {record.get('query', '')}",
        *(f"  search            {expression}" for expression in record.get("expressions", [])),
        f"  counted           {total:,} devices (the gateway's totalSize, all searches)",
        f"  found             {found:,} distinct devices in {record.get('pages', 0):,} pages of "
        f"up to {record.get('page_size', 0):,}, {record.get('passes', 0)} pass(es), "
        f"{record.get('calls', 0):,} calls",
    ]
    lines += _groups(by_label)
    if record.get("stopped"):
        lines.append(f"  stopped           {record['stopped']}")
    written = record.get("targets_file")
    if written is None:
        lines.append(
            f"  INCOMPLETE        found {found:,} of {total:,} devices after "
            f"{record.get('passes', 0)} passes; {out}.partial holds what was found, {out} was "
            "not written (run again, or pass --accept-incomplete to write what was found)"
        )
    else:
        if not record.get("complete"):
            lines.append(f"  INCOMPLETE        {total - found:,} devices short; written anyway")
        lines.append(f"  written           {written} (sha256 {record.get('targets_sha256')})")
        lines.append(f"  use it            targets_file: {written}   (review it first)")
    stream.write("\n".join(printable(line) for line in lines) + "\n")
    stream.flush()


def _groups(by_label: Counter[tuple[str, str]]) -> list[str]:
    """Devices by product key and status, the largest groups first."""
    if not by_label:
        return []
    lines = ["  by product and status"]
    ranked = by_label.most_common()
    for (product, status), count in ranked[:SHOWN_GROUPS]:
        lines.append(f"    {product or '(none)':<20} {status or '(none)':<10} {count:>10,}")
    rest = ranked[SHOWN_GROUPS:]
    if rest:
        lines.append(f"    ... {len(rest):,} more groups, {sum(n for _, n in rest):,} devices")
    return lines
