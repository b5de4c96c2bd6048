"""What a hostile file system neighbour or a changing input cannot do to a run's record: the
targets are fixed at the start, a planted link is not followed, a long last line survives a
crash's repair, and an edited run.json is refused by the resume and by `audit verify`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.runs import results, resume_job, run_job, summary, write_job
from tests.simproc import run_worker, simulator_process
from tests.test_operate import assert_one_line_per_target
from worker.app import prepare
from worker.errors import UsageError
from worker.report.auditverify import AuditBroken, verify
from worker.store import layout
from worker.store.appendlog import repair_tail
from worker.store.layout import RunDir

ROWS = 50


def targets_csv(path: Path, first: int, count: int, *, header: bool = True) -> None:
    """asset_id rows as{first}..as{first+count-1} written (or appended) to a CSV."""
    rows = "".join(f"as{i:06d}\n" for i in range(first, first + count))
    with path.open("a" if not header else "w", encoding="utf-8") as stream:
        stream.write(("asset_id\n" if header else "") + rows)


@pytest.mark.anyio
async def test_a_targets_file_growing_during_a_run_changes_nothing(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSV gets 31 more rows the moment the run has taken its copy (a producer still
    writing): the run goes over the 50 it planned, one line each, the audit verifies; the
    resume of the changed file is refused without --force, as before."""
    csv = tmp_path / "t.csv"
    targets_csv(csv, 0, ROWS)
    job = write_job(tmp_path, "limits: {rate: 2000}\ntargets_file: t.csv\n")
    run_dir = tmp_path / "run"
    copy_in = layout.copy_in

    def copy_then_grow(*args: Any) -> None:
        copy_in(*args)
        targets_csv(csv, 100, 31, header=False)

    monkeypatch.setattr(prepare, "copy_in", copy_then_grow)
    code, _ = await run_job(job, gateway, run_dir)
    assert code == 0
    assert summary(run_dir)["targets"] == ROWS
    assert_one_line_per_target(run_dir, ROWS)
    assert verify(RunDir(run_dir)).results == ROWS
    copy = run_dir / "targets.csv"
    assert copy.read_text(encoding="utf-8").count("\n") == ROWS + 1  # the planned rows only
    assert orjson.loads((run_dir / "run.json").read_bytes())["targets_file"] == "targets.csv"
    with pytest.raises(UsageError, match="changed since this run started"):
        await resume_job(job, gateway, run_dir)


@pytest.mark.anyio
async def test_a_targets_file_changed_before_the_copy_sends_nothing(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSV changes between the plan and the copy: the run refuses before anything is
    sent (the plan's counts would no longer be the run's)."""
    csv = tmp_path / "t.csv"
    targets_csv(csv, 0, ROWS)
    job = write_job(tmp_path, "limits: {rate: 2000}\ntargets_file: t.csv\n")
    copy_in = layout.copy_in

    def grow_then_copy(*args: Any) -> None:
        targets_csv(csv, 100, 31, header=False)
        copy_in(*args)

    monkeypatch.setattr(prepare, "copy_in", grow_then_copy)
    with pytest.raises(UsageError, match="changed between planning and the start"):
        await run_job(job, gateway, tmp_path / "run")
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_a_targets_file_swapped_for_a_fifo_is_refused(tmp_path: Path) -> None:
    """A FIFO where the validated CSV was: the open does not block (SIGTERM would be ignored),
    the job is refused with exit 2 naming it."""
    job = write_job(tmp_path, "targets_file: t.csv\n")
    os.mkfifo(tmp_path / "t.csv")
    done = run_worker("run", str(job), "--gateway", "http://127.0.0.1:9", timeout=20)
    assert done.returncode == 2
    assert "not a regular file" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_result_line_over_a_megabyte_survives_tail_repair(tmp_path: Path) -> None:
    """After a crash, repair cuts only the torn end: a complete last line of 3 MiB (a result
    naming thousands of matches) stays; it was cut before."""
    journal = tmp_path / "results.jsonl"
    big = orjson.dumps({"outcome": "cancelled", "matched_command_ids": ["c" * 20] * 150_000})
    assert len(big) > 3 << 20
    journal.write_bytes(b'{"a":1}\n' + big + b"\n" + b'{"torn":')
    assert repair_tail(journal) == len(b'{"torn":')
    assert journal.read_bytes() == b'{"a":1}\n' + big + b"\n"
    assert repair_tail(journal) == 0


def test_a_planted_link_is_not_followed(tmp_path: Path) -> None:
    """results.jsonl planted as a link to a file outside: the run refuses to write through it
    (one line, no traceback) and the victim is unchanged."""
    victim = tmp_path / "victim.conf"
    victim.write_text("secret=1\n")
    job = write_job(tmp_path, "targets: [{asset_id: as000001}]\n")
    with simulator_process("--devices", "10") as url:
        out = tmp_path / "run"
        assert run_worker("run", str(job), "--gateway", url, "--out", str(out)).returncode == 0
        (out / "results.jsonl").unlink()
        (out / "results.jsonl").symlink_to(victim)
        done = run_worker("run", str(job), "--resume", str(out))
    assert done.returncode in (2, 3)
    assert "symbolic link" in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    assert victim.read_text() == "secret=1\n"


def test_an_edited_run_json_gateway_is_refused_and_found(tmp_path: Path) -> None:
    """run.json's gateway pointed elsewhere: the resume refuses (nothing sent, the token never
    leaves), `audit verify` fails naming run.json; an explicit --gateway is allowed and
    recorded."""
    job = write_job(tmp_path, "limits: {rate: 1000}\ntargets: [{asset_id: as000001}]\n")
    with simulator_process("--devices", "10") as url:
        out = tmp_path / "run"
        assert run_worker("run", str(job), "--gateway", url, "--out", str(out)).returncode == 0
        manifest = orjson.loads((out / "run.json").read_bytes())
        manifest["gateway"] = "http://127.0.0.1:9"
        (out / "run.json").write_bytes(orjson.dumps(manifest))
        refused = run_worker("run", str(job), "--resume", str(out))
        assert refused.returncode == 2
        assert "changed outside worker" in refused.stderr
        with pytest.raises(AuditBroken, match=r"run\.json was changed outside worker"):
            verify(RunDir(out))
        explicit = run_worker("run", str(job), "--resume", str(out), "--gateway", url)
        assert explicit.returncode == 0, explicit.stderr
    assert verify(RunDir(out)).segments == 2
    assert len(results(out)) == 1
