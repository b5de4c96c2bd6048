"""The verify sweep: after a run, is anything the job asked to cancel still pending?"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.runs import results, run_job, summary, write_job
from tests.simproc import run_worker, simulator_process
from worker.app.sweep import verify_run
from worker.app.wiring import RunOptions
from worker.enos import protocol as p
from worker.model import Credentials, Limits
from worker.report.auditverify import verify
from worker.sim.simulator import Simulator, serve
from worker.sim.state import SimCommand
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio


def sweep_options(url: str, run_dir: Path) -> RunOptions:
    return RunOptions(
        url,
        Credentials(APP_KEY, APP_SECRET),
        Limits(rate=2000),
        RunDir(run_dir),
        seed=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.1,
        verify_settle_s=0.0,
    )


def lines(run_dir: Path) -> dict[str, dict[str, Any]]:
    found = [orjson.loads(x) for x in (run_dir / "verify.jsonl").read_bytes().splitlines()]
    return {line["target"]["asset_id"]: line for line in found}


def device(sim: Simulator, asset: str) -> Any:
    found = sim.store.find(ORG, asset, None, None)
    assert found is not None
    return found


async def test_a_clean_run_is_verified_and_a_reappearing_command_is_caught(
    tmp_path: Path,
) -> None:
    """All cancelled: verified. Then one cancelled command shows as pending again (a gateway
    that answered but did not apply it) and a new command is created after the run: the
    first is still pending, the second is another command, not a failure."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=200, commands=3, seed=7)
    assets = [f"as{i:06d}" for i in range(30)]
    job = write_job(
        tmp_path,
        "limits: {rate: 2000}\ntargets:\n" + "".join(f"  - asset_id: {a}\n" for a in assets),
    )
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        assert (await run_job(job, url, run_dir))[0] == 0
        out = io.StringIO()
        assert await verify_run(sweep_options(url, run_dir), out) == 0
        assert "30 of 30 targets verified" in out.getvalue()
        first = lines(run_dir)
        assert all(line["verified"] is True for line in first.values())
        assert all(line["request_id"] for line in first.values())  # the search's answer
        cancelled = {
            line["target"]["asset_id"]: line["cancelled_command_ids"]
            for line in results(run_dir)
            if line["cancelled_command_ids"]
        }
        back_asset, back_ids = next(iter(cancelled.items()))
        device(sim, back_asset).commands[back_ids[0]].state = p.CommandState.CREATED
        other = assets[-1]
        sim.store.create_command(
            device(sim, other),
            SimCommand(
                "9999999999999999999", p.CommandState.CREATED, int(time.time() * 1000) + 5000
            ),
        )
        assert await verify_run(sweep_options(url, run_dir), io.StringIO()) == 1
    second = lines(run_dir)
    assert (second[back_asset]["verified"], second[back_asset]["still_pending"]) == (
        False,
        [back_ids[0]],
    )
    assert (second[other]["verified"], second[other]["other_pending"]) == (True, 1)
    counts = summary(run_dir)["verify"]
    assert (counts["checked"], counts["still_pending"], counts["commands_pending"]) == (30, 1, 1)
    assert counts["complete"] is True
    assert "still pending" in (run_dir / "report.html").read_text(encoding="utf-8")
    assert verify(RunDir(run_dir)).results == 30  # the audit still verifies after a sweep


async def test_one_command_and_selective_targets_check_what_they_asked_for(
    tmp_path: Path,
) -> None:
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=50, commands=4, seed=7)
    chosen = sorted(
        c.command_id for c in device(sim, "as000002").commands.values() if c.state == 1
    )[0]
    job = write_job(
        tmp_path,
        "limits: {rate: 2000}\ntargets:\n"
        f"  - asset_id: as000002\n    command_id: '{chosen}'\n"
        "  - asset_id: as000004\n    match: {tsl_identifier: restart}\n",
    )
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        assert (await run_job(job, url, run_dir))[0] == 0
        assert await verify_run(sweep_options(url, run_dir), io.StringIO()) == 0
    found = lines(run_dir)
    one, selective = found["as000002"], found["as000004"]
    assert one["verified"] is True
    assert one["other_pending"] >= 1  # the device's other cached commands were not asked for
    assert selective["verified"] is True
    assert selective["other_pending"] >= 1  # kept: they did not match


def test_run_with_verify_and_worker_verify_from_the_command_line(tmp_path: Path) -> None:
    with simulator_process("--devices", "100") as url:
        job = write_job(
            tmp_path,
            "limits: {rate: 2000}\ntargets:\n"
            + "".join(f"  - asset_id: as{i:06d}\n" for i in range(20)),
        )
        run_dir = tmp_path / "run"
        done = run_worker(
            "run", str(job), "--gateway", url, "--out", str(run_dir), "--yes", "--verify"
        )
        assert done.returncode == 0, done.stderr
        assert "20 of 20 targets verified" in done.stdout
        assert summary(run_dir)["verify"]["verified"] == 20
        again = run_worker("verify", str(run_dir))
        assert again.returncode == 0, again.stderr
        missing = run_worker("verify", str(tmp_path))
        assert missing.returncode == 2
        assert "not a run directory" in missing.stderr
