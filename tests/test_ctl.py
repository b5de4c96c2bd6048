"""worker ctl: live control of a running run through its run directory. Pause, resume and a
new rate as the gateway sees them (arrival times at the simulator), stop, a rate capped at a
known budget and one split between runs, the answers when no run is live or a request is
refused, a spool's rate for its watcher, and a kill -9 during a pause."""

from __future__ import annotations

import fcntl
import io
import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests.changes import (
    each_once,
    job_file,
    lines,
    options,
    records,
    run_new,
    run_resumed,
    status,
    summary,
)
from tests.conftest import APP_KEY, APP_SECRET
from tests.fakes import FakeCanceller, MemoryRecorder, assets
from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from worker.app import wiring
from worker.app.ctl import control, parse_words
from worker.app.prepare import snapshot_targets, start_new
from worker.app.run import RunControl, execute
from worker.app.spoolctl import carry_out_spool_requests, watching
from worker.budget import read_budget
from worker.core.engine import Engine
from worker.core.ports import EngineSettings, Progress
from worker.core.ratelimit import RateLimiter
from worker.errors import UsageError
from worker.jobs.parse import load_job
from worker.model import Limits
from worker.report.auditverify import verify
from worker.report.console import ProgressLine
from worker.sim.simulator import Simulator, serve
from worker.store.control import ControlRequest, RequestResult, send_request, take_requests
from worker.store.layout import RunDir, read_manifest
from worker.store.lock import run_dir_lock

pytestmark = pytest.mark.anyio
STATED_25 = {"X-RateLimit-Limit-Second": "25", "X-RateLimit-Remaining-Second": "25"}


def simulator() -> Simulator:
    return Simulator(apps={APP_KEY: APP_SECRET}, devices=2000, commands=1, seed=7)


async def wait_for(predicate: Callable[[], bool], seconds: float = 15.0) -> None:
    with anyio.fail_after(seconds):
        while not predicate():
            await anyio.sleep(0.02)


async def ctl(*words: str, value: float | None = None) -> tuple[int, str]:
    """worker ctl as a command would run it (in a thread: it waits for the run's answer)."""
    *dirs, action = words
    out = io.StringIO()
    code = await anyio.to_thread.run_sync(
        lambda: control([Path(d) for d in dirs], action, value, out=out)
    )
    return code, out.getvalue()


def arrivals_between(sim: Simulator, start: float, end: float) -> int:
    return sum(start <= moment < end for moment in sim.stats.arrivals)


async def test_pause_resume_and_rate_during_a_run_as_the_gateway_sees_them(tmp_path: Path) -> None:
    """Paused: nothing arrives at the gateway; a new rate of 60/s: about 60 arrive a second;
    stop: exit 4, resumable; every request an audit record and a line of the report's
    timeline; the resume finishes, each target once."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 20, concurrency: 4}\n", assets=900)
    run_dir = tmp_path / "run"
    async with serve(sim) as url, anyio.create_task_group() as group:
        ended: list[tuple[int, str]] = []

        async def run() -> None:
            ended.append(await run_new(job, url, run_dir))

        group.start_soon(run)
        await wait_for(lambda: len(lines(run_dir / "results.jsonl")) >= 10)
        code, said = await ctl(str(run_dir), "pause")
        assert (code, said) == (0, f"{run_dir}: pause done; now paused True\n")
        paused = time.monotonic()
        await anyio.sleep(1.5)
        assert arrivals_between(sim, paused + 0.2, time.monotonic()) == 0
        now = status(run_dir)
        assert (now["state"], now["paused"], now["rate"]["cause"]) == (
            "paused by operator",
            True,
            "paused by operator",  # what the progress line shows after the rate
        )
        assert now["paused_by"]["by"]
        assert now["concurrency"]["allowed"] == 0
        assert read_manifest(RunDir(run_dir)).paused is not None  # a restart stays paused
        assert (await ctl(str(run_dir), "rate", value=60))[0] == 0
        assert (await ctl(str(run_dir), "resume"))[0] == 0
        resumed = time.monotonic()
        await anyio.sleep(2.6)
        measured = arrivals_between(sim, resumed + 0.5, resumed + 2.5) / 2.0
        assert 45 <= measured <= 66, measured
        assert status(run_dir)["rate"]["allowed"] == 60
        assert (await ctl(str(run_dir), "stop"))[0] == 0
        await wait_for(lambda: bool(ended))
    assert ended[0][0] == 4
    done = summary(run_dir)
    assert done["stopped"] == "interrupted"
    assert done["stop_message"].startswith("worker ctl stop by ")
    controls = records(run_dir, "control")
    assert [(r["action"], r["result"]) for r in controls] == [
        ("pause", "done"),
        ("rate", "done"),
        ("resume", "done"),
        ("stop", "done"),
    ]
    assert controls[1]["before"]["rate"] == 20
    assert controls[1]["after"] == {"rate": 60.0, "asked": 60.0}
    assert all(r["by"] and r["host"] and r["asked_at"] for r in controls)
    assert not list((run_dir / "control").iterdir())  # each request removed once carried out
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "worker ctl pause by" in page
    assert "worker ctl rate by" in page
    assert read_manifest(RunDir(run_dir)).limits.rate == 60  # a resume goes on at it
    async with serve(sim) as url:
        assert (await run_resumed(job, url, run_dir, rate=500))[0] == 0
    each_once(run_dir, 900)
    assert verify(RunDir(run_dir)).changes == 4


async def test_a_rate_above_the_gateways_budget_is_capped_and_one_for_runs_is_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A limiter that knows the gateway's budget (25/s) caps a rate asked above it, with a
    warning in the request's record; a rate for two runs is split evenly and says so."""
    known = wiring.limiter_for

    def with_budget(limits: Limits, wall: Callable[[], float] = time.time) -> RateLimiter:
        limiter = known(limits, wall)
        mid = int(time.time()) + 0.5  # mid-second: a reading near a boundary is not taken
        limiter.stated = read_budget(STATED_25, sent_at=mid, now=mid)
        limiter._budget_cap = 25.0  # as that stated budget would set it
        return limiter

    monkeypatch.setattr(wiring, "limiter_for", with_budget)
    sim = simulator()
    first = job_file(tmp_path, "limits: {rate: 10}\n", assets=400, name="a.yaml")
    second = job_file(tmp_path, "limits: {rate: 10}\n", assets=400, name="b.yaml")
    a, b = tmp_path / "a", tmp_path / "b"
    async with serve(sim) as url, anyio.create_task_group() as group:
        group.start_soon(lambda: run_new(first, url, a))
        group.start_soon(lambda: run_new(second, url, b))
        await wait_for(lambda: bool(status(a).get("state") == status(b).get("state") == "running"))
        code, said = await ctl(str(a), "rate", value=100)
        assert code == 0
        assert "(warning: capped at the gateway's stated budget, 25/s (asked 100/s))" in said
        assert status(a)["budget"]["allows_per_s"] == 25
        assert "second: 25 of 25 left" in status(a)["budget"]["stated"]
        assert status(a)["rate"]["allowed"] == 25
        (capped,) = records(a, "control")
        assert "capped at the gateway's stated budget, 25/s (asked 100/s)" in capped["note"]
        code, said = await ctl(str(a), str(b), "rate", value=30)
        assert code == 0
        assert said.splitlines()[0] == "30/s split evenly: 15/s for each of 2 runs"
        assert status(a)["rate"]["allowed"] == status(b)["rate"]["allowed"] == 15
        assert "split evenly" in records(b, "control")[0]["note"]
        await ctl(str(a), str(b), "stop")


async def test_no_live_run_refused_requests_and_bad_usage(tmp_path: Path) -> None:
    """ctl on a run that has ended: exit 1, nothing written; promote with no stage waiting:
    refused (exit 2) and recorded; an unreadable request file is refused and recorded; words
    that make no request are usage errors."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 10}\n", assets=200)
    run_dir = tmp_path / "run"
    async with serve(sim) as url, anyio.create_task_group() as group:
        group.start_soon(lambda: run_new(job, url, run_dir))
        await wait_for(lambda: status(run_dir).get("state") == "running")
        code, said = await ctl(str(run_dir), "promote")
        assert code == 2
        assert "refused: no stage is waiting for promotion (the job has no stages)" in said
        junk = run_dir / "control" / "00000000000000000001-junk.json"
        junk.write_text("{not json")
        await wait_for(lambda: not junk.exists())
        assert (await ctl(str(run_dir), "stop"))[0] == 0
    assert [(r["action"], r["result"]) for r in records(run_dir, "control")] == [
        ("promote", "refused: no stage is waiting for promotion (the job has no stages)"),
        ("unreadable", "refused: the request cannot be read (not JSON)"),
        ("stop", "done"),
    ]
    code, said = await ctl(str(run_dir), "pause")
    assert (code, said) == (1, f"{run_dir}: no live run holds it; nothing sent\n")
    assert not list((run_dir / "control").iterdir())
    assert (await ctl(str(run_dir), "status"))[0] == 1  # and says its last status
    for words in (["pause"], [str(run_dir), "rate"], [str(run_dir), "jump"], ["x", "rate", "0"]):
        with pytest.raises(UsageError):
            parse_words(words)
    assert parse_words(["a", "b", "rate", "30"]) == ([Path("a"), Path("b")], "rate", 30.0)
    with pytest.raises(UsageError, match="not a run directory"):
        control([tmp_path], "pause", None)


async def test_a_spools_rate_is_its_watchers(tmp_path: Path) -> None:
    """On a spool only the rate: the request goes to SPOOL/control/ for the watcher holding
    SPOOL/watch.lock (no watcher: no live run, exit 1); a watcher that does not carry it out
    within the timeout gets it taken back; pause on a spool is a usage error."""
    spool = tmp_path / "spool"
    for name in ("incoming", "running", "runs", "done", "failed"):
        (spool / name).mkdir(parents=True)
    assert control([spool], "rate", 10.0, out=io.StringIO()) == 1
    with pytest.raises(UsageError, match="is a spool"):
        control([spool], "pause", None)
    fd = os.open(spool / "watch.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_SH)  # a watcher (that does not read its control/ yet)
    try:
        out = io.StringIO()
        assert control([spool], "rate", 10.0, timeout=0.3, out=out) == 1
        assert "the request was taken back, nothing was done" in out.getvalue()
        assert not list((spool / "control").iterdir())
    finally:
        os.close(fd)


async def test_a_watcher_that_serves_its_control_directory_acknowledges_a_rate(
    tmp_path: Path,
) -> None:
    """What the spool watcher has to do for worker ctl SPOOL rate N (app/spoolctl.py): hold
    SPOOL/watch.lock, carry out SPOOL/control/ twice a second; then ctl is acknowledged and
    the shared limiter has the rate; anything but a rate is refused there."""
    spool = tmp_path / "spool"
    for name in ("incoming", "running", "runs", "done", "failed"):
        (spool / name).mkdir(parents=True)
    limiter, results = RateLimiter(10), deque[RequestResult](maxlen=32)
    with watching(spool):
        async with anyio.create_task_group() as group:

            async def watcher() -> None:
                while True:
                    carry_out_spool_requests(spool, limiter, results)
                    await anyio.sleep(0.5)

            group.start_soon(watcher)
            assert await ctl(str(spool), "rate", value=40) == (
                0,
                f"{spool}: rate done; now rate 40.0\n",
            )
            send_request(spool / "control", request("pause"))
            await wait_for(lambda: len(results) == 2)
            group.cancel_scope.cancel()
    assert limiter.rate == 40
    assert results[1]["result"] == "refused: pause acts on a job's run directory (SPOOL/runs/NAME)"
    assert status(spool)["rate"]["allowed"] == 40


def request(action: str, **extra: Any) -> ControlRequest:
    found: ControlRequest = {
        "id": f"{time.time_ns():020d}-test",
        "action": action,
        "by": "tester",
        "host": "here",
        "pid": 1,
        "at": "2026-01-01T00:00:00.000Z",
    }
    found.update(extra)  # type: ignore[typeddict-item]
    return found


@pytest.mark.slow
def test_kill_9_during_a_pause_and_the_restart_stays_paused(tmp_path: Path) -> None:
    """A paused run killed with -9: run.json keeps the pause; the resumed run waits, paused,
    sending nothing (not even a token), until worker ctl resume; then every target once."""
    job = job_file(tmp_path, "limits: {rate: 20, concurrency: 4}\n", assets=120)
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "200") as url:
        env = worker_env(ENOS_GATEWAY=url)
        command = [sys.executable, "-m", "worker", "run", str(job), "--out", str(run_dir)]
        first = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _until(lambda: len(lines(run_dir / "results.jsonl")) >= 10)
            paused = run_worker("ctl", str(run_dir), "pause", env=env)
            assert paused.returncode == 0, paused.stdout + paused.stderr
            _until(lambda: status(run_dir).get("state") == "paused by operator")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
        finally:
            if first.poll() is None:
                first.kill()
        assert read_manifest(RunDir(run_dir)).paused is not None
        before = sim_get(url, "/_sim/stats")
        resume = [*command[:4], str(job), "--resume", str(run_dir)]
        second = subprocess.Popen(
            resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _until(
                lambda: (
                    status(run_dir).get("state") == "paused by operator"
                    and status(run_dir).get("pid") == second.pid
                )
            )
            time.sleep(1.0)
            after = sim_get(url, "/_sim/stats")
            assert (after["business_calls"], after["token_requests"]) == (
                before["business_calls"],
                before["token_requests"],
            )
            resumed = run_worker("ctl", str(run_dir), "resume", env=env)
            assert resumed.returncode == 0, resumed.stdout + resumed.stderr
            assert second.wait(timeout=60) == 0
        finally:
            if second.poll() is None:
                second.kill()
    each_once(run_dir, 120)
    checked = verify(RunDir(run_dir))
    assert checked.segments == 2
    assert [r["action"] for r in records(run_dir, "control")] == ["pause", "resume"]


def _until(predicate: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_requests_are_taken_in_order_and_a_taken_one_survives_a_crash(tmp_path: Path) -> None:
    """Two requests sent within a second are both there, oldest first; a request a dead
    process had taken is handed out again (carried out again, never lost)."""
    directory = tmp_path / "control"
    first = send_request(directory, request("pause"))
    second = send_request(directory, request("rate", value=5))
    taken = take_requests(directory)
    assert [t.request["action"] for t in taken if t.request] == ["pause", "rate"]
    assert not first.exists()
    assert not second.exists()
    taken[0].done()
    again = take_requests(directory)  # the rate was taken, not done: a crash, say
    assert [t.id for t in again] == [taken[1].id]


async def test_the_engine_takes_a_new_concurrency_and_a_pause_admits_nothing() -> None:
    """Lowered to 1, no more than one call is in flight; 0 (a pause) admits no target until
    raised again; never above the workers the run started with."""
    fake = FakeCanceller(gate=anyio.Event())
    recorder = MemoryRecorder()
    engine = Engine(fake, recorder, RateLimiter(None), EngineSettings(concurrency=4))
    async with anyio.create_task_group() as group:
        group.start_soon(engine.run, iter(assets(30)))
        await wait_for(lambda: fake.in_flight == 4)
        assert engine.set_concurrency(1) == 1
        assert fake.gate is not None
        fake.gate.set()
        fake.gate = anyio.Event()
        fake.most_in_flight = 0
        await wait_for(lambda: fake.in_flight == 1)
        assert engine.set_concurrency(0) == 0
        fake.gate.set()
        fake.gate = None
        await anyio.sleep(0.1)
        finished = len(recorder.results)
        await anyio.sleep(0.2)
        assert len(recorder.results) == finished < 30  # paused: nothing new
        assert fake.most_in_flight <= 1  # while it was 1
        assert engine.set_concurrency(99) == 4
    assert len(recorder.results) == 30


def test_the_limiter_holds_and_takes_a_rate_capped_at_its_budget() -> None:
    """Held: no slot (the progress line says why); released: slots again, without a burst;
    a rate above a known budget is capped; rate: auto stops probing at an operator's rate."""
    clock = [100.0]
    limiter = RateLimiter(10, clock=lambda: clock[0])
    limiter.hold(True)
    assert limiter.reserve() == (0.25, False)
    assert limiter.cause == "paused by operator"
    line = ProgressLine(Progress(), limiter, 10, 0, tty=True, started=0.0)
    assert "0 of 10/s (paused by operator)" in line.parts()
    clock[0] += 60  # a long pause does not turn into a burst of 600 slots
    limiter.hold(False)
    assert limiter.cause == "asked"
    assert limiter.reserve() == (0.0, True)
    assert limiter.reserve()[0] > 0
    limiter._budget_cap = 25.0  # as a stated budget of 25/s would set it
    assert limiter.set_rate(100) == 25.0
    assert limiter.rate == 25.0
    auto = RateLimiter(10, adaptive=True, ceiling=None, clock=lambda: clock[0])
    assert auto.set_rate(40) == 40
    assert not auto.adaptive
    assert auto.rate == 40


async def test_a_spooled_jobs_pause_is_its_own(tmp_path: Path) -> None:
    """A job run for the spool watcher shares the watcher's limiter: pausing it stops that
    job alone (its engine admits nothing), not the limiter the other jobs use; its rate is
    the watcher's (refused here)."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 50}\n", assets=300)
    run_dir = tmp_path / "run"
    shared = RateLimiter(50)
    async with serve(sim) as url, anyio.create_task_group() as group:
        ended: list[int] = []

        async def run() -> None:
            loaded = load_job(job)
            opts = options(url, run_dir, loaded.limits)
            run_dir.mkdir()
            with run_dir_lock(opts.run):
                start = snapshot_targets(
                    start_new(loaded, None, gateway=url, limits=opts.limits), opts.run
                )
                ended.append(
                    await execute(start, opts, out=io.StringIO(), control=RunControl(shared))
                )

        group.start_soon(run)
        await wait_for(lambda: len(lines(run_dir / "results.jsonl")) >= 10)
        assert (await ctl(str(run_dir), "pause"))[0] == 0
        assert not shared.held  # the other jobs go on
        await anyio.sleep(0.3)
        count = len(lines(run_dir / "results.jsonl"))
        await anyio.sleep(0.5)
        assert len(lines(run_dir / "results.jsonl")) == count
        code, said = await ctl(str(run_dir), "rate", value=5)
        assert code == 2
        assert "the rate of a spooled job is the watcher's" in said
        assert (await ctl(str(run_dir), "resume"))[0] == 0
        await wait_for(lambda: bool(ended))
    assert ended == [0]
