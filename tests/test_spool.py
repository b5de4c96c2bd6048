"""`worker watch SPOOL`: job files dropped in are claimed once, run, and settled; a crash or a
drain leaves them resumable; two watchers never run the same job."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import answer, gateway, served
from tests.runs import results
from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from tests.test_cluster import free_port
from worker.app import run as app_run
from worker.app import watch as watch_module
from worker.app.metrics import MetricsAddress
from worker.app.spool import SPOOL_DIRS, open_spool, waiting
from worker.app.watch import Watcher, WatchOptions
from worker.jobs.plan import run_targets
from worker.model import Credentials, Limits, Target, TargetResult
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store.journal import ResultJournal
from worker.store.layout import RunDir
from worker.store.lock import run_dir_lock

pytestmark = pytest.mark.anyio


def drop(spool: Path, name: str, first: int, count: int, limits: str = "{concurrency: 8}") -> None:
    """A job over devices as{first}.. with its targets in SPOOL/targets/, dropped in atomically
    (written beside incoming/, then renamed in), as a producer should."""
    open_spool(spool, create=True)
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


def watcher(spool: Path, url: str, *, once: bool = True, jobs: int = 2) -> Watcher:
    return Watcher(
        WatchOptions(
            spool,
            Credentials(APP_KEY, APP_SECRET),
            Limits(rate=1000),
            gateway=url,
            jobs=jobs,
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
        assert await watcher(spool, url).run() == 1  # with once: a job went to failed/
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


def written_lines(spool: Path) -> int:
    """Complete lines in every run directory's journal so far (read while a watcher writes
    them: the last line may be half written, and is not counted)."""
    runs = spool / "runs"
    journals = (run / "results.jsonl" for run in runs.iterdir()) if runs.exists() else ()
    return sum(path.read_bytes().count(b"\n") for path in journals if path.exists())


def wait_for_journal(process: subprocess.Popen[str], spool: Path, lines: int) -> None:
    """Wait (bounded) until the watcher's runs have journalled `lines` results; a watcher
    that ends or makes no progress is killed before the test fails."""
    deadline = time.monotonic() + 60
    while written_lines(spool) < lines:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            _, err = process.communicate()
            raise AssertionError(f"the watcher ended or made no progress: {err[-2000:]}")
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


class _Listing:
    """A directory listing taken before its files change (what os.scandir can return)."""

    def __init__(self, entries: list[os.DirEntry[str]]) -> None:
        self.entries = entries

    def __iter__(self) -> Iterator[os.DirEntry[str]]:
        return iter(self.entries)

    def __enter__(self) -> _Listing:
        return self

    def __exit__(self, *_: object) -> None:
        return None


async def test_a_job_file_gone_between_listing_and_stat_is_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another watcher claims a file after incoming/ was listed and before it is looked at:
    the watcher skips it and goes on (it used to die of FileNotFoundError)."""
    spool = tmp_path / "spool"
    drop(spool, "stays", 0, 5)
    drop(spool, "taken", 5, 5)
    real = os.scandir

    def listing_then_claimed(path: str | Path) -> _Listing:
        entries = list(real(path))
        if Path(path).name == "incoming" and (spool / "incoming" / "taken.yaml").exists():
            (spool / "incoming" / "taken.yaml").rename(tmp_path / "taken-elsewhere.yaml")
        return _Listing(entries)

    monkeypatch.setattr(os, "scandir", listing_then_claimed)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        assert await watcher(spool, url).run() == 0
    assert sorted(settled(spool, "done")) == ["stays"]


def _targets_end_early(monkeypatch: pytest.MonkeyPatch) -> None:
    """The run's stream of targets ends after ten (a reader that swallowed an error)."""
    real = run_targets

    def cut(*args: Any, **kwargs: Any) -> Iterator[tuple[int, Target]]:
        for number, item in enumerate(real(*args, **kwargs)):
            if number == 10:
                return
            yield item

    monkeypatch.setattr(app_run, "run_targets", cut)


def _journal_write_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fifth journal line cannot be written (a disk error)."""
    real = ResultJournal.write
    written = 0

    def failing(self: ResultJournal, result: TargetResult) -> None:
        nonlocal written
        written += 1
        if written == 5:
            raise OSError(5, "Input/output error")
        real(self, result)

    monkeypatch.setattr(ResultJournal, "write", failing)


def _segment_end_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """The segment's summary cannot be written: the exception leaves `execute` itself."""

    def failing(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(app_run, "write_summary", failing)


@pytest.mark.parametrize("fault", [_targets_end_early, _journal_write_fails, _segment_end_fails])
async def test_a_segment_cut_short_is_never_filed_as_finished(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: Callable[[pytest.MonkeyPatch], None]
) -> None:
    """A segment ended by an exception, or by a stream of targets cut short, goes to failed/
    (finished: false, with its error file), never to done/ as "finished, exit 1"; --once
    exits 1."""
    spool = tmp_path / "spool"
    drop(spool, "cut", 0, 60, "{concurrency: 2}")
    fault(monkeypatch)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=60, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert settled(spool, "done") == {}
    record = settled(spool, "failed")["cut"]
    assert record["finished"] is False
    assert record["exit_code"] != 0
    assert not list((spool / "running").iterdir())
    error = next((spool / "failed").glob("cut.*.error.txt")).read_text()
    assert "--resume" in error


async def test_a_targets_file_still_being_written_is_not_planned(tmp_path: Path) -> None:
    """The job file is old enough to claim, but its targets file is still growing: the job
    waits until the file has been still for --unchanged-for seconds, then runs all of it."""
    spool = tmp_path / "spool"
    drop(spool, "growing", 0, 20)
    old = time.time() - 120
    os.utime(spool / "incoming" / "growing.yaml", (old, old))
    targets = spool / "targets" / "growing.csv"
    async with (
        serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=60, seed=7)) as url,
        anyio.create_task_group() as group,
    ):
        watch = Watcher(replace(watcher(spool, url).options, quiet_s=1.0))
        codes: list[int] = []

        async def watching() -> None:
            codes.append(await watch.run())

        group.start_soon(watching)
        for first in (20, 40):  # the producer appends twice, 0.3 s apart
            await anyio.sleep(0.3)
            with targets.open("a") as stream:
                stream.write("".join(f"as{i:06d}\n" for i in range(first, first + 20)))
    assert codes == [0]
    assert len(journalled(spool)) == 60


async def test_a_job_that_crashes_goes_to_failed_with_why(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while a job is prepared no longer leaves it in running/ for ever: failed/, with
    an error file naming the kind of error (not its text), and the watcher goes on."""
    spool = tmp_path / "spool"
    drop(spool, "unlucky", 0, 5)

    def bug(*_: object, **__: object) -> None:
        raise RuntimeError("a bug with /private/things in its message")

    monkeypatch.setattr(watch_module, "start_new", bug)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert not list((spool / "running").iterdir())
    assert settled(spool, "failed")["unlucky"]["exit_code"] == 3
    error = next((spool / "failed").glob("unlucky.*.error.txt")).read_text()
    assert "internal error (RuntimeError)" in error
    assert "/private/things" not in error


async def test_a_job_whose_run_directory_cannot_be_used_goes_to_failed(tmp_path: Path) -> None:
    """A job left in running/ whose run directory is a plain file, and one whose run.json
    cannot be read: both go to failed/ with why; neither stays in running/."""
    spool = tmp_path / "spool"
    for name in ("blocked", "garbled"):
        drop(spool, name, 0, 5)
        claimed = spool / "running" / f"{name}.20260101T000000Z-abcdef.yaml"
        (spool / "incoming" / f"{name}.yaml").rename(claimed)
    (spool / "runs" / "blocked.20260101T000000Z-abcdef").write_text("not a directory\n")
    garbled = spool / "runs" / "garbled.20260101T000000Z-abcdef"
    garbled.mkdir()
    (garbled / "run.json").write_text("{not json")
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert not list((spool / "running").iterdir())
    assert sorted(settled(spool, "failed")) == ["blocked", "garbled"]
    blocked_error = next((spool / "failed").glob("blocked.*.error.txt")).read_text()
    assert "cannot make its run directory" in blocked_error
    garbled_error = next((spool / "failed").glob("garbled.*.error.txt")).read_text()
    assert ": not resumed: " in garbled_error
    assert "is not a run directory (no readable run.json)" in garbled_error


async def test_a_job_held_by_a_live_watcher_is_skipped_not_failed(tmp_path: Path) -> None:
    """A job in running/ whose run directory another live process holds is left to it: not
    run, not filed; once the holder lets go, it is resumed."""
    spool = tmp_path / "spool"
    drop(spool, "held", 0, 5)
    claimed = spool / "running" / "held.20260101T000000Z-abcdef.yaml"
    (spool / "incoming" / "held.yaml").rename(claimed)
    run = RunDir(spool / "runs" / claimed.stem)
    run.path.mkdir()
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        watch = watcher(spool, url)
        codes: list[int] = []

        async def watching() -> None:
            codes.append(await watch.run())

        with run_dir_lock(run):  # another watcher runs it
            async with anyio.create_task_group() as group:
                group.start_soon(watching)
                await anyio.sleep(0.5)
                assert claimed.exists()
                assert settled(spool, "failed") == {}
                assert not run.results.exists()
                group.cancel_scope.cancel()
        assert await watch.run() == 0  # the lock is released: resumed, finished
    assert settled(spool, "done")["held"]["exit_code"] == 0


def test_watch_once_exits_1_when_a_job_went_to_failed(tmp_path: Path) -> None:
    """A cron entry sees a failed job: `worker watch --once` exits 1 (0 when all went well)."""
    spool = tmp_path / "spool"
    drop(spool, "good", 0, 5)
    with simulator_process("--devices", "10") as url:
        clean = start_watch(spool, url, "--once", "--unchanged-for", "0")
        _, err = clean.communicate(timeout=60)
        assert clean.returncode == 0, err
        (spool / "incoming" / "bad.yaml").write_text("version: 1\nname: [oops\n")
        dirty = start_watch(spool, url, "--once", "--unchanged-for", "0")
        _, err = dirty.communicate(timeout=60)
    assert dirty.returncode == 1, err
    assert settled(spool, "failed")["bad"]["exit_code"] == 2


def test_watch_refuses_a_spool_that_does_not_exist_unless_create(tmp_path: Path) -> None:
    """A mistyped spool is refused (exit 2, naming it); --create makes it and its folders;
    inside an existing spool a missing folder is made as before."""
    spool = tmp_path / "no-such-spool"
    refused = run_worker("watch", str(spool), "--gateway", "http://127.0.0.1:9", "--once")
    assert refused.returncode == 2
    assert str(spool) in refused.stderr
    assert "--create" in refused.stderr
    assert not spool.exists()
    made = run_worker("watch", str(spool), "--gateway", "http://127.0.0.1:9", "--once", "--create")
    assert made.returncode == 0, made.stderr
    assert sorted(p.name for p in spool.iterdir() if p.is_dir()) == sorted(SPOOL_DIRS)
    (spool / "done").rmdir()
    again = run_worker("watch", str(spool), "--gateway", "http://127.0.0.1:9", "--once")
    assert again.returncode == 0, again.stderr
    assert (spool / "done").is_dir()


def test_watch_help_shows_the_watchers_own_exit_codes() -> None:
    """`worker watch --help` lists the watcher's codes, not a run's."""
    shown = run_worker("watch", "--help")
    assert shown.returncode == 0
    text = " ".join(shown.stdout.split())
    assert "1 with --once, a job of this pass went to failed/" in text
    assert "2 bad usage: no gateway (--gateway or ENOS_GATEWAY), no spool" in text
    assert "4 drained by SIGINT/SIGTERM with jobs left in running/" in text
    assert "some targets failed" not in text


async def test_a_job_that_spends_the_quota_waits_in_running_not_failed(tmp_path: Path) -> None:
    """A spooled job whose run spends the gateway's day quota (exit 4, "quota") is neither
    filed under failed/ nor resumed at once: it stays in running/ and --once ends with exit 4
    (resumable: try again after the reset). A watcher started later learns it from the run
    directory and claims no new job before the reset."""
    spool = tmp_path / "spool"
    drop(spool, "first", 0, 60)
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=200, seed=7)
    sim.faults = Faults(quota="second=100,day=30/3600")  # a one-hour "day" of 30 calls
    async with serve(sim) as url:
        assert await watcher(spool, url).run() == 4
        drop(spool, "second", 100, 10)
        assert await watcher(spool, url).run() == 4  # a new watcher: the quota is still spent
    assert not settled(spool, "failed")
    assert not settled(spool, "done")
    assert [p.name.split(".")[0] for p in (spool / "running").glob("*.yaml")] == ["first"]
    assert [p.name for p in (spool / "incoming").iterdir()] == ["second.yaml"]  # not claimed
    run = next(p for p in (spool / "runs").iterdir() if p.name.startswith("first"))
    summary = orjson.loads((run / "summary.json").read_bytes())
    assert (summary["stopped"], summary["outcomes"]["failed"]) == ("quota", 0)
    assert summary["quota_reset_at"]
