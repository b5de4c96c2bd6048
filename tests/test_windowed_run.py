"""A run with a window: it waits for the opening (sending nothing), stops at the close as
resumable (exit 4, "window closed", the next opening in the message and the summary), and
resumes in the next opening; on an injected clock, through a change of daylight saving time;
the deadline and the window together (the earlier wins); --no-wait; kill -9 during the wait."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import anyio
import pytest

from tests.changes import (
    Clock,
    each_once,
    job_file,
    lines,
    records,
    run_new,
    run_resumed,
    status,
    summary,
)
from tests.conftest import APP_KEY, APP_SECRET
from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from worker.cli.run import window_closed
from worker.jobs.parse import load_job
from worker.report.auditverify import verify
from worker.sim.simulator import Simulator, serve
from worker.store.layout import RunDir

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTLY = "window:\n  daily: '02:00-04:00'\n  timezone: Europe/Berlin\n"


def berlin(*parts: int, fold: int = 0) -> float:
    year, month, day, hour, minute, second = (*parts, 0, 0)[:6]
    return datetime(year, month, day, hour, minute, second, tzinfo=BERLIN, fold=fold).timestamp()


def simulator() -> Simulator:
    return Simulator(apps={APP_KEY: APP_SECRET}, devices=400, commands=2, seed=7)


async def wait_for(predicate: object, seconds: float = 10.0) -> None:
    """Until `predicate()` holds (a test's patience, not a product's timing)."""
    assert callable(predicate)
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.02)


@pytest.mark.anyio
async def test_a_run_waits_for_its_window_stops_at_the_close_and_resumes_in_the_next(
    tmp_path: Path,
) -> None:
    """The clock starts a little before 02:00 in Berlin: nothing is sent before the window
    opens; at 04:00 the run stops admitting (exit 4, "window closed", the next opening named);
    the next night's window takes the rest; each target once; the audit says it all."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 40, concurrency: 4}\n" + NIGHTLY, assets=300)
    run_dir = tmp_path / "run"
    clock = Clock(berlin(2026, 6, 10, 1, 59, 59) + 0.4)
    async with serve(sim) as url, anyio.create_task_group() as group:
        ended: list[tuple[int, str]] = []

        async def first() -> None:
            ended.append(await run_new(job, url, run_dir, clock=clock))

        group.start_soon(first)
        await wait_for(lambda: status(run_dir).get("state") == "waiting for the window")
        seen = sim.stats_snapshot()  # nothing before the window, not even the token
        assert (seen["business_calls"], seen["token_requests"]) == (0, 0)
        assert status(run_dir)["window"]["opens_at"] == "2026-06-10T00:00:00Z"
        await wait_for(lambda: len(lines(run_dir / "results.jsonl")) >= 20)
        clock.jump(berlin(2026, 6, 10, 4))
        await wait_for(lambda: bool(ended))
    code, _ = ended[0]
    assert code == 4
    done = summary(run_dir)
    assert done["stopped"] == "window closed"
    assert "it opens again Thu 2026-06-11 02:00 CEST" in done["stop_message"]
    assert done["window"]["opens_at"] == "2026-06-11T00:00:00Z"
    assert done["window"]["closed_at"] == "2026-06-10T02:00:00Z"
    assert done["resumable"] is True
    first_part = len(lines(run_dir / "results.jsonl"))
    assert 20 <= first_part < 300
    assert [r["event"] for r in records(run_dir, "window")] == ["waiting", "opened", "closed"]
    async with serve(sim) as url:  # the next night, in its window
        code, _ = await run_resumed(job, url, run_dir, clock=Clock(berlin(2026, 6, 11, 2, 30)))
    assert code == 0
    each_once(run_dir, 300)
    assert [r["event"] for r in records(run_dir, "window")][-1] == "open"
    checked = verify(RunDir(run_dir))
    assert checked.segments == 2
    assert checked.changes == 4


@pytest.mark.anyio
async def test_spring_forward_the_window_opens_at_the_jump(tmp_path: Path) -> None:
    """29 March 2026: at 01:59:59.6 CET the run waits; 0.4 s later the clock reads 03:00
    CEST and the window (02:00-04:00) is open: one hour that night, from the jump."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 200}\n" + NIGHTLY, assets=20)
    clock = Clock(berlin(2026, 3, 29, 1, 59, 59) + 0.6)
    async with serve(sim) as url:
        began = time.monotonic()
        code, _ = await run_new(job, url, tmp_path / "run", clock=clock)
    assert code == 0
    assert time.monotonic() - began < 5
    waiting, opened = records(tmp_path / "run", "window")
    assert waiting["opens_at"] == opened["opens_at"] == "2026-03-29T01:00:00Z"  # 03:00 CEST
    assert opened["closes_at"] == "2026-03-29T02:00:00Z"  # 04:00 CEST: one hour


@pytest.mark.anyio
async def test_fall_back_the_window_waits_for_the_second_two_oclock(tmp_path: Path) -> None:
    """25 October 2026 at 02:30 CEST (the first pass of the repeated hour): the window
    02:00-04:00 is not open yet; it opens at 02:00 CET, the repeated hour counted once."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 200}\n" + NIGHTLY, assets=20)
    run_dir = tmp_path / "run"
    clock = Clock(berlin(2026, 10, 25, 2, 30))  # fold 0: CEST, 00:30Z
    async with serve(sim) as url, anyio.create_task_group() as group:
        ended: list[tuple[int, str]] = []

        async def run() -> None:
            ended.append(await run_new(job, url, run_dir, clock=clock))

        group.start_soon(run)
        await wait_for(lambda: status(run_dir).get("state") == "waiting for the window")
        assert status(run_dir)["window"]["opens_at"] == "2026-10-25T01:00:00Z"  # 02:00 CET
        await anyio.sleep(0.5)
        assert not lines(run_dir / "results.jsonl")
        clock.jump(berlin(2026, 10, 25, 2, fold=1))
        await wait_for(lambda: bool(ended))
    assert ended[0][0] == 0
    assert records(run_dir, "window")[-1]["closes_at"] == "2026-10-25T03:00:00Z"  # 04:00 CET


@pytest.mark.anyio
async def test_the_deadline_and_the_window_the_earlier_wins(tmp_path: Path) -> None:
    """A deadline before the window's close stops the run as a deadline; a window that closes
    first stops it as "window closed"."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 20}\n" + NIGHTLY, assets=200)
    async with serve(sim) as url:
        code, _ = await run_new(
            job, url, tmp_path / "a", clock=Clock(berlin(2026, 6, 10, 3)), deadline=1.5, timeout=1
        )
        assert (code, summary(tmp_path / "a")["stopped"]) == (4, "deadline")
        code, _ = await run_new(
            job, url, tmp_path / "b", clock=Clock(berlin(2026, 6, 10, 3, 59, 59)), deadline=60
        )
        assert (code, summary(tmp_path / "b")["stopped"]) == (4, "window closed")
        began = time.monotonic()  # a deadline that comes before the window opens ends the wait
        code, _ = await run_new(
            job, url, tmp_path / "c", clock=Clock(berlin(2026, 6, 10, 12)), deadline=1
        )
        assert (code, summary(tmp_path / "c")["stopped"]) == (4, "deadline")
        assert time.monotonic() - began < 5
        assert not lines(tmp_path / "c" / "results.jsonl")


def test_no_wait_says_when_the_window_opens(tmp_path: Path) -> None:
    """--no-wait: a closed window is exit 4 with its opening, before anything is made or sent;
    an open one runs; a window that has ended is bad input."""
    job = load_job(job_file(tmp_path, NIGHTLY, assets=1))
    friday_noon = berlin(2026, 6, 12, 12)
    said = window_closed(job, no_wait=True, now=friday_noon)
    assert said is not None
    assert "opens Sat 2026-06-13 02:00 CEST (2026-06-13T00:00:00Z)" in said
    assert window_closed(job, no_wait=False, now=friday_noon) is None  # it waits instead
    assert window_closed(job, no_wait=True, now=berlin(2026, 6, 13, 3)) is None
    over = job_file(tmp_path, "window: {not_after: '2020-01-01T00:00:00Z'}\n", 1, "old.yaml")
    result = run_worker("run", str(over), "--out", str(tmp_path / "never"), "--no-wait")
    assert result.returncode == 2
    assert "has ended and does not open again" in result.stderr
    later = job_file(tmp_path, "window: {not_before: '2099-01-01T00:00:00Z'}\n", 1, "late.yaml")
    result = run_worker("run", str(later), "--out", str(tmp_path / "late"), "--no-wait")
    assert result.returncode == 4
    assert "2099-01-01T00:00:00Z" in result.stderr
    assert not (tmp_path / "late").exists()


@pytest.mark.slow
def test_kill_9_while_waiting_for_the_window_loses_nothing(tmp_path: Path) -> None:
    """kill -9 during the wait: nothing was sent or claimed; the audit is whole but for the
    dead segment; the resume waits again, then runs every target once."""
    opening = time.time() + 6
    stamp = datetime.fromtimestamp(opening, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    body = f"limits: {{rate: 200}}\nwindow: {{not_before: '{stamp}'}}\n"
    job = job_file(tmp_path, body, assets=30)
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "100") as url:
        env = worker_env(ENOS_GATEWAY=url)
        command = [sys.executable, "-m", "worker", "run", str(job), "--out", str(run_dir)]
        process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            deadline = time.monotonic() + 20
            while status(run_dir).get("state") != "waiting for the window":
                assert time.monotonic() < deadline, "the run never waited for its window"
                time.sleep(0.05)
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
        finally:
            if process.poll() is None:
                process.kill()
            assert process.stderr is not None
            process.stderr.close()
        assert sim_get(url, "/_sim/stats")["business_calls"] == 0
        assert not lines(run_dir / "results.jsonl")
        assert [r["type"] for r in lines(run_dir / "audit.jsonl")] == ["run_started", "window"]
        assert verify(RunDir(run_dir)).died
        result = run_worker("run", str(job), "--resume", str(run_dir), env=env)
        assert result.returncode == 0, result.stderr
        assert time.time() >= opening
    each_once(run_dir, 30)
    assert verify(RunDir(run_dir)).segments == 2
