"""A full disk never breaks the record: every line is written whole or not at all, the run stops
(exit 3, resumable) without writing what depends on the lost line, a resume while the disk is
still full says so, and a resume after space is freed ends with an audit that verifies."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.runs import results, resume_job, run_job, write_job
from tests.simproc import run_worker, simulator_process
from tests.test_operate import assert_one_line_per_target
from worker.report.auditverify import verify
from worker.store.layout import RunDir

TARGETS = 60
JOB = "limits: {rate: 2000, concurrency: 4}\ntargets:\n" + "".join(
    f"  - asset_id: as{i:06d}\n" for i in range(TARGETS)
)


class FullDisk:
    """os.write that fills up: after `after` writes, one comes back short, then every write
    fails with ENOSPC (a fault-injected writer for the run's own files)."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.calls = 0
        self.real = os.write

    def __call__(self, fd: int, data: bytes | memoryview) -> int:
        self.calls += 1
        if self.calls < self.after:
            return self.real(fd, data)
        if self.calls == self.after and len(data) > 2:
            return self.real(fd, bytes(data[: len(data) // 2]))  # a torn line
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def lines_are_whole(run_dir: Path) -> None:
    """Every line of both records is complete JSON (no torn line survives)."""
    for name in ("results.jsonl", "audit.jsonl"):
        raw = (run_dir / name).read_bytes()
        assert raw.endswith(b"\n")
        for line in raw.splitlines():
            orjson.loads(line)


@pytest.mark.anyio
async def test_a_short_write_stops_the_run_and_the_record_stays_whole(
    gateway: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A line written short: the run stops with exit 3 saying why, the torn line is cut off,
    no result is written after it, and the audit verifies; a resume while the disk is still
    full says so (exit 3); once space is back, the resume finishes with one line per target."""
    job = write_job(tmp_path, JOB)
    run_dir = tmp_path / "run"
    disk = FullDisk(after=25)
    monkeypatch.setattr(os, "write", disk)
    code, report = await run_job(job, gateway, run_dir)
    assert code == 3
    assert "disk full" in report
    lines_are_whole(run_dir)
    written = len(results(run_dir))
    assert 0 < written < TARGETS
    assert verify(RunDir(run_dir)).died  # the segment reads as one that ended there
    code, report = await resume_job(job, gateway, run_dir)  # the disk is still full
    assert code == 3
    assert "disk full" in report
    monkeypatch.setattr(os, "write", disk.real)
    code, _ = await resume_job(job, gateway, run_dir)
    assert code == 0
    assert_one_line_per_target(run_dir, TARGETS)
    assert verify(RunDir(run_dir)).results == TARGETS


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path` (root only; skipped where mounting is refused)."""
    path.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0 or shutil.which("mount") is None:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_a_real_full_disk_then_space_freed(tmp_path: Path) -> None:
    """`worker run` on a 96 KiB tmpfs: one line, exit 3, no traceback; the resume while it is
    still full says so; after the tmpfs grows, the resume finishes and the audit verifies."""
    job = write_job(tmp_path, "limits: {rate: 5000}\ntargets_file: t.csv\n")
    (tmp_path / "t.csv").write_text(
        "asset_id\n" + "".join(f"as{i:06d}\n" for i in range(2000)), encoding="utf-8"
    )
    with (
        small_tmpfs(tmp_path / "disk", "96k") as disk,
        simulator_process("--devices", "2100") as url,
    ):
        out = disk / "run"
        first = run_worker("run", str(job), "--gateway", url, "--out", str(out), "--yes")
        assert first.returncode == 3, first.stderr[-2000:]
        assert "Traceback" not in first.stderr + first.stdout
        assert "disk full" in first.stdout + first.stderr
        lines_are_whole(out)
        again = run_worker("run", str(job), "--resume", str(out), "--yes")
        assert again.returncode == 3
        assert "Traceback" not in again.stderr + again.stdout
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        done = run_worker("run", str(job), "--resume", str(out), "--yes")
        assert done.returncode == 0, done.stderr[-2000:]
        assert len({line["target"]["asset_id"] for line in results(out)}) == 2000
        checked = run_worker("audit", "verify", str(out))
        assert checked.returncode == 0, checked.stdout
