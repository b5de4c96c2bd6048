"""Helpers for the change-control tests: runs in process on an injected clock, a gateway
that misbehaves on cancel in the ways a stage gate must catch, and reading what a run left."""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from tests.conftest import APP_KEY, APP_SECRET
from worker.app.prepare import check_recorded, snapshot_targets, start_new, start_resumed
from worker.app.run import execute
from worker.app.wiring import RunOptions
from worker.enos import protocol as p
from worker.jobs.parse import load_job
from worker.model import Credentials
from worker.sim.service import CommandService, Result
from worker.sim.state import SimCommand, SimDevice
from worker.store.layout import RunDir, read_manifest
from worker.store.lock import run_dir_lock

HEADER = "version: 1\nname: change\norg_id: o15541858646501\n"


class Clock:
    """Wall-clock time that runs as the real one does, from where a test puts it."""

    def __init__(self, start: float) -> None:
        self.offset = start - time.time()

    def __call__(self) -> float:
        return time.time() + self.offset

    def jump(self, to: float) -> None:
        """From now on, the time is `to` (and runs on from there)."""
        self.offset = to - time.time()


def job_file(tmp_path: Path, body: str, assets: int = 0, name: str = "job.yaml") -> Path:
    """A job named "change" with `body`, and `assets` generated targets (as000000, ...)."""
    targets = "".join(f"  - asset_id: as{i:06d}\n" for i in range(assets))
    path = tmp_path / name
    path.write_text(HEADER + body + ("targets:\n" + targets if assets else ""), encoding="utf-8")
    return path


def options(url: str, run_dir: Path, limits: Any, *, force: bool = False) -> RunOptions:
    return RunOptions(
        url,
        Credentials(APP_KEY, APP_SECRET),
        limits,
        RunDir(run_dir),
        progress=False,
        seed=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.1,
        batch_settle_s=0.01,
        verify_settle_s=0.05,
        force=force,
    )


async def run_new(
    job_path: Path,
    url: str,
    run_dir: Path,
    *,
    clock: Callable[[], float] = time.time,
    **limits: Any,
) -> tuple[int, str]:
    """A new run as `worker run` makes it; (exit code, what it printed)."""
    job = load_job(job_path)
    opts = options(url, run_dir, replace(job.limits, **limits))
    run_dir.mkdir(parents=True, exist_ok=True)
    out = io.StringIO()
    with run_dir_lock(opts.run):  # as worker run holds it: worker ctl sees a live run
        start = snapshot_targets(start_new(job, None, gateway=url, limits=opts.limits), opts.run)
        code = await execute(start, opts, out=out, clock=clock)
    return code, out.getvalue()


async def run_resumed(
    job_path: Path,
    url: str,
    run_dir: Path,
    *,
    clock: Callable[[], float] = time.time,
    force: bool = False,
    **limits: Any,
) -> tuple[int, str]:
    """The run in `run_dir` resumed as `worker run JOB --resume DIR [--force]` does."""
    job = load_job(job_path)
    run = RunDir(run_dir)
    opts = options(url, run_dir, replace(read_manifest(run).limits, **limits), force=force)
    out = io.StringIO()
    with run_dir_lock(run):
        start = start_resumed(job, run, None, retry_failed=False, force=force)
        check_recorded(run, start.manifest, gateway=url)  # as `--resume DIR --gateway URL`
        code = await execute(start, replace(opts, resume=True), out=out, clock=clock)
    return code, out.getvalue()


def lines(path: Path) -> list[dict[str, Any]]:
    """The complete JSON lines of a file (read while a run writes it: a last line still being
    written is not one yet)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    return [orjson.loads(line) for line in data[: data.rfind(b"\n") + 1].splitlines()]


def records(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    """The audit records of one type."""
    return [r for r in lines(run_dir / "audit.jsonl") if r["type"] == kind]


def summary(run_dir: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = orjson.loads((run_dir / "summary.json").read_bytes())
    return loaded


def status(run_dir: Path) -> dict[str, Any]:
    try:
        loaded: dict[str, Any] = orjson.loads((run_dir / "status.json").read_bytes())
    except (OSError, ValueError):
        return {}
    return loaded


def each_once(run_dir: Path, expected: int) -> None:
    """Every target has exactly one final line."""
    found = lines(run_dir / "results.jsonl")
    keys = [orjson.dumps(line["target"]) for line in found]
    assert len(keys) == len(set(keys)) == expected


Misbehaviour = Callable[[SimDevice, list[str]], None]


@contextmanager
def cancels_then(misbehave: Misbehaviour) -> Iterator[None]:
    """The simulated service answers each cancel as it should, then `misbehave(device, the
    ids its answer named)` changes the device behind the answer's back."""
    service = CommandService._ACTIONS  # the test reaches into the simulator
    method, cancel = service[p.ACTION_CANCEL]

    def wrapped(self: CommandService, device: SimDevice, query: Any, body: bytes) -> Result:
        answer = cancel(self, device, query, body)
        misbehave(device, [c["commandId"] for c in answer[0]])
        return answer

    service[p.ACTION_CANCEL] = (method, wrapped)
    try:
        yield
    finally:
        service[p.ACTION_CANCEL] = (method, cancel)


def new_pending(device: SimDevice, command_id: str) -> None:
    """A command created now, pending (state 1)."""
    device.commands[command_id] = SimCommand(
        command_id, p.CommandState.CREATED, int(time.time() * 1000), identifier="setPoint42"
    )
