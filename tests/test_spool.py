"""`worker watch SPOOL`: job files dropped in are claimed once, run, and settled; a crash or a
drain leaves them resumable; two watchers never run the same job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import answer, gateway, served
from tests.runs import results
from tests.simproc import sim_get, simulator_process, worker_env
from tests.test_cluster import free_port
from worker.app.metrics import MetricsAddress
from worker.app.watch import Watcher, WatchOptions, prepare, waiting
from worker.model import Credentials, Limits
from worker.sim.simulator import Simulator, serve

pytestmark = pytest.mark.anyio


def drop(spool: Path, name: str, first: int, count: int, limits: str = "{concurrency: 8}") -> None:
    """A job over devices as{first}.. with its targets in SPOOL/targets/, dropped in atomically
    (written beside incoming/, then renamed in), as a producer should."""
    prepare(spool)
    (spool / "targets").mkdir(exist_ok=True)
    rows = "".join(f"as{i:06d}\n" for i in range(first, first + count))
    (spool / "targets" / f"{name}.csv").write_text("asset_id\n" + rows)
    staging = spool / f".{name}.yaml"
    staging.write_text(
        f"version: 1\nname: {name}\norg_id: {ORG}\nlimits: {limits}\n"
        f"targets_file: ../targets/{name}.csv\n"
    )
    staging.rename(spool / "incoming" / f"{name}.yaml")


def settled(spool: Path, where: str) -> dict[str, dict[str, object]]:
    """Job name (before the claim suffix) -> its exit record, for done/ or failed/."""
    found = {}
    for path in (spool / where).glob("*.exit.json"):
        found[path.name.split(".")[0]] = orjson.loads(path.read_bytes())
    return found


def journalled(spool: Path) -> Counter[str]:
    """Every asset id in every run directory's journal."""
    return Counter(
        line["target"]["asset_id"]
        for run in (spool / "runs").iterdir()
        if (run / "results.jsonl").exists()
        for line in results(run)
    )


def watcher(spool: Path, url: str, *, once: bool = True) -> Watcher:
    return Watcher(
        WatchOptions(
            spool,
            Credentials(APP_KEY, APP_SECRET),
            Limits(rate=1000),
            gateway=url,
            jobs=2,
            poll_s=0.05,
            once=once,
            quiet_s=0.0,
            backoff_base_s=0.01,
            backoff_cap_s=0.1,
        )
    )


async def test_three_jobs_and_a_bad_one_are_all_settled(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for number in range(3):
        drop(spool, f"job{number}", number * 100, 100)
    (spool / "incoming" / "broken.yaml").write_text("version: 1\nname: [oops\n")
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=400, seed=7)
    async with serve(sim) as url:
        assert await watcher(spool, url).run() == 0
    done = settled(spool, "done")
    assert sorted(done) == ["job0", "job1", "job2"]
    assert {record["exit_code"] for record in done.values()} == {0}
    assert sorted(p.name.split(".")[0] for p in (spool / "done").glob("*.yaml")) == sorted(done)
    failed = settled(spool, "failed")
    assert failed["broken"]["exit_code"] == 2
    assert "broken" in next((spool / "failed").glob("*.error.txt")).name
    assert not list((spool / "incoming").iterdir())
    assert not list((spool / "running").iterdir())
    counts = journalled(spool)
    assert len(counts) == 300
    assert set(counts.values()) == {1}


def start_watch(spool: Path, url: str, *flags: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker",
            "watch",
            str(spool),
            "--gateway",
            url,
            "--poll",
            "0.05",
            *flags,
        ],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for_journal(process: subprocess.Popen[str], spool: Path, lines: int) -> None:
    """Wait (bounded) until the watcher's runs have journalled `lines` results."""
    deadline = time.monotonic() + 60
    while sum(journalled(spool).values()) < lines if (spool / "runs").exists() else True:
        assert process.poll() is None, "the watcher ended before the point of interruption"
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.01)


def test_kill_9_during_a_job_then_a_restart_finishes_it_exactly_once(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    drop(spool, "big", 0, 3000, "{concurrency: 8}")
    with simulator_process("--devices", "3000") as url:
        first = start_watch(spool, url, "--rate", "1000")
        wait_for_journal(first, spool, 800)
        first.kill()
        first.communicate()
        assert list((spool / "running").glob("big.*.yaml"))  # still claimed, not settled
        second = start_watch(spool, url, "--rate", "3000", "--once")
        _, err = second.communicate(timeout=120)
        assert second.returncode == 0, err
        devices = sim_get(url, "/_sim/devices")
    counts = journalled(spool)
    assert len(counts) == 3000
    assert set(counts.values()) == {1}
    assert settled(spool, "done")["big"]["exit_code"] == 0
    assert all(state != 1 for d in devices for state in d["commands"].values())


def test_sigterm_drains_and_the_job_stays_resumable(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    drop(spool, "slow", 0, 600)
    with simulator_process("--devices", "600") as url:
        process = start_watch(spool, url, "--rate", "100")
        wait_for_journal(process, spool, 50)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert process.returncode == 4, err
        assert list((spool / "running").glob("slow.*.yaml"))
        again = start_watch(spool, url, "--rate", "3000", "--once")
        _, err = again.communicate(timeout=60)
        assert again.returncode == 0, err
    assert settled(spool, "done")["slow"]["exit_code"] == 0
    assert len(journalled(spool)) == 600


def test_two_watchers_on_one_spool_never_run_the_same_job(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    for number in range(6):
        drop(spool, f"job{number}", number * 200, 200)
    with simulator_process("--devices", "1200") as url:
        watchers = [start_watch(spool, url, "--rate", "2000", "--once") for _ in range(2)]
        for process in watchers:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        devices = sim_get(url, "/_sim/devices")
    assert sorted(settled(spool, "done")) == [f"job{n}" for n in range(6)]
    assert len(list((spool / "done").glob("*.yaml"))) == 6
    runs = [run for run in (spool / "runs").iterdir() if (run / "run.json").exists()]
    assert len(runs) == 6  # one run per job
    assert all(len(orjson.loads((run / "run.json").read_bytes())["segments"]) == 1 for run in runs)
    counts = journalled(spool)
    assert len(counts) == 1200
    assert set(counts.values()) == {1}
    assert {d["cancel_calls"] for d in devices} == {1}  # no job was run twice


async def test_the_watcher_serves_metrics_of_its_jobs(tmp_path: Path) -> None:
    """A scrape while a spooled job's calls are held: the job is running, its requests are
    counted, the shared rate is shown; a drain then leaves the job resumable (exit 4)."""
    arrived, release = anyio.Event(), anyio.Event()
    calls = 0

    async def commands(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls > 3:
            arrived.set()
            await release.wait()
        return web.Response(body=answer([]), content_type="application/json")

    spool = tmp_path / "spool"
    drop(spool, "held", 0, 10)
    port = free_port()
    async with served(gateway(commands)) as url, anyio.create_task_group() as group:
        watch = Watcher(
            WatchOptions(
                spool,
                Credentials(APP_KEY, APP_SECRET),
                Limits(rate=1000),
                gateway=url,
                poll_s=0.05,
                quiet_s=0.0,
                metrics=MetricsAddress("127.0.0.1", port),
            )
        )
        codes: list[int] = []

        async def watching() -> None:
            codes.append(await watch.run())

        group.start_soon(watching)
        await arrived.wait()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
        watch.drain("the test is done")
        release.set()
    assert "worker_jobs_running 1.0" in text
    assert 'worker_requests_total{action="cancel",code="0",http_status="200"} 3.0' in text
    assert "worker_rate_allowed 1000.0" in text
    assert codes == [4]
    assert list((spool / "running").glob("held.*.yaml"))


def test_a_job_file_still_being_written_is_not_claimed(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    drop(spool, "fresh", 0, 1)
    drop(spool, "older", 0, 1)
    older = spool / "incoming" / "older.yaml"
    os.utime(older, (time.time() - 120, time.time() - 120))
    assert waiting(spool, quiet_s=60) == ["older.yaml"]
    assert sorted(waiting(spool)) == ["fresh.yaml", "older.yaml"]
