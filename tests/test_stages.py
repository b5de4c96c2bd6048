"""Staged rollout behind verify gates: a stable sample across the fleet (seeded by the job,
shared by shards), stage after stage, and gates that pass, that fail on a collateral cancel,
on a command pending again (not on one created after the cancel) and on too many failures;
a promotion; a resume after a failed gate; kill -9 in a gate's verify and in a promotion
wait."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from tests.changes import (
    cancels_then,
    each_once,
    job_file,
    lines,
    new_pending,
    records,
    run_new,
    run_resumed,
    status,
    summary,
)
from tests.conftest import APP_KEY, APP_SECRET
from tests.simproc import run_worker, simulator_process, worker_env
from worker.app.ctl import control
from worker.app.staged import plan_stages, stage_problem
from worker.enos import protocol as p
from worker.jobs.parse import load_job
from worker.jobs.plan import plan, run_targets
from worker.jobs.stages import Sample
from worker.model import Shard
from worker.report.auditverify import AuditBroken, verify
from worker.sim.simulator import Simulator, serve
from worker.sim.state import SimDevice
from worker.store.layout import RunDir, read_manifest

THREE = "stages: [{targets: 10}, {percent: 40}, {percent: 100}]\n"


def simulator(commands: int = 3) -> Simulator:
    return Simulator(apps={APP_KEY: APP_SECRET}, devices=400, commands=commands, seed=7)


def stage_sets(job_path: Path, shard: Shard | None = None) -> list[set[str]]:
    """Each stage's targets (asset ids) as a run of the job takes them."""
    job = load_job(job_path)
    made = plan(job, shard)
    items = plan_stages(job, made)["items"]
    sample = Sample(job.name, tuple(int(item["cut"], 16) for item in items))
    found: list[set[str]] = [set() for _ in items]
    for _, target in run_targets(job, made):
        found[sample.stage_of(target.key())].add(target.asset_id or "")
    return found


def stage_of_line(run_dir: Path) -> Callable[[str], int]:
    stages = read_manifest(RunDir(run_dir)).stages
    assert stages is not None
    sample = Sample(stages["seed"], tuple(int(i["cut"], 16) for i in stages["items"]))
    return lambda asset: sample.stage_of(f"o15541858646501\x1f{asset}\x1f\x1f\x1f")


def test_the_sample_is_stable_spread_and_shared_by_shards(tmp_path: Path) -> None:
    """Stage 1 of 50 targets is 50 targets spread over the file (not its first lines), the
    same when the file's order changes, another under another job name; 5 % of 1,000 reach
    50 more; four shards' stage 1 together are the job's stage 1."""
    assets = [f"as{i:06d}" for i in range(1000)]
    body = "stages: [{targets: 50}, {percent: 10}, {percent: 100}]\ntargets_file: t.csv\n"
    (tmp_path / "t.csv").write_text("asset_id\n" + "\n".join(assets) + "\n")
    job = job_file(tmp_path, body)
    first, second, rest = stage_sets(job)
    assert (len(first), len(second), len(rest)) == (50, 50, 900)
    assert len(first & set(assets[:50])) < 20  # a sample, not the top of the file
    shuffled = assets[:]
    random.Random(3).shuffle(shuffled)
    (tmp_path / "t.csv").write_text("asset_id\n" + "\n".join(shuffled) + "\n")
    assert stage_sets(job)[0] == first
    other = tmp_path / "other.yaml"
    other.write_text(job.read_text().replace("name: change", "name: another"))
    assert stage_sets(other)[0] != first
    shards = [stage_sets(job, Shard(k, 4)) for k in range(4)]
    assert set().union(*(s[0] for s in shards)) == first
    assert sum(len(s[0]) for s in shards) == 50


@pytest.mark.anyio
async def test_a_staged_run_goes_stage_by_stage_through_gates_that_pass(tmp_path: Path) -> None:
    """Every stage's targets before the next stage's; a gate record after each, its evidence
    file hashed into it; the summary and the report show the stages; the audit verifies (and
    finds an edited evidence file)."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 1000}\n" + THREE, assets=100)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, _ = await run_new(job, url, run_dir)
    assert code == 0
    each_once(run_dir, 100)
    stage_of = stage_of_line(run_dir)
    order = [stage_of(line["target"]["asset_id"]) for line in lines(run_dir / "results.jsonl")]
    assert order == sorted(order)
    assert order.count(0) == 10
    assert order.count(1) == 30
    gates = records(run_dir, "gate")
    assert [(g["stage"], g["passed"], g["targets"]) for g in gates] == [
        (1, True, 10),
        (2, True, 30),
        (3, True, 60),
    ]
    stages = summary(run_dir)["stages"]
    assert [i["state"] for i in stages["items"]] == ["passed", "passed", "passed"]
    assert stages["current"] == 0
    page = (run_dir / "report.html").read_text(encoding="utf-8")
    assert "stage 2 gate passed" in page
    assert verify(RunDir(run_dir)).changes == 6  # three stages started, three gates
    evidence = run_dir / gates[0]["evidence"]
    evidence.write_bytes(evidence.read_bytes() + b"{}\n")
    with pytest.raises(AuditBroken, match="does not hash as stage 1's gate record says"):
        verify(RunDir(run_dir))


@pytest.mark.anyio
async def test_a_gate_fails_on_a_collateral_cancel_and_a_forced_resume_goes_on(
    tmp_path: Path,
) -> None:
    """A gateway that cancels one more command than the one named (a kept one): stage 1's gate
    fails (exit 3) before stage 2 sends anything, with the collateral in the summary; a
    resume needs --force; with it the stage's gate is checked again, the collateral counted
    as acknowledged, and the run goes on."""
    sim = simulator()
    body = "limits: {rate: 1000}\nmatch: {tsl_identifier: restart}\n" + THREE
    job = job_file(tmp_path, body, assets=100)
    run_dir = tmp_path / "run"
    hit: list[str] = []

    def greedy(device: SimDevice, named: list[str]) -> None:
        if hit or not named:
            return
        kept = [c for c in device.commands.values() if c.state == 1]
        if kept:
            kept[0].state = p.CommandState.CANCELED  # not in the answer
            hit.append(f"{device.asset_id} {kept[0].command_id}")

    async with serve(sim) as url:
        with cancels_then(greedy):
            code, _ = await run_new(job, url, run_dir)
        assert code == 3
        done = summary(run_dir)
        assert done["stopped"] == "aborted"
        assert "stage 1's gate failed" in done["stop_message"]
        gate = done["stages"]["items"][0]["gate"]
        assert (gate["passed"], gate["collateral"], gate["pending_count"]) == (False, hit, 0)
        assert [i["state"] for i in done["stages"]["items"]] == ["failed", "pending", "pending"]
        assert len(lines(run_dir / "results.jsonl")) == 10  # nothing of stage 2
        assert "collateral" in (run_dir / "report.html").read_text(encoding="utf-8")
        problem = stage_problem(
            load_job(job), read_manifest(RunDir(run_dir)), begun=True, force=False
        )
        assert problem is not None
        assert "resume with --force" in problem
        refused = run_worker(
            "run", str(job), "--resume", str(run_dir), env=worker_env(ENOS_GATEWAY=url)
        )
        assert refused.returncode == 2
        assert "stage 1's gate failed" in refused.stderr
        assert "nothing was sent" in refused.stderr
        code, _ = await run_resumed(job, url, run_dir, force=True)
    assert code == 0
    each_once(run_dir, 100)
    resumed = [r for r in records(run_dir, "stage") if r["event"] == "gate failed, resumed"]
    assert resumed[0]["note"] == "resumed with --force; 1 collateral acknowledged"
    second_gate = records(run_dir, "gate")[1]
    assert (second_gate["stage"], second_gate["passed"], second_gate["acknowledged"]) == (
        1,
        True,
        hit,
    )
    verify(RunDir(run_dir))


@pytest.mark.anyio
async def test_a_gate_fails_on_a_command_pending_again_not_on_one_created_after(
    tmp_path: Path,
) -> None:
    """One cancel is answered but not applied (its command pending again); on every other
    device a new command is created right after the cancel: the gate counts the first only."""
    sim = simulator()
    job = job_file(tmp_path, "limits: {rate: 1000}\n" + THREE, assets=100)
    run_dir = tmp_path / "run"
    back: list[str] = []

    def undo_one(device: SimDevice, named: list[str]) -> None:
        if named and not back:
            device.commands[named[0]].state = p.CommandState.CREATED
            back.append(f"{device.asset_id} {named[0]}")
        else:
            new_pending(device, f"9{time.time_ns()}")

    async with serve(sim) as url:
        with cancels_then(undo_one):
            code, _ = await run_new(job, url, run_dir)
    assert code == 3
    gate = records(run_dir, "gate")[0]
    assert (gate["passed"], gate["pending"], gate["collateral_count"]) == (False, back, 0)
    assert gate["reasons"] == [
        "1 command(s) that a cancel reply of this stage named are pending again"
    ]


@pytest.mark.anyio
async def test_failures_above_a_stages_threshold_fail_its_gate(tmp_path: Path) -> None:
    """Ten unknown devices of 100 (10 % failed): a gate letting 5 % through fails, one
    letting 20 % through passes (the run then ends as any run with failures: exit 1)."""
    sim = simulator()
    unknown = "".join(f"  - asset_id: zz{i}\n" for i in range(10))
    for limit, expected in ((5, 3), (20, 1)):
        body = (
            f"limits: {{rate: 1000}}\nstages: [{{percent: 100, max_failed_percent: {limit}}}]\n"
            + "targets:\n"
            + "".join(f"  - asset_id: as{i:06d}\n" for i in range(90))
            + unknown
        )
        job = job_file(tmp_path, body, name=f"j{limit}.yaml")
        async with serve(sim) as url:
            code, _ = await run_new(job, url, tmp_path / f"run{limit}")
        assert code == expected
        gate = records(tmp_path / f"run{limit}", "gate")[0]
        assert (gate["failed"], gate["failed_percent"]) == (10, 10.0)


@pytest.mark.anyio
async def test_a_stage_waits_for_its_promotion(tmp_path: Path) -> None:
    """After stage 1's gate the run waits (sending nothing), says so in the status file, and
    goes on when worker ctl promote comes; the promotion is an audit record."""
    sim = simulator()
    body = (
        "limits: {rate: 1000}\nstages: [{targets: 5, wait_for_promotion: true}, {percent: 100}]\n"
    )
    job = job_file(tmp_path, body, assets=50)
    run_dir = tmp_path / "run"
    async with serve(sim) as url, anyio.create_task_group() as group:
        ended: list[tuple[int, str]] = []

        async def run() -> None:
            ended.append(await run_new(job, url, run_dir))

        group.start_soon(run)
        with anyio.fail_after(15):
            while status(run_dir).get("state") != "waiting for promotion of stage 1":
                await anyio.sleep(0.02)
        calls = sim.stats.business_calls
        await anyio.sleep(0.5)
        assert sim.stats.business_calls == calls
        assert status(run_dir)["stage"]["state"] == "waiting for promotion"
        assert len(lines(run_dir / "results.jsonl")) == 5
        code = await anyio.to_thread.run_sync(lambda: control([run_dir], "promote", None))
        assert code == 0
        with anyio.fail_after(15):
            while not ended:
                await anyio.sleep(0.02)
    assert ended[0][0] == 0
    each_once(run_dir, 50)
    assert [r["action"] for r in records(run_dir, "control")] == ["promote"]
    events = [(r["stage"], r["event"]) for r in records(run_dir, "stage")]
    assert events == [(1, "started"), (1, "waiting for promotion"), (1, "promoted"), (2, "started")]


@pytest.mark.slow
def test_kill_9_in_a_gates_verify_and_in_a_promotion_wait(tmp_path: Path) -> None:
    """kill -9 while stage 1's gate waits out its settle delay: the resume runs the gate
    again; kill -9 while the stage waits for its promotion: the resume waits again, sending
    nothing, until worker ctl promote; then every target once, the audit whole."""
    body = "limits: {rate: 500}\nstages: [{targets: 5, wait_for_promotion: true}, {percent: 100}]\n"
    job = job_file(tmp_path, body, assets=40)
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "100") as url:
        env = worker_env(ENOS_GATEWAY=url)
        command = [sys.executable, "-m", "worker", "run", str(job), "--out", str(run_dir)]
        _kill_when(command, env, run_dir, "verifying stage 1")
        assert _stage_state(run_dir) == "verifying"
        resume = [*command[:4], str(job), "--resume", str(run_dir)]
        _kill_when(resume, env, run_dir, "waiting for promotion of stage 1")
        assert _stage_state(run_dir) == "waiting for promotion"
        assert len(lines(run_dir / "results.jsonl")) == 5
        last = subprocess.Popen(
            resume, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            _until(
                lambda: (
                    status(run_dir).get("pid") == last.pid
                    and status(run_dir).get("state") == "waiting for promotion of stage 1"
                )
            )
            promoted = run_worker("ctl", str(run_dir), "promote", env=env)
            assert promoted.returncode == 0, promoted.stdout + promoted.stderr
            assert last.wait(timeout=60) == 0
        finally:
            if last.poll() is None:
                last.kill()
    each_once(run_dir, 40)
    gates = records(run_dir, "gate")
    assert [(g["stage"], g["passed"]) for g in gates] == [(1, True), (2, True)]
    assert verify(RunDir(run_dir)).segments == 3


def _kill_when(command: list[str], env: dict[str, str], run_dir: Path, state: str) -> None:
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _until(
            lambda: (
                status(run_dir).get("pid") == process.pid and status(run_dir).get("state") == state
            )
        )
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()


def _stage_state(run_dir: Path) -> str:
    stages = read_manifest(RunDir(run_dir)).stages
    assert stages is not None
    return stages["items"][0]["state"]


def _until(predicate: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
