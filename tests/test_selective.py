"""Selective cancels (`match:`): find each device's cached commands with Search Command, cancel
exactly those that match, keep the others; every claim checked against the gateway's state."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.fakes import FakeCanceller, MemoryRecorder, ok
from tests.runs import results, run_job, summary, write_job
from tests.simproc import run_worker, sim_get, simulator_process
from tests.test_operate import kill_9_midway
from worker.core.engine import Engine
from worker.core.ports import EngineSettings
from worker.core.ratelimit import RateLimiter
from worker.core.retry import RetryPolicy
from worker.errors import JobFileError, RetryableError, TargetError
from worker.jobs.parse import load_job
from worker.jobs.plan import plan
from worker.model import Command, Match, Outcome, SearchPage, Target
from worker.report.auditverify import verify
from worker.sim.simulator import Simulator, serve
from worker.sim.state import (
    SEEDED_COMMANDS,
    SEEDED_SPACING_MS,
    DeviceStore,
    generated_command_id,
)
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio
DEVICES = range(1, 41)


def iso(epoch_ms: int) -> str:
    """An ISO 8601 UTC time for a job file."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def states(sim: Simulator, index: int) -> dict[str, tuple[int, str, int]]:
    """command id -> (state, name, created ms) of generated device `index`."""
    device = sim.store.find(ORG, f"as{index:06d}", None, None)
    assert device is not None
    return {
        c.command_id: (c.state, c.identifier, c.create_time_ms) for c in device.commands.values()
    }


def job_for(tmp_path: Path, match: str, limits: str = "{rate: 1000}") -> Path:
    """A selective job over DEVICES with this `match:` block (YAML flow mapping)."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in DEVICES)
    return write_job(tmp_path, f"match: {match}\nlimits: {limits}\ntargets:\n{lines}")


async def test_a_mixed_fleet_keeps_what_does_not_match(tmp_path: Path) -> None:
    """Each device holds the bad command (setPoint42), an older copy of it outside the time
    window, other services and a delivered command: only the bad command in the window is
    cancelled; everything else is untouched; lines and summary say so; the audit verifies."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=100, commands=6, seed=7)
    before = {i: states(sim, i) for i in DEVICES}
    # k-th command: SEEDED_COMMANDS[k % 4], created k x 10 min after the first; k = 0 and 4
    # are setPoint42; the window starts between them, so only k = 4 is the incident's copy.
    earliest = min(created for i in DEVICES for _, _, created in before[i].values())
    window = earliest + 3 * SEEDED_SPACING_MS + SEEDED_SPACING_MS // 2
    wanted = {
        i: {
            cid
            for cid, (state, name, created) in before[i].items()
            if state == 1 and name == "setPoint42" and created >= window
        }
        for i in DEVICES
    }
    assert sum(map(len, wanted.values())) > 20
    job = job_for(tmp_path, f"{{command_name: setPoint42, created_after: '{iso(window)}'}}")
    async with serve(sim) as url:
        code, report = await run_job(job, url, tmp_path / "run")
    assert code == 0
    for line in results(tmp_path / "run"):
        index = int(line["target"]["asset_id"][2:])
        assert set(line["matched_command_ids"]) == wanted[index]
        assert set(line["cancelled_command_ids"]) == wanted[index]
        assert line["missed_command_ids"] == []
        pending_before = {c for c, (state, _, _) in before[index].items() if state == 1}
        assert line["kept"] == len(pending_before - wanted[index])
        assert line["outcome"] == ("cancelled" if wanted[index] else "nothing_to_cancel")
        now = states(sim, index)
        for cid, (state, _, _) in before[index].items():
            assert now[cid][0] == (2 if cid in wanted[index] else state), "only matches change"
    counts = summary(tmp_path / "run")["commands"]
    assert counts["matched"] == counts["cancelled"] == sum(map(len, wanted.values()))
    assert "kept (did not match)" in report
    verify(RunDir(tmp_path / "run"))


async def test_every_page_is_read_and_each_page_takes_a_slot(tmp_path: Path) -> None:
    """60 cached commands a device (two pages of 50): matches on both pages are cancelled;
    the audit shows the second page of each device's search."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=10, commands=60, seed=1)
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in (2, 3))
    job = write_job(
        tmp_path, f"match: {{tsl_identifier: restart}}\nlimits: {{rate: 1000}}\ntargets:\n{lines}"
    )
    async with serve(sim) as url:
        code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 0
    for line in results(tmp_path / "run"):
        assert len(line["cancelled_command_ids"]) == 15  # k = 1, 5, ..., 57
        assert line["kept"] == 45
        assert line["attempts"] == 2 + 15  # two pages, fifteen cancels
    audit = (tmp_path / "run" / "audit.jsonl").read_text()
    assert audit.count('"subject":"page 2"') == 2
    assert sim.stats.by_action["search"] == 4
    assert sim.stats.by_action["cancel"] == 30


async def test_matching_is_exact_where_the_server_is_fuzzy(tmp_path: Path) -> None:
    """The server's `like` ignores case; the match does not: 'setpoint42' cancels nothing."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=50, commands=4, seed=7)
    job = job_for(tmp_path, "{command_name: setpoint42}")
    async with serve(sim) as url:
        code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 0
    lines = results(tmp_path / "run")
    assert all(line["outcome"] == "nothing_to_cancel" for line in lines)
    assert sim.stats.by_action.get("cancel", 0) == 0
    assert sum(line["kept"] for line in lines) > 0


async def test_a_localized_name_and_a_command_type(tmp_path: Path) -> None:
    """command_name_locale picks the name in that locale; command_type narrows further."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=50, commands=4, seed=7)
    job = job_for(
        tmp_path, "{command_name: 中文-setPoint, command_name_locale: zh_CN, command_type: 1}"
    )
    async with serve(sim) as url:
        code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 0
    for line in results(tmp_path / "run"):
        index = int(line["target"]["asset_id"][2:])
        expected = set()
        if not sim.store.is_pending_free(index):
            expected = {generated_command_id(index, k) for k in (0, 3)}  # setPoint42, setPoint7
        assert set(line["cancelled_command_ids"]) == expected


def test_the_dry_run_shows_what_it_would_cancel_and_keep(tmp_path: Path) -> None:
    """--dry-run --sample: the commands a selective job would cancel and those it keeps; the
    gateway sees searches only."""
    with simulator_process("--devices", "100", "--commands", "4") as url:
        job = job_for(tmp_path, "{command_name: setPoint42}")
        done = run_worker("run", str(job), "--gateway", url, "--dry-run", "--sample", "5")
        stats = sim_get(url, "/_sim/stats")
    assert done.returncode == 0, done.stderr
    assert "would cancel 1" in done.stdout
    assert "keeps 3" in done.stdout
    assert stats["by_action"] == {"search": 5}


def test_kill_9_then_resume_cancels_each_match_once(tmp_path: Path) -> None:
    """kill -9 during a selective run, then resume: one line per target; every setPoint42 is
    cancelled and nothing else; a target re-searched after the crash that finds nothing is
    effect_unknown, not a plain nothing_to_cancel."""
    count = 3000
    rows = "".join(f"as{i:06d}\n" for i in range(count))
    (tmp_path / "devices.csv").write_text("asset_id\n" + rows)
    job = tmp_path / "job.yaml"
    head = f"version: 1\nname: sel\norg_id: {ORG}\nmatch: {{command_name: setPoint42}}\n"
    job.write_text(head + "limits: {rate: 3000, concurrency: 16}\ntargets_file: devices.csv\n")
    run_dir = tmp_path / "run"
    with simulator_process("--devices", str(count), "--commands", "4") as url:
        kill_9_midway(job, url, run_dir, random.Random(5).randint(300, 2500))
        done = run_worker("run", str(job), "--resume", str(run_dir), "--yes")
        assert done.returncode == 0, done.stderr
        devices = {d["asset_id"]: d for d in sim_get(url, "/_sim/devices")}
    lines = {line["target"]["asset_id"]: line for line in results(run_dir)}
    assert len(lines) == count
    seeded = DeviceStore(devices=count, commands_per_device=4, seed=7)  # the simulator's seeding
    for asset, device in devices.items():
        index = int(asset[2:])
        if seeded.is_pending_free(index):
            continue  # it held only a finished command
        for k in range(4):
            state = device["commands"][generated_command_id(index, k)]
            name = SEEDED_COMMANDS[k % len(SEEDED_COMMANDS)][0]
            assert state == (2 if name == "setPoint42" else 1), (asset, k)
        line = lines[asset]
        if device["cancel_calls"] == 0 and line["outcome"] == "nothing_to_cancel":
            continue  # a pending-free device: nothing matched, nothing was sent
        if line["outcome"] == "nothing_to_cancel":
            assert line["effect_unknown"], line  # cancelled by the process that died
    verify(RunDir(run_dir))


# -- the core, with a fake gateway ------------------------------------------------------------


def selective(asset: str = "a0") -> Target:
    """A selective target matching commands named 'bad'."""
    return Target(org_id="o1", asset_id=asset, match=Match(command_name="bad"))


def page(*names: tuple[str, str]) -> SearchPage:
    """One search page of cached commands (id, name)."""
    commands = tuple(Command(cid, 1, 0, name) for cid, name in names)
    return SearchPage(commands, len(commands), 0, 50)


async def run_fake(fake: FakeCanceller, target: Target) -> MemoryRecorder:
    """One selective target through the real engine."""
    recorder = MemoryRecorder()
    policy = RetryPolicy(attempts=4, base_s=0.001, cap_s=0.002)
    engine = Engine(fake, recorder, RateLimiter(None), EngineSettings(concurrency=1, policy=policy))
    await engine.run(iter([(0, target)]))
    return recorder


async def test_a_match_gone_before_its_cancel_is_missed() -> None:
    """Two matches; the second was delivered between the search and its cancel: cancelled
    lists the first, missed the second, and nothing is claimed for it."""
    fake = FakeCanceller(
        {"a0": [page(("c1", "bad"), ("c2", "bad one"), ("k", "good")), ok("c1"), ok()]}
    )
    (result,) = (await run_fake(fake, selective())).results
    assert result.outcome is Outcome.CANCELLED
    assert (result.cancelled_command_ids, result.missed_command_ids) == (("c1",), ("c2",))
    assert (result.matched_command_ids, result.kept_command_ids) == (("c1", "c2"), ("k",))
    assert result.effect_unknown is False
    assert [action for action, _ in fake.calls] == ["search", "cancel", "cancel"]


async def test_every_match_gone_is_nothing_to_cancel() -> None:
    """All matches gone by their cancel: nothing_to_cancel, the matches listed as missed."""
    fake = FakeCanceller({"a0": [page(("c1", "bad")), ok()]})
    (result,) = (await run_fake(fake, selective())).results
    assert (result.outcome, result.missed_command_ids) == (Outcome.NOTHING_TO_CANCEL, ("c1",))


async def test_a_lost_answer_on_a_cancel_by_id_is_unknown_not_missed() -> None:
    """The cancel of c1 times out, its retry finds nothing: c1 may well be cancelled, so it is
    neither claimed nor called missed; the result says effect_unknown."""
    lost = RetryableError("timeout", maybe_applied=True)
    fake = FakeCanceller({"a0": [page(("c1", "bad"), ("c2", "bad")), lost, ok(), ok("c2")]})
    (result,) = (await run_fake(fake, selective())).results
    assert (result.outcome, result.cancelled_command_ids) == (Outcome.CANCELLED, ("c2",))
    assert result.missed_command_ids == ()
    assert result.effect_unknown is True


async def test_a_permanent_error_keeps_what_was_cancelled() -> None:
    """A final error on the second match: failed, with the first match's cancel in the line."""
    fake = FakeCanceller(
        {
            "a0": [
                page(("c1", "bad"), ("c2", "bad")),
                ok("c1"),
                TargetError("bad parameter", code=99400),
            ]
        }
    )
    (result,) = (await run_fake(fake, selective())).results
    assert (result.outcome, result.cancelled_command_ids) == (Outcome.FAILED, ("c1",))


# -- job files -----------------------------------------------------------------------------------

HEAD = "version: 1\nname: t\norg_id: o1\n"


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (
            "match: {command_name: x}\ncommand_id: '1'\ntargets: [{asset_id: a}]\n",
            "has both a match and a command_id",
        ),
        (
            "match: {command_name: x}\ntargets: [{asset_id: a, command_id: '1'}]\n",
            "has both a match and a command_id",
        ),
        (
            "targets: [{asset_id: a, match: {command_name: x}, command_id: '1'}]\n",
            "has both a match and a command_id",
        ),
        ("match: {}\ntargets: [{asset_id: a}]\n", "names no criterion"),
        (
            "match: {command_name: x, command_name_locale: english}\ntargets: [{asset_id: a}]\n",
            "is not a locale",
        ),
        ("match: {command_type: 3}\ntargets: [{asset_id: a}]\n", "is not 1 or 2"),
        (
            "match: {created_after: '2026-11-30T08:00:00'}\ntargets: [{asset_id: a}]\n",
            "with a zone",
        ),
        (
            "match: {created_after: 2026-11-30T09:00:00Z, created_before: 2026-11-30T08:00:00Z}\n"
            "targets: [{asset_id: a}]\n",
            "is not before created_before",
        ),
        ("match: {name: x}\ntargets: [{asset_id: a}]\n", "unknown key"),
        ("match: [x]\ntargets: [{asset_id: a}]\n", "must be a mapping"),
    ],
)
def test_bad_match_blocks_are_refused(tmp_path: Path, body: str, words: str) -> None:
    """Each mistake in a match is the job-file error at its line, with the fix."""
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + body)
    with pytest.raises(JobFileError, match=words):
        load_job(job)


def test_a_csv_row_with_a_command_id_under_a_job_match_is_refused(tmp_path: Path) -> None:
    """A targets-file row naming a command under a job-level match: refused at its line."""
    (tmp_path / "d.csv").write_text("asset_id,command_id\na1,\na2,123\n")
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "match: {command_name: x}\ntargets_file: d.csv\n")
    with pytest.raises(JobFileError, match=r"d.csv:3: has both a match"):
        plan(load_job(job))


def test_a_target_match_overrides_the_job_match(tmp_path: Path) -> None:
    """A target's own match replaces the job's; times are read with their zone."""
    job = tmp_path / "job.yaml"
    job.write_text(
        HEAD + "match: {command_name: a}\ntargets:\n  - asset_id: x\n"
        "  - {asset_id: y, match: {tsl_identifier: t, created_before: "
        "'2026-11-30T09:30:00+01:00'}}\n"
    )
    first, second = load_job(job).inline_targets
    assert first.match == Match(command_name="a")
    moment = datetime(2026, 11, 30, 8, 30, tzinfo=UTC)  # 09:30 at +01:00
    assert second.match == Match(
        tsl_identifier="t", created_before_ms=int(moment.timestamp() * 1000)
    )


def test_validate_prints_the_rule_and_the_call_range(tmp_path: Path) -> None:
    """validate: the match rule in words and calls as a range (k is unknown until the run)."""
    job = tmp_path / "job.yaml"
    job.write_text(
        HEAD + "match: {command_name: Set Point 42, created_after: "
        "2026-11-30T08:00:00Z}\ntargets: [{asset_id: a}, {asset_id: b}]\n"
    )
    done = run_worker("validate", str(job))
    assert done.returncode == 0, done.stderr
    assert (
        "name contains 'Set Point 42' and created at or after 2026-11-30T08:00:00Z" in done.stdout
    )
    assert "2 to 102" in done.stdout
