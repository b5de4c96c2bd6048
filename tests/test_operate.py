"""Operating a run: kill -9 and resume, signals, abort rule, deadline, dry run, confirmation."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import ORG
from tests.runs import results, resume_job, run_job, summary, write_job
from tests.simproc import run_worker, sim_get, sim_post, simulator_process, worker_env
from worker.app.recorder import RunRecorder
from worker.model import Target
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator

HEAD = "version: 1\nname: ops\norg_id: o15541858646501\n"


def csv_job(tmp_path: Path, count: int, limits: str) -> Path:
    """A job over generated devices as000000.. given by a CSV targets file."""
    rows = "".join(f"as{i:06d}\n" for i in range(count))
    (tmp_path / "devices.csv").write_text("asset_id\n" + rows)
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + f"limits: {limits}\ntargets_file: devices.csv\n")
    return job


def journal_lines(run_dir: Path) -> int:
    """Complete lines in results.jsonl so far."""
    path = run_dir / "results.jsonl"
    return path.read_bytes().count(b"\n") if path.exists() else 0


def wait_for_lines(process: subprocess.Popen[str], run_dir: Path, count: int) -> None:
    """Wait (bounded) until the running worker has journalled `count` results."""
    deadline = time.monotonic() + 60
    while journal_lines(run_dir) < count:
        assert process.poll() is None, "the run ended before the point of interruption"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.01)


def start_worker(*args: str) -> subprocess.Popen[str]:
    """`python -m worker ARGS` in the background."""
    return subprocess.Popen(
        [sys.executable, "-m", "worker", *args],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_9_midway(job: Path, gateway: str, run_dir: Path, lines: int) -> None:
    """Start `worker run`, kill -9 it once `lines` results are journalled."""
    process = start_worker("run", str(job), "--gateway", gateway, "--out", str(run_dir), "--yes")
    wait_for_lines(process, run_dir, lines)
    process.kill()
    process.communicate()
    assert process.returncode == -signal.SIGKILL


def assert_one_line_per_target(run_dir: Path, count: int) -> None:
    """Exactly one final line per target across all segments."""
    keys = Counter(line["target"]["asset_id"] for line in results(run_dir))
    assert len(keys) == count
    assert set(keys.values()) == {1}


@pytest.fixture
def sim5000() -> Iterator[str]:
    """A simulator process with 5,000 generated devices."""
    with simulator_process("--devices", "5000") as url:
        yield url


def test_kill_9_then_resume(sim5000: str, tmp_path: Path) -> None:
    """kill -9 at a random point, resume: one line per target, all cancelled, few calls twice."""
    job = csv_job(tmp_path, 5000, "{rate: 3000, concurrency: 16}")
    run_dir = tmp_path / "run"
    kill_9_midway(job, sim5000, run_dir, random.Random(9).randint(500, 4000))
    done = run_worker("run", str(job), "--resume", str(run_dir), "--yes")
    assert done.returncode == 0, done.stderr
    assert_one_line_per_target(run_dir, 5000)
    devices = sim_get(sim5000, "/_sim/devices")
    assert len(devices) == 5000
    assert all(state != 1 for d in devices for state in d["commands"].values())
    called_twice = {d["asset_id"] for d in devices if d["cancel_calls"] > 1}
    assert len(called_twice) <= 16
    # Crash truth: a target that may have been in flight when the first process died and
    # whose re-call found nothing is effect_unknown, never a plain nothing_to_cancel.
    by_asset = {line["target"]["asset_id"]: line for line in results(run_dir)}
    for asset in called_twice:
        line = by_asset[asset]
        assert line["outcome"] == "cancelled" or line["effect_unknown"], line
    unknown = [line for line in by_asset.values() if line["effect_unknown"]]
    assert len(unknown) <= 16 + 16  # in flight, plus the mark written one concurrency ahead
    result = summary(run_dir)
    assert (result["segments"], result["not_attempted"], result["exit_code"]) == (2, 0, 0)
    assert result["effect_unknown"] == len(unknown)


def test_sigint_stops_within_the_timeout_then_resumes(tmp_path: Path) -> None:
    """A second worker on the same directory is refused; SIGINT: in-flight requests finish,
    exit 4 within the attempt timeout; resume: exit 0."""
    with simulator_process("--devices", "400", "--latency-ms", "300") as url:
        job = csv_job(tmp_path, 400, "{rate: 200, concurrency: 16, timeout: 2}")
        run_dir = tmp_path / "run"
        process = start_worker("run", str(job), "--gateway", url, "--out", str(run_dir))
        wait_for_lines(process, run_dir, 40)
        meanwhile = run_worker("run", str(job), "--resume", str(run_dir))
        assert meanwhile.returncode == 4  # one worker per run directory: busy, try later
        assert "in use by another worker" in meanwhile.stderr
        began = time.monotonic()
        process.send_signal(signal.SIGINT)
        out, _ = process.communicate(timeout=10)
        assert process.returncode == 4
        assert time.monotonic() - began < 2 + 1.0
        assert f"--resume {run_dir}" in out
        stopped = summary(run_dir)
        assert stopped["stopped"] == "interrupted"
        assert stopped["not_attempted"] > 0
        sim_post(url, "/_sim/faults", {"latency_ms": 0})
        done = run_worker("run", str(job), "--resume", str(run_dir))
        assert done.returncode == 0, done.stderr
    assert_one_line_per_target(run_dir, 400)


@pytest.mark.anyio
async def test_failure_ratio_aborts_resumably(gateway: str, tmp_path: Path) -> None:
    """Half the targets unknown: the abort rule stops the run with exit 3, resumable."""
    lines = "".join(f"  - asset_id: {'nosuch' if i % 2 else 'as'}{i:06d}\n" for i in range(200))
    settings = (
        "limits: {rate: 1000, concurrency: 4}\nabort: {failure_ratio: 0.3, min_finished: 20}\n"
    )
    job = write_job(tmp_path, settings + "targets:\n" + lines)
    code, report = await run_job(job, gateway, tmp_path / "run")
    assert code == 3
    result = summary(tmp_path / "run")
    assert "abort.failure_ratio 0.3" in result["stop_message"]
    assert result["resumable"] is True
    assert result["not_attempted"] > 100
    assert "--resume" in report


@pytest.mark.anyio
async def test_deadline_stops_in_time_then_resume_finishes(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """deadline 2s at 20/s over 150 targets: exit 4 before the deadline; resume completes."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(150))
    job = write_job(tmp_path, "limits: {rate: 20, timeout: 1, deadline: 2s}\ntargets:\n" + lines)
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 4
    first = summary(tmp_path / "run")
    started = datetime.fromisoformat(first["started_at"]).timestamp()
    last = max(
        datetime.fromisoformat(r["finished_at"]).timestamp() for r in results(tmp_path / "run")
    )
    assert last <= started + 2.0  # everything ended before the deadline
    assert first["stopped"] == "deadline"
    assert 0 < first["not_attempted"] < 150
    code, _ = await resume_job(job, gateway, tmp_path / "run", rate=1000.0, deadline=None)
    assert code == 0
    assert summary(tmp_path / "run")["not_attempted"] == 0
    assert len(results(tmp_path / "run")) == 150


@pytest.mark.anyio
async def test_torn_line_is_cut_and_retry_failed_supersedes(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """A torn last line is truncated on resume; --retry-failed re-runs failed targets and the
    summary counts each target once."""
    job = write_job(
        tmp_path,
        "targets:\n  - asset_id: as000001\n  - asset_id: late0001\n  - asset_id: as000002\n",
    )
    run_dir = tmp_path / "run"
    code, _ = await run_job(job, gateway, run_dir, rate=1000.0)
    assert code == 1
    with (run_dir / "results.jsonl").open("ab") as journal:
        journal.write(b'{"target": {"asset_id": "as0000')  # a machine crash mid-line
    sim.store.seed_targets([Target(org_id=ORG, asset_id="late0001")])  # the device appears
    code, _ = await resume_job(job, gateway, run_dir, retry_failed=True)
    assert code == 0
    lines = results(run_dir)
    assert [line["target"]["asset_id"] for line in lines][-1] == "late0001"
    result = summary(run_dir)
    assert result["outcomes"]["failed"] == 0
    assert sum(result["outcomes"].values()) == 3
    assert result["errors"] == {}


def test_changed_job_refuses_resume_unless_forced(tmp_path: Path) -> None:
    """A different job file or target list: resume exits 2; --force proceeds."""
    with simulator_process() as url:
        job = tmp_path / "job.yaml"
        job.write_text(HEAD + "targets: [{asset_id: as000001}]\n")
        run_dir = tmp_path / "run"
        assert run_worker("run", str(job), "--gateway", url, "--out", str(run_dir)).returncode == 0
        job.write_text(HEAD + "targets: [{asset_id: as000001}, {asset_id: as000002}]\n")
        refused = run_worker("run", str(job), "--resume", str(run_dir))
        assert refused.returncode == 2
        assert "changed since this run started" in refused.stderr
        forced = run_worker("run", str(job), "--resume", str(run_dir), "--force")
        assert forced.returncode == 0, forced.stderr
        assert len(results(run_dir)) == 2


def test_confirmation_and_dry_run(tmp_path: Path) -> None:
    """Over 1,000 targets without a TTY or --yes: exit 2, nothing sent. A dry run searches a
    sample and cancels nothing."""
    with simulator_process("--devices", "1200") as url:
        job = csv_job(tmp_path, 1200, "{rate: 1000}")
        refused = run_worker("run", str(job), "--gateway", url)
        assert refused.returncode == 2
        assert "--yes" in refused.stderr
        assert sim_get(url, "/_sim/stats")["business_calls"] == 0
        dry = run_worker("run", str(job), "--gateway", url, "--dry-run", "--sample", "8")
        assert dry.returncode == 0, dry.stderr
        assert "searched 8 random targets of 1,200" in dry.stdout
        stats = sim_get(url, "/_sim/stats")
        assert stats["by_action"] == {"search": 8}
        assert not any(d["cancel_calls"] for d in sim_get(url, "/_sim/devices"))
        wrong = worker_env(ENOS_APP_SECRET="wrong")
        denied = run_worker("run", str(job), "--gateway", url, "--dry-run", env=wrong)
        assert denied.returncode == 3
        assert "wrong" not in denied.stdout + denied.stderr


@pytest.mark.anyio
async def test_internal_error_ends_resumably(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug mid-run (here: the 10th result write fails) ends the run with exit 3, the results
    already written intact and the summary saying why; a resume then completes it."""
    written = RunRecorder.result
    calls = {"n": 0}

    def failing_result(self: RunRecorder, result: object) -> None:
        calls["n"] += 1
        if calls["n"] == 10:
            raise OSError(28, "No space left on device")
        written(self, result)  # type: ignore[arg-type]

    monkeypatch.setattr(RunRecorder, "result", failing_result)
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(50))
    job = write_job(tmp_path, "limits: {rate: 1000, concurrency: 1}\ntargets:\n" + lines)
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 3
    stopped = summary(tmp_path / "run")
    assert "No space left on device" in stopped["stop_message"]
    assert sum(stopped["outcomes"].values()) == 9
    monkeypatch.setattr(RunRecorder, "result", written)
    code, _ = await resume_job(job, gateway, tmp_path / "run")
    assert code == 0
    assert_one_line_per_target(tmp_path / "run", 50)


@pytest.mark.anyio
async def test_outage_stops_the_run_before_targets_fail(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """Every request fails (5xx): the run stops after a run of failures with no success, before
    the outage marks more than a handful of targets failed; once the gateway recovers, a resume
    with --retry-failed completes it."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(40))
    job = write_job(
        tmp_path, "limits: {rate: 1000, concurrency: 4, attempts: 5}\ntargets:\n" + lines
    )
    sim.faults = Faults(error_rate=1.0)
    code, report = await run_job(job, gateway, tmp_path / "run")
    assert code == 3
    stopped = summary(tmp_path / "run")
    assert "requests in a row" in stopped["stop_message"]
    assert stopped["outcomes"]["failed"] <= 4  # at most one per worker
    assert stopped["not_attempted"] + stopped["outcomes"]["failed"] == 40
    assert "--resume" in report
    sim.faults = Faults()
    code, _ = await resume_job(job, gateway, tmp_path / "run", retry_failed=True)
    assert code == 0
    assert summary(tmp_path / "run")["outcomes"]["failed"] == 0
