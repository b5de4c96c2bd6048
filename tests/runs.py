"""Helpers to run a job in process against a simulator and read what it left behind."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import APP_KEY, APP_SECRET
from worker.app.metrics import MetricsAddress
from worker.app.prepare import check_recorded, snapshot_targets, start_new, start_resumed
from worker.app.run import execute
from worker.app.wiring import RunOptions
from worker.jobs.parse import load_job
from worker.model import Credentials
from worker.store.layout import RunDir, read_manifest


def write_job(tmp_path: Path, body: str, name: str = "job.yaml") -> Path:
    """A job file with `body` below the version/name/org header."""
    path = tmp_path / name
    path.write_text("version: 1\nname: t\norg_id: o15541858646501\n" + body, encoding="utf-8")
    return path


async def run_job(
    job_path: Path,
    gateway: str,
    run_dir: Path,
    *,
    credentials: Credentials | None = None,
    ca_bundle: Path | None = None,
    metrics: MetricsAddress | None = None,
    wall: Callable[[], float] = time.time,
    **limits: Any,
) -> tuple[int, str]:
    """Run a job as `worker run` would (fast backoff); returns (exit code, printed report)."""
    job = load_job(job_path)
    options = RunOptions(
        gateway,
        credentials or Credentials(APP_KEY, APP_SECRET),
        replace(job.limits, **limits),
        RunDir(run_dir),
        progress=False,
        seed=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.1,
        ca_bundle=ca_bundle,
        batch_settle_s=0.01,
        metrics=metrics,
        wall=wall,
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    start = start_new(job, None, gateway=gateway, limits=options.limits)
    start = snapshot_targets(start, options.run)
    code = await execute(start, options, out=out)
    return code, out.getvalue()


def results(run_dir: Path) -> list[dict[str, Any]]:
    """Every line of results.jsonl."""
    return [orjson.loads(line) for line in (run_dir / "results.jsonl").read_bytes().splitlines()]


def summary(run_dir: Path) -> dict[str, Any]:
    """summary.json."""
    loaded: dict[str, Any] = orjson.loads((run_dir / "summary.json").read_bytes())
    return loaded


async def resume_job(
    job_path: Path,
    gateway: str,
    run_dir: Path,
    *,
    retry_failed: bool = False,
    wall: Callable[[], float] = time.time,
    **limits: Any,
) -> tuple[int, str]:
    """Continue a run as `worker run JOB --resume DIR` would."""
    job = load_job(job_path)
    run = RunDir(run_dir)
    recorded = read_manifest(run).limits
    options = RunOptions(
        gateway,
        Credentials(APP_KEY, APP_SECRET),
        replace(recorded, **limits),
        run,
        resume=True,
        progress=False,
        seed=2,
        backoff_base_s=0.01,
        backoff_cap_s=0.1,
        batch_settle_s=0.01,
        wall=wall,
    )
    out = io.StringIO()
    start = start_resumed(job, run, None, retry_failed=retry_failed, force=False)
    check_recorded(run, start.manifest, gateway=gateway)  # as `--resume DIR --gateway URL`
    code = await execute(start, options, out=out)
    return code, out.getvalue()
