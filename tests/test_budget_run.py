"""The gateway's budget end to end over real HTTP: the client hands the stated budget along
with each answer, and a run that spends a day's quota ends resumable (exit 4) with no target
failed, and its resume finishes once the quota has turned (the simulator's clock is moved,
nothing sleeps through a window)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.runs import results, resume_job, run_job, summary, write_job
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.errors import RateLimitedError
from worker.model import Credentials, Target
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve

pytestmark = pytest.mark.anyio


class Shifted:
    """Real time, moved to 10:00 UTC of today (whatever the hour the suite runs at, a day's
    quota is then 14 h from its reset) and moved on by the test: the simulator's day turns at
    once. The worker reads the same clock."""

    def __init__(self) -> None:
        now = time.time()
        self.shift = now - now % 86400 + 10 * 3600 - now

    def __call__(self) -> float:
        return time.time() + self.shift


@pytest.fixture
def shifted() -> Shifted:
    """The simulator's clock."""
    return Shifted()


@pytest.fixture
async def budgeted(shifted: Shifted) -> AsyncIterator[tuple[Simulator, str]]:
    """A simulator on the shifted clock, served; yields (simulator, URL)."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=200, commands=3, clock=shifted)
    async with serve(sim) as url:
        yield sim, url


async def test_the_client_hands_the_stated_budget_along(
    budgeted: tuple[Simulator, str], shifted: Shifted
) -> None:
    """Cancel and search answers carry the budget their headers stated; a 429 carries it too,
    with its Retry-After uncapped (the error's own is capped at max_retry_after)."""
    sim, url = budgeted
    sim.faults = Faults(quota="minute=1000,hour=3", quota_headers="x-ratelimit")
    target = Target(org_id=ORG, asset_id="as000001")
    async with EnOSClient(url, Credentials(APP_KEY, APP_SECRET), max_retry_after=300) as client:
        reply = await client.cancel(target)
        page = await client.search_page(target, p.PENDING_EXPRESSION, 1)
        assert reply.budget is not None
        assert page.budget is not None
        names = {w.name: (w.remaining, w.limit) for w in page.budget.windows}
        if len(names) == 2:  # not read across a minute's boundary
            assert names == {"minute": (998, 1000), "hour": (1, 3)}
        await client.cancel(target)
        with pytest.raises(RateLimitedError) as refused:
            await client.cancel(target)
    assert refused.value.retry_after is not None
    assert refused.value.retry_after <= 300
    stated = refused.value.budget
    assert stated is not None
    assert stated.retry_after_s is not None
    assert stated.retry_after_s == pytest.approx(3600 - shifted() % 3600, abs=2)


async def test_answers_lost_after_the_effect_end_known_or_unknown_never_wrong(
    budgeted: tuple[Simulator, str], tmp_path: Path
) -> None:
    """A gateway answering 504 after a third of the cancels took effect: every target ends
    without failing; those whose cancel was answered list its commands, the others (their
    retry found nothing) are nothing_to_cancel with effect_unknown; nothing is still cached."""
    sim, url = budgeted
    sim.faults = Faults(late_504_rate=0.3)
    targets = "targets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in range(1, 41))
    job = write_job(tmp_path, "limits: {rate: 400, attempts: 8}\n" + targets)
    code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 0
    lines = results(tmp_path / "run")
    assert len(lines) == 40
    unknown = [line for line in lines if line["effect_unknown"]]
    assert unknown
    assert all(line["outcome"] == "nothing_to_cancel" for line in unknown)
    for index in range(1, 41):
        device = sim.store.find(ORG, f"as{index:06d}", None, None)
        assert device is not None
        assert device.pending(sim.store.now_ms()) == []


async def test_a_spent_day_ends_resumable_and_the_resume_finishes_when_it_turns(
    budgeted: tuple[Simulator, str], shifted: Shifted, tmp_path: Path
) -> None:
    """A day of 30 calls (X-RateLimit-*-Day headers) for 60 targets at 400/s: the run stops
    when the day is spent (exit 4, "quota", the reset time said), no target failed; once the
    day has turned, the resume finishes them all (exit 0)."""
    sim, url = budgeted
    sim.faults = Faults(quota="second=100,day=30/3600")  # a one-hour "day", moved on below
    targets = "targets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in range(1, 61))
    job = write_job(tmp_path, "limits: {rate: 400, concurrency: 4}\n" + targets)
    run_dir = tmp_path / "run"
    code, report = await run_job(job, url, run_dir, wall=shifted)
    assert code == 4
    first = summary(run_dir)
    assert first["outcomes"]["failed"] == 0
    assert first["not_attempted"] >= 30
    assert first["resumable"] is True
    assert "quota" in report
    assert "resets at" in first["stop_message"]
    assert first["stopped"] == "quota"
    assert first["quota_reset_at"] is not None  # when it resets, for scripts and the spool
    assert first["budget"] is not None  # what the gateway last stated, in words
    assert "once the gateway's quota resets" in report  # the resume hint says when
    assert "--resume" in report
    shifted.shift += 3600.0
    code, _ = await resume_job(job, url, run_dir, wall=shifted)
    assert code == 0
    lines = results(run_dir)
    assert len(lines) == 60
    assert all(line["outcome"] != "failed" for line in lines)
