"""Many assets per call against the real simulator, in every list behaviour it can show: every
target's claim is checked against what the gateway really did."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.runs import results, run_job, summary, write_job
from tests.simproc import run_worker, sim_get, simulator_process
from tests.test_operate import assert_one_line_per_target, kill_9_midway
from worker.errors import JobFileError
from worker.jobs.parse import load_job
from worker.jobs.plan import plan
from worker.report.auditverify import verify
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio


def pending(sim: Simulator, asset: str) -> set[str]:
    """The cached (state 1) command ids of a device; none for an unknown asset."""
    device = sim.store.find(ORG, asset, None, None)
    if device is None:
        return set()
    return {c.command_id for c in device.commands.values() if c.state == 1}


def fleet_job(tmp_path: Path, assets: list[str], per_call: int, rate: int = 1500) -> Path:
    lines = "".join(f"  - asset_id: {a}\n" for a in assets)
    body = f"limits: {{rate: {rate}, concurrency: 16, assets_per_call: {per_call}}}\n"
    return write_job(tmp_path, body + f"targets:\n{lines}")


def assert_truthful(
    lines: list[dict[str, Any]], before: dict[str, set[str]], sim: Simulator
) -> None:
    """No claim beyond what the gateway did; what it did is claimed, or admitted unknown."""
    for line in lines:
        asset = line["target"]["asset_id"]
        done = before[asset] - pending(sim, asset)
        claimed = set(line["cancelled_command_ids"])
        assert claimed <= done, line
        if claimed != done:
            assert line["effect_unknown"], line


@pytest.mark.parametrize(
    ("mode", "trust"),
    [("strict", "trusted"), ("lenient", "trusted"), ("off", "single"), ("first", "single")],
)
async def test_every_list_behaviour_ends_with_every_target_right(
    tmp_path: Path, mode: str, trust: str
) -> None:
    count = 1500
    sim = Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=count,
        commands=3,
        seed=7,
        faults=Faults(multi_asset=mode),
    )
    assets = [f"as{i:06d}" for i in range(count)]
    before = {a: pending(sim, a) for a in assets}
    async with serve(sim) as url:
        code, report = await run_job(fleet_job(tmp_path, assets, 25), url, tmp_path / "run")
    assert code == 0, report
    lines = results(tmp_path / "run")
    assert len(lines) == count
    assert not any(pending(sim, a) for a in assets)  # everything asked for is gone
    assert_truthful(lines, before, sim)
    assert not any(line["effect_unknown"] for line in lines)  # no answer was lost
    result = summary(tmp_path / "run")
    assert result["batching"]["trust"] == trust
    cancels = sim.stats.by_action["cancel"]
    if trust == "trusted":
        assert cancels < count / 3, cancels  # most went 25 to a call
        assert max(line["batch_size"] for line in lines) == 25
    else:
        assert cancels <= 1.3 * count  # a gateway without lists costs little more
        assert result["batching"]["notes"]
    assert "assets per call" in report
    assert "assets per call" in (tmp_path / "run" / "report.html").read_text(encoding="utf-8")
    assert verify(RunDir(tmp_path / "run")).results == count


async def test_an_unknown_asset_in_a_list_fails_alone(tmp_path: Path) -> None:
    """Strict lists: the unknown id fails the whole call; bisection finds it in a few calls,
    and every other target of the list is cancelled."""
    sim = Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=100,
        commands=2,
        seed=3,
        faults=Faults(multi_asset="strict"),
    )
    assets = [f"as{i:06d}" for i in range(24)]
    assets.insert(13, "nosuchasset")
    before = {a: pending(sim, a) for a in assets}
    job = write_job(
        tmp_path,
        "limits: {rate: 5000, assets_per_call: 25}\ntargets:\n"
        + "".join(f"  - asset_id: {a}\n" for a in assets),
    )
    async with serve(sim) as url:
        code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 1  # one target failed
    by_asset = {line["target"]["asset_id"]: line for line in results(tmp_path / "run")}
    assert (by_asset["nosuchasset"]["outcome"], by_asset["nosuchasset"]["code"]) == (
        "failed",
        99404,
    )
    assert not any(pending(sim, a) for a in assets)
    assert all(by_asset[a]["outcome"] != "failed" for a in assets if a != "nosuchasset")
    assert_truthful(list(by_asset.values()), before, sim)
    assert sim.stats.by_action["cancel"] <= 1 + 2 * 5  # 2 * ceil(log2 25) more than one call


async def test_lost_answers_to_lists_are_admitted_unknown(tmp_path: Path) -> None:
    """Answers lost after the cancel took effect: the list is retried whole, finds nothing,
    and its targets say the effect is unknown; no claim is ever beyond what was done."""
    count = 600
    sim = Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=count,
        commands=2,
        seed=11,
        faults=Faults(multi_asset="lenient", drop_rate=0.2),
    )
    assets = [f"as{i:06d}" for i in range(count)]
    before = {a: pending(sim, a) for a in assets}
    async with serve(sim) as url:
        code, report = await run_job(
            fleet_job(tmp_path, assets, 20), url, tmp_path / "run", attempts=8
        )
    assert code == 0, report
    lines = results(tmp_path / "run")
    assert len(lines) == count
    assert not any(pending(sim, a) for a in assets)
    assert_truthful(lines, before, sim)
    unknown_lists = [line for line in lines if line["effect_unknown"] and line["batch_size"] > 1]
    assert unknown_lists  # some lists' answers were lost, and said so
    assert all(line["outcome"] == "nothing_to_cancel" for line in unknown_lists)


async def test_lists_longer_than_the_gateway_takes_are_shortened(tmp_path: Path) -> None:
    count = 800
    sim = Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=count,
        commands=1,
        seed=5,
        faults=Faults(multi_asset="strict", max_assets=10),
    )
    assets = [f"as{i:06d}" for i in range(count)]
    async with serve(sim) as url:
        code, report = await run_job(fleet_job(tmp_path, assets, 25), url, tmp_path / "run")
    assert code == 0, report
    assert not any(pending(sim, a) for a in assets)
    batching = summary(tmp_path / "run")["batching"]
    assert 2 <= batching["size"] <= 10
    assert any("lists are now" in note for note in batching["notes"])


def test_kill_9_during_a_batched_run_then_resume(tmp_path: Path) -> None:
    """Exactly one line per target across both segments; nothing left pending."""
    count = 5000
    with simulator_process("--devices", str(count), "--multi-asset", "strict") as url:
        lines = "".join(f"as{i:06d}\n" for i in range(count))
        (tmp_path / "t.csv").write_text("asset_id\n" + lines, encoding="utf-8")
        job = write_job(
            tmp_path,
            "targets_file: t.csv\nlimits: {rate: 100, concurrency: 8, assets_per_call: 25}\n",
        )
        run_dir = tmp_path / "run"
        # Past the trial (about 3 s at 100 calls/s), while lists of 25 are in flight.
        kill_9_midway(job, url, run_dir, random.Random(4).randint(1000, 3000))
        done = run_worker("run", str(job), "--resume", str(run_dir), "--yes")
        assert done.returncode == 0, done.stderr
        assert_one_line_per_target(run_dir, count)
        devices = sim_get(url, "/_sim/devices")
        assert all(state != 1 for d in devices for state in d["commands"].values())
        assert verify(RunDir(run_dir)).results == count
        written = results(run_dir)
        assert max(line["batch_size"] for line in written) == 25
        unknown = [line for line in written if line["effect_unknown"]]
        assert len(unknown) <= (8 + 8) * 25  # lists in flight, and the mark one concurrency ahead


def test_job_files_refuse_a_comma_in_an_asset_id_and_too_long_lists(tmp_path: Path) -> None:
    comma = write_job(tmp_path, "targets:\n  - asset_id: 'a1,a2'\n", "comma.yaml")
    with pytest.raises(JobFileError, match="comma in its asset_id"):
        load_job(comma)
    (tmp_path / "t.csv").write_text('asset_id\nok1\n"b1,b2"\n', encoding="utf-8")
    from_file = write_job(tmp_path, "targets_file: t.csv\n", "file.yaml")
    loaded = load_job(from_file)
    with pytest.raises(JobFileError, match=r"t\.csv:3: has a comma"):
        plan(loaded)
    too_many = write_job(
        tmp_path, "limits: {assets_per_call: 101}\ntargets:\n  - asset_id: a\n", "many.yaml"
    )
    with pytest.raises(JobFileError, match=r"limits\.assets_per_call.*above 100"):
        load_job(too_many)


def test_validate_shows_the_calls_a_batched_run_plans(tmp_path: Path) -> None:
    lines = "".join(f"  - asset_id: a{i}\n" for i in range(60))
    job = write_job(tmp_path, f"targets:\n{lines}  - product_key: p\n    device_key: d\n")
    shown = run_worker("validate", str(job), "--assets-per-call", "25")
    assert shown.returncode == 0, shown.stderr
    assert "up to 25" in shown.stdout
    assert "4 cancel calls for 61 targets" in shown.stdout
    refused = run_worker("validate", str(job), "--assets-per-call", "0")
    assert refused.returncode == 2
    assert "--assets-per-call 0" in refused.stderr


async def test_lists_under_random_5xx_drops_and_429s_stay_truthful(tmp_path: Path) -> None:
    """Lists through a flaky gateway (5xx, answers lost after the effect, a rate cap): every
    target ends with one line, nothing is left pending, and no claim goes beyond the effect."""
    count = 800
    faults = Faults(multi_asset="strict", error_rate=0.15, drop_rate=0.1, rate_cap=400)
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=count, commands=2, seed=21, faults=faults)
    assets = [f"as{i:06d}" for i in range(count)]
    before = {a: pending(sim, a) for a in assets}
    async with serve(sim) as url:
        code, report = await run_job(
            fleet_job(tmp_path, assets, 20, rate=1000), url, tmp_path / "run", attempts=10
        )
    assert code == 0, report
    lines = results(tmp_path / "run")
    assert len(lines) == count
    assert len({line["target"]["asset_id"] for line in lines}) == count
    assert not any(pending(sim, a) for a in assets)
    assert_truthful(lines, before, sim)
    assert max(line["batch_size"] for line in lines) == 20
    assert verify(RunDir(tmp_path / "run")).results == count
