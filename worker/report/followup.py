"""``failed.csv`` (every target whose final outcome is failed, usable as the ``targets_file`` of
a follow-up job) and ``followup.yaml`` (that job, ready to validate), beside the report."""

from __future__ import annotations

import csv
import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import orjson

from worker.jobs.targets import TARGET_KEYS
from worker.model import Match
from worker.store.layout import RunDir
from worker.store.records import FailedRow
from worker.store.state import Manifest
from worker.store.tally import Counts


def write_followup(run: RunDir, manifest: Manifest, counts: Counts) -> Path | None:
    """failed.csv and followup.yaml for the targets still failed; None when there are none."""
    if not counts.failed:
        for path in (run.failed_csv, run.followup):
            path.unlink(missing_ok=True)
        return None
    with run.failed_csv.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(TARGET_KEYS)
        for row in counts.failed.values():
            writer.writerow(_cells(row))
    limits = manifest.limits
    rate = "auto" if limits.adaptive else (limits.rate or "unlimited")
    lines = [
        f"# Follow-up of run {manifest.run_id}: the {len(counts.failed):,} targets that failed.",
        "# Read why in report.html (failed targets) before you run it; fix the cause first.",
        "version: 1",
        f"name: {manifest.job_name}-followup",
        *_match_lines(manifest.match),
        f"limits: {{rate: {rate}, concurrency: {limits.concurrency}, attempts: "
        f"{limits.attempts}, timeout: {limits.timeout:g}}}",
        f"targets_file: {run.failed_csv.name}",
    ]
    run.followup.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run.followup


def _cells(row: FailedRow) -> list[str]:
    """A failed target's cells, in TARGET_KEYS order."""
    return [
        row["asset_id"],
        row["product_key"],
        row["device_key"],
        row["command_id"],
        row["org_id"],
    ]


def _match_lines(match: Match | None) -> list[str]:
    if match is None:
        return []
    lines = ["match:"]
    for key, value in dataclasses.asdict(match).items():
        if value is None:
            continue
        if key.endswith("_ms"):
            moment = datetime.fromtimestamp(value / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            lines.append(f"  {key.removesuffix('_ms')}: {moment}")
        else:
            lines.append(f"  {key}: {orjson.dumps(value).decode()}")
    return lines
