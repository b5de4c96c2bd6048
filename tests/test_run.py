"""Whole runs against the simulator over HTTP: results match the gateway's final state."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.runs import results, run_job, summary, write_job
from worker.model import Credentials
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.sim.state import PRODUCT_KEYS, generated_command_id

pytestmark = pytest.mark.anyio


def pending_ids(sim: Simulator, index: int) -> set[str]:
    """The state-1 command ids of generated device `index` (materializing it)."""
    device = sim.store.find(ORG, f"as{index:06d}", None, None)
    assert device is not None
    return {c.command_id for c in device.commands.values() if c.state == 1}


def mixed_targets(indices: range) -> str:
    """Targets by asset id, by product/device key, and with one command id."""
    lines = ["targets:"]
    for i in indices:
        if i % 3 == 0:
            lines.append(f"  - {{product_key: {PRODUCT_KEYS[i % 4]}, device_key: dev_{i:06d}}}")
        elif i % 3 == 1:
            lines.append(f"  - {{asset_id: as{i:06d}, command_id: '{generated_command_id(i, 1)}'}}")
        else:
            lines.append(f"  - asset_id: as{i:06d}")
    return "\n".join(lines) + "\n"


async def test_mixed_run_matches_the_gateway_state(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """Each targeted state-1 command is cancelled and reported; nothing else is touched."""
    indices = range(1, 61)
    before = {i: pending_ids(sim, i) for i in indices}
    job = write_job(
        tmp_path, "limits: {rate: 500}\n" + mixed_targets(indices) + "  - asset_id: nosuch01\n"
    )
    code, report = await run_job(job, gateway, tmp_path / "run")
    assert code == 1  # the unknown device failed
    lines = results(tmp_path / "run")
    assert len(lines) == 61
    by_device = {(r["target"].get("asset_id") or r["target"]["device_key"]): r for r in lines}
    for i in indices:
        record = by_device.get(f"as{i:06d}") or by_device[f"dev_{i:06d}"]
        wanted = before[i] if i % 3 != 1 else before[i] & {generated_command_id(i, 1)}
        assert set(record["cancelled_command_ids"]) == wanted
        assert record["outcome"] == ("cancelled" if wanted else "nothing_to_cancel")
        assert pending_ids(sim, i) == before[i] - wanted  # the rest is untouched
    failed = by_device["nosuch01"]
    assert (failed["outcome"], failed["code"], failed["attempts"]) == ("failed", 99404, 1)
    assert summary(tmp_path / "run")["outcomes"] == {
        "cancelled": sum(1 for r in lines if r["outcome"] == "cancelled"),
        "nothing_to_cancel": sum(1 for r in lines if r["outcome"] == "nothing_to_cancel"),
        "failed": 1,
    }
    assert "failed                      1" in report
    untouched = sim.store.find(ORG, "as000150", None, None)
    assert untouched is not None
    assert untouched.cancel_calls == 0


async def test_faulty_gateway_still_ends_correct(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """5xx, drops, garbled bodies and 429 storms: every target still ends right, exit 0."""
    indices = range(1, 121)
    before = {i: pending_ids(sim, i) for i in indices}
    sim.faults = Faults(error_rate=0.15, drop_rate=0.1, malformed_rate=0.1, rate_cap=60)
    targets = "targets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in indices)
    job = write_job(tmp_path, "limits: {rate: 400, attempts: 12, timeout: 2}\n" + targets)
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 0
    lines = results(tmp_path / "run")
    assert len(lines) == len(indices)
    assert sim.stats.by_status[429] > 0
    assert sim.stats.by_status[200] > 0
    for record in lines:
        index = int(record["target"]["asset_id"][2:])
        assert pending_ids(sim, index) == set()  # nothing left cached
        assert set(record["cancelled_command_ids"]) <= before[index]  # no id claimed unseen
        if record["outcome"] == "nothing_to_cancel" and before[index]:
            assert record["effect_unknown"] is True  # the answer that cancelled them was lost
    assert summary(tmp_path / "run")["attempts"] > len(indices)


async def test_denied_org_stops_early_with_exit_3(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """99403 stops the run: few requests, nothing final, resumable."""
    sim.faults = Faults(denied_orgs=frozenset({ORG}))
    targets = "targets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in range(150))
    job = write_job(tmp_path, "limits: {rate: 200, concurrency: 4}\n" + targets)
    code, report = await run_job(job, gateway, tmp_path / "run")
    assert code == 3
    assert sim.stats.business_calls <= 4
    result = summary(tmp_path / "run")
    assert result["not_attempted"] == 150
    assert result["resumable"] is True
    assert "no permission" in result["stop_message"]
    assert "--resume" in report


async def test_rejected_credentials_stop_with_exit_3(gateway: str, tmp_path: Path) -> None:
    """A wrong secret: the token is refused, the run stops before any business call."""
    job = write_job(tmp_path, "targets: [{asset_id: as000001}]\n")
    wrong = Credentials(APP_KEY, "wrong-secret")
    code, report = await run_job(job, gateway, tmp_path / "run", credentials=wrong)
    assert code == 3
    assert "credentials" in summary(tmp_path / "run")["stop_message"]
    assert "wrong-secret" not in report


async def test_rate_is_held_without_burst(sim: Simulator, gateway: str, tmp_path: Path) -> None:
    """At 50/s for 5 s: no 1-second window above 55 requests, no mean above 2 % over."""
    sim.store.generated = 250
    targets = "targets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in range(250))
    job = write_job(tmp_path, "limits: {rate: 50, concurrency: 16}\n" + targets)
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 0
    arrivals = sorted(sim.stats.arrivals)
    assert len(arrivals) == 250
    worst, start = 0, 0
    for end, moment in enumerate(arrivals):
        while moment - arrivals[start] >= 1.0:
            start += 1
        worst = max(worst, end - start + 1)
    assert worst <= 55
    mean = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
    assert mean <= 50 * 1.02  # never above the rate; a stalled machine may only fall behind it
    assert mean >= 50 * 0.9


async def test_no_secret_in_any_output(sim: Simulator, gateway: str, tmp_path: Path) -> None:
    """Neither the app secret nor any access token appears in the run's files or report."""
    job = write_job(tmp_path, "limits: {rate: 500}\n" + mixed_targets(range(1, 20)))
    _, report = await run_job(job, gateway, tmp_path / "run")
    contents = [report.encode()] + [p.read_bytes() for p in (tmp_path / "run").iterdir()]
    for content in contents:  # done.bin is binary: compare bytes
        assert APP_SECRET.encode() not in content
        for token in sim._tokens:
            assert token.encode() not in content


async def test_lost_answers_are_never_claimed(sim: Simulator, gateway: str, tmp_path: Path) -> None:
    """Answers lost after the cancel took effect: a target is `cancelled` only when a reply of
    this run listed its command; after a lost answer and an empty retry it is nothing_to_cancel
    with effect_unknown, and Get Command's state 2 is kept as evidence (get_state), not proof.
    The gateway's own state agrees: every targeted command ends cancelled."""
    indices = [i for i in range(1, 60) if pending_ids(sim, i)][:30]
    sim.faults = Faults(drop_rate=0.5)
    wanted = {i: generated_command_id(i, 0) for i in indices}
    lines = "".join(f"  - {{asset_id: as{i:06d}, command_id: '{wanted[i]}'}}\n" for i in indices)
    job = write_job(
        tmp_path, "limits: {rate: 1000, concurrency: 1, attempts: 20}\ntargets:\n" + lines
    )
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 0
    records = results(tmp_path / "run")
    audit = [orjson.loads(x) for x in (tmp_path / "run" / "audit.jsonl").read_bytes().splitlines()]
    lost = {a["target"]["asset_id"] for a in audit if a.get("decision") == "retry"}
    assert lost, "the fault never struck: the test proves nothing"
    for record in records:
        asset = record["target"]["asset_id"]
        if record["outcome"] == "cancelled":
            assert record["effect_unknown"] is False
            assert record["cancelled_command_ids"] == [record["command_id"]]
            assert record["get_state"] is None
        else:
            assert asset in lost
            assert (record["outcome"], record["effect_unknown"]) == ("nothing_to_cancel", True)
            assert record["cancelled_command_ids"] == []
            assert record["get_state"] in (2, None)  # evidence, when the Get was answered
    assert any(r["get_state"] == 2 for r in records)
    for i in indices:
        device = sim.store.find(ORG, f"as{i:06d}", None, None)
        assert device is not None
        assert device.commands[wanted[i]].state == 2


async def test_unreachable_gateway_stops_before_any_target(tmp_path: Path) -> None:
    """Nobody answers on the gateway's port: the run stops (exit 3) after a few token tries,
    with every target still to do rather than 'failed'."""
    job = write_job(tmp_path, "limits: {attempts: 3}\ntargets:\n  - asset_id: as000001\n")
    code, report = await run_job(job, "http://127.0.0.1:9", tmp_path / "run")
    assert code == 3
    result = summary(tmp_path / "run")
    assert "did not answer" in result["stop_message"]
    assert (result["not_attempted"], result["outcomes"]["failed"]) == (1, 0)
    assert "--resume" in report
