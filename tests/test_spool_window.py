"""The spool watcher and change control: a job waiting for its window is not claimed (it holds
no slot), one whose window has ended is refused with why, a run stopped at its window's close
waits in running/ for the next opening; and ``worker ctl SPOOL rate N`` is carried out by a
real watcher (its shared limiter, SPOOL/status.json)."""

from __future__ import annotations

import shutil
import signal
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import orjson
import pytest

from tests.changes import Clock, job_file, run_new, summary
from tests.conftest import APP_KEY, APP_SECRET
from tests.simproc import run_worker, simulator_process
from tests.test_spool import drop, settled, start_watch, watcher
from worker.app.ctl import control
from worker.sim.simulator import Simulator, serve

pytestmark = pytest.mark.anyio


def _iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


async def test_a_job_waiting_for_its_window_stays_unclaimed_and_an_ended_one_is_refused(
    tmp_path: Path,
) -> None:
    """Three jobs: one whose window is open runs; one whose window opens tomorrow stays in
    incoming/ unclaimed (no run directory, nothing sent for it); one whose window ended
    yesterday goes to failed/ (exit 2, "its window has ended"), so watch --once exits 1; the
    next watch --once, with only the job waiting for its window, exits 4 (try again later)."""
    now = datetime.now(UTC)
    day = timedelta(days=1)
    spool = tmp_path / "spool"
    open_now = f"{{not_before: '{_iso(now - day)}', not_after: '{_iso(now + day)}'}}"
    tomorrow = f"{{not_before: '{_iso(now + day)}'}}"
    ended = f"{{not_after: '{_iso(now - day)}'}}"
    for name, window in (("now", open_now), ("later", tomorrow), ("ended", ended)):
        drop(spool, name, 0, 20, limits=f"{{concurrency: 4}}\nwindow: {window}")
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=40, seed=7)
    async with serve(sim) as url:
        assert await watcher(spool, url).run() == 1
        assert await watcher(spool, url).run() == 4
    assert list(settled(spool, "done")) == ["now"]
    refused = settled(spool, "failed")
    assert list(refused) == ["ended"]
    assert refused["ended"]["exit_code"] == 2
    error = next((spool / "failed").glob("ended*.error.txt")).read_text()
    assert "its window has ended" in error
    assert [p.name for p in (spool / "incoming").iterdir()] == ["later.yaml"]
    assert not [p for p in (spool / "runs").iterdir() if p.name.startswith("later")]


async def test_a_run_stopped_at_its_windows_close_waits_in_running(tmp_path: Path) -> None:
    """A spooled run that stopped when its window closed (exit 4, "window closed", the next
    opening in its summary) is neither adopted nor filed while the window is shut: it stays
    in running/, nothing is sent, and watch --once exits 4."""
    spool = tmp_path / "spool"
    drop(spool, "seed", 0, 1)  # makes the spool's folders
    (spool / "incoming" / "seed.yaml").unlink()
    nightly = "limits: {rate: 20}\nwindow:\n  daily: '02:00-04:00'\n  timezone: Europe/Berlin\n"
    job = job_file(tmp_path, nightly, assets=100, name="nightly.yaml")
    claimed = spool / "running" / "nightly.yaml"
    shutil.copyfile(job, claimed)
    berlin_359 = datetime(2027, 6, 10, 1, 59, 59, tzinfo=UTC).timestamp()  # 03:59:59 CEST
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=200, seed=7)
    async with serve(sim) as url:
        code, _ = await run_new(claimed, url, spool / "runs" / "nightly", clock=Clock(berlin_359))
        assert code == 4
        assert summary(spool / "runs" / "nightly")["stopped"] == "window closed"
        sent = sim.stats_snapshot()["business_calls"]
        assert await watcher(spool, url).run() == 4
        assert sim.stats_snapshot()["business_calls"] == sent
    assert claimed.exists()
    assert not settled(spool, "done")
    assert not settled(spool, "failed")


def test_worker_ctl_sets_a_live_watchers_shared_rate(tmp_path: Path) -> None:
    """worker ctl SPOOL rate 40 against a running `worker watch`: acknowledged (exit 0), the
    watcher's status file shows the rate; a pause on the spool is refused (exit 2)."""
    spool = tmp_path / "spool"
    with simulator_process("--devices", "20") as url:
        watch = start_watch(spool, url, "--create", "--rate", "10")
        try:
            status = spool / "status.json"
            deadline = time.monotonic() + 30  # the watcher writes it as it starts
            while not status.exists():
                assert watch.poll() is None, "the watcher ended"
                assert time.monotonic() < deadline, "no status file"
                time.sleep(0.01)
            done = run_worker("ctl", str(spool), "rate", "40")
            assert done.returncode == 0, done.stdout + done.stderr
            assert "rate done" in done.stdout
            assert orjson.loads(status.read_bytes())["rate"]["allowed"] == 40
            refused = run_worker("ctl", str(spool), "pause")
            assert refused.returncode == 2
        finally:
            watch.send_signal(signal.SIGTERM)
            watch.communicate(timeout=30)
    assert watch.returncode == 0


async def test_a_spooled_job_waiting_for_its_promotion_lends_its_job_slot(tmp_path: Path) -> None:
    """A watcher of one job slot: a staged job waits for its promotion after stage 1 and lends
    its slot, so the next job runs and finishes meanwhile; worker ctl promote on the staged
    job's run directory takes it on to the end."""
    spool = tmp_path / "spool"
    staged = "{concurrency: 4}\nstages: [{targets: 5, wait_for_promotion: true}, {percent: 100}]"
    drop(spool, "a-staged", 0, 40, limits=staged)
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=100, seed=7)
    async with serve(sim) as url, anyio.create_task_group() as group:
        watch = watcher(spool, url, once=False, jobs=1)
        group.start_soon(watch.run)
        runs = spool / "runs"
        with anyio.fail_after(30):
            while not any(
                (run / "status.json").exists()
                and orjson.loads((run / "status.json").read_bytes()).get("state")
                == "waiting for promotion of stage 1"
                for run in (runs.iterdir() if runs.exists() else ())
            ):
                await anyio.sleep(0.02)
        drop(spool, "b-plain", 50, 20)  # the staged job holds no slot while it waits
        with anyio.fail_after(30):
            while "b-plain" not in settled(spool, "done"):
                await anyio.sleep(0.02)
        (staged_run,) = [run for run in runs.iterdir() if run.name.startswith("a-staged")]
        code = await anyio.to_thread.run_sync(lambda: control([staged_run], "promote", None))
        assert code == 0
        with anyio.fail_after(30):
            while "a-staged" not in settled(spool, "done"):
                await anyio.sleep(0.02)
        watch.drain("the test is over")
    assert {name: record["exit_code"] for name, record in settled(spool, "done").items()} == {
        "a-staged": 0,
        "b-plain": 0,
    }
