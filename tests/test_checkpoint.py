"""The resume's checkpoint is a cache of the journal: from it, or from the journal alone, a
resume knows exactly the same; when it does not match the journal it is ignored."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import APP_KEY, APP_SECRET
from tests.runs import results, resume_job, run_job, summary, write_job
from worker.report.auditverify import verify
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.store import checkpoint
from worker.store.done import RECORD
from worker.store.layout import RunDir
from worker.store.resume import counts_of, read_for_resume
from worker.store.tally import count_journal

pytestmark = pytest.mark.anyio


def both_ways(run_dir: Path, *, retry_failed: bool) -> tuple[object, object]:
    """(with the checkpoint, from the journal alone): the done sets and the counts."""
    run = RunDir(run_dir)
    counted, finished = read_for_resume(run, retry_failed=retry_failed)
    with_checkpoint = (finished, counted.read_rest(run), bytes(counted.done))
    saved = run.checkpoint.read_bytes()
    run.checkpoint.unlink()
    counted, finished = read_for_resume(run, retry_failed=retry_failed)
    alone = (finished, counted.read_rest(run), bytes(counted.done))
    run.checkpoint.write_bytes(saved)
    return with_checkpoint, alone


async def test_a_resume_from_the_checkpoint_knows_what_the_journal_says(tmp_path: Path) -> None:
    """A run with failures (unknown assets, lost answers), a --retry-failed segment, then a
    crash's worth of lines appended after the checkpoint: both ways agree, every time."""
    sim = Simulator(
        apps={APP_KEY: APP_SECRET}, devices=200, commands=2, seed=5, faults=Faults(drop_rate=0.2)
    )
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(60))
    lines += "".join(f"  - asset_id: nosuch{i}\n" for i in range(5))
    job = write_job(tmp_path, f"limits: {{rate: 2000, attempts: 2}}\ntargets:\n{lines}")
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        assert (await run_job(job, url, run_dir))[0] == 1
        assert RunDir(run_dir).done.stat().st_size == 65 * RECORD.size
        assert checkpoint.load(RunDir(run_dir)) is not None  # it matches: the resume starts from it
        for retry_failed in (False, True):
            with_checkpoint, alone = both_ways(run_dir, retry_failed=retry_failed)
            assert with_checkpoint == alone
        sim.faults = Faults()
        assert (await resume_job(job, url, run_dir, retry_failed=True))[0] == 1
    assert verify(RunDir(run_dir)).results == len(results(run_dir))
    loaded = checkpoint.load(RunDir(run_dir))
    assert loaded is not None
    assert loaded.cursor.offset == (run_dir / "results.jsonl").stat().st_size  # past every line
    with_checkpoint, alone = both_ways(run_dir, retry_failed=True)
    assert with_checkpoint == alone
    journal = run_dir / "results.jsonl"
    first_line = journal.read_bytes().splitlines(keepends=True)[0]
    with journal.open("ab") as stream:  # lines of a segment that died before its checkpoint
        stream.write(first_line)
    with_checkpoint, alone = both_ways(run_dir, retry_failed=False)
    assert with_checkpoint == alone
    assert summary(run_dir)["outcomes"]["failed"] == 5  # the unknown assets, and only them
    run = RunDir(run_dir)
    assert counts_of(run) == count_journal(run)  # a report from it counts the same


async def test_an_edited_journal_makes_the_checkpoint_ignored(tmp_path: Path) -> None:
    """An operator removes a line to run its target again: the checkpoint no longer matches,
    the journal is read, and the target runs again."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=50, seed=5)
    job = write_job(
        tmp_path,
        "limits: {rate: 2000}\ntargets:\n"
        + "".join(f"  - asset_id: as{i:06d}\n" for i in range(10)),
    )
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        assert (await run_job(job, url, run_dir))[0] == 0
        journal = run_dir / "results.jsonl"
        kept = journal.read_bytes().splitlines(keepends=True)
        journal.write_bytes(b"".join(kept[1:]))  # the first target's line removed
        assert checkpoint.load(RunDir(run_dir)) is None
        _, finished = read_for_resume(RunDir(run_dir), retry_failed=False)
        assert len(finished.done) == 9
        assert (await resume_job(job, url, run_dir))[0] == 0
    assert len(results(run_dir)) == 10
    assert summary(run_dir)["not_attempted"] == 0
