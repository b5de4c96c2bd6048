"""The chaos suite: whole runs against the simulator under each fault alone and in mixes.

Every scenario ends with every target correct and accounted for (resuming after a stop, and
with --retry-failed, until nothing is left), every claim true of the gateway's own state, and
`worker audit verify` passing. The README's fault table lists these scenarios.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import ORG
from tests.runs import results, resume_job, run_job, write_job
from worker.report.auditverify import verify
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio
TARGETS = range(1, 61)


def pending(sim: Simulator, index: int) -> set[str]:
    """The state-1 command ids of generated device `index` now."""
    device = sim.store.find(ORG, f"as{index:06d}", None, None)
    assert device is not None
    return {c.command_id for c in device.commands.values() if c.state == 1}


def assert_correct(sim: Simulator, before: dict[int, set[str]], run_dir: Path) -> None:
    """One final line per target; every claim true of the gateway; nothing left cached; the
    audit verifies."""
    final: dict[str, dict[str, Any]] = {}
    for line in results(run_dir):
        asset = line["target"]["asset_id"]
        assert asset not in final or final[asset]["outcome"] == "failed", "two final lines"
        final[asset] = line
    assert sorted(final) == sorted(f"as{i:06d}" for i in TARGETS)
    for index in TARGETS:
        line, was = final[f"as{index:06d}"], before[index]
        claimed, unknown = set(line["cancelled_command_ids"]), line["effect_unknown"]
        assert line["outcome"] != "failed", line
        assert claimed <= was, "claims a command that was not pending"
        if line["outcome"] == "cancelled" and not unknown:
            assert claimed == was
        if line["outcome"] == "nothing_to_cancel" and not unknown:
            assert not was, "says nothing was cached, but something was"
        assert not pending(sim, index), "a command is still cached"
    verify(RunDir(run_dir))


async def run_until_done(sim: Simulator, gateway: str, tmp_path: Path, limits: str) -> Path:
    """Run the job; resume (after a stop) and retry failures until every target is final."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in TARGETS)
    job = write_job(tmp_path, f"limits: {limits}\ntargets:\n{lines}")
    run_dir = tmp_path / "run"
    code, _ = await run_job(job, gateway, run_dir)
    for _ in range(4):
        if code == 0:
            break
        code, _ = await resume_job(job, gateway, run_dir, retry_failed=True)
    assert code == 0
    return run_dir


SCENARIOS: dict[str, tuple[Faults, str]] = {
    "latency past the attempt timeout": (
        Faults(slow_rate=0.3, slow_ms=500),
        "{rate: 500, timeout: 0.25, attempts: 12}",
    ),
    "5xx at 40 %": (Faults(error_rate=0.4), "{rate: 500, attempts: 12}"),
    "a burst of 503s": (Faults(burst_from=20, burst_calls=60), "{rate: 500, attempts: 12}"),
    "429 storm with Retry-After": (Faults(rate_cap=20, retry_after_s=1), "{rate: 400}"),
    "connections dropped before the effect": (
        Faults(drop_before_rate=0.3),
        "{rate: 500, attempts: 12}",
    ),
    "connections dropped after the effect": (Faults(drop_rate=0.3), "{rate: 500, attempts: 12}"),
    "garbled and cut-off bodies": (Faults(malformed_rate=0.3), "{rate: 500, attempts: 12}"),
    "oversized bodies": (Faults(oversize_rate=0.25), "{rate: 500, attempts: 12}"),
    "a token that expires every second": (
        Faults(token_ttl_s=1, latency_ms=20),
        "{rate: 25, concurrency: 4}",
    ),
    "all of them at once": (
        Faults(
            error_rate=0.1,
            drop_rate=0.1,
            drop_before_rate=0.1,
            malformed_rate=0.1,
            slow_rate=0.1,
            slow_ms=500,
            oversize_rate=0.05,
            rate_cap=150,
            token_ttl_s=2,
        ),
        "{rate: 300, timeout: 0.25, attempts: 15}",
    ),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_chaos(sim: Simulator, gateway: str, tmp_path: Path, name: str) -> None:
    """Each fault (and all at once): every target correct and accounted for, audit whole."""
    faults, limits = SCENARIOS[name]
    before = {i: pending(sim, i) for i in TARGETS}
    sim.faults = faults
    run_dir = await run_until_done(sim, gateway, tmp_path, limits)
    assert_correct(sim, before, run_dir)
    audit = [orjson.loads(line) for line in (run_dir / "audit.jsonl").read_bytes().splitlines()]
    struck = {a["decision"] for a in audit if a["type"] == "attempt"} - {"done"}
    assert struck or sim.stats.token_requests > 2, "the fault never struck: nothing was proved"


async def test_a_redirect_stops_the_run_then_a_resume_ends_it(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """Redirects are never followed: the run stops (exit 3, nothing sent elsewhere); once the
    gateway stops redirecting, a resume ends the run correctly."""
    before = {i: pending(sim, i) for i in TARGETS}
    sim.faults = Faults(redirect_rate=0.2)
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in TARGETS)
    job = write_job(tmp_path, f"limits: {{rate: 500}}\ntargets:\n{lines}")
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 3
    sim.faults = Faults()
    code, _ = await resume_job(job, gateway, tmp_path / "run")
    assert code == 0
    assert_correct(sim, before, tmp_path / "run")


async def test_the_gateway_down_for_5_s_and_back(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """Every connection closed for 5 s: the outage stop ends the run resumably (or it rides
    it out); after the gateway is back a resume ends it, every target correct."""
    before = {i: pending(sim, i) for i in TARGETS}
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in TARGETS)
    job = write_job(tmp_path, f"limits: {{rate: 100, concurrency: 4}}\ntargets:\n{lines}")
    sim.faults = Faults(down_until=time.monotonic() + 5.0)  # from now on, for 5 s
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code in (0, 3)
    await sim.up_again()
    for _ in range(3):
        if code == 0:
            break
        code, _ = await resume_job(job, gateway, tmp_path / "run", retry_failed=True)
    assert code == 0
    assert_correct(sim, before, tmp_path / "run")
