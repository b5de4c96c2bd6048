"""`worker audit verify`: a real run verifies; each way of tampering with it is caught."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from tests.runs import resume_job, run_job, write_job
from tests.simproc import run_worker
from worker.report.auditverify import AuditBroken, verify
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio


@pytest.fixture
async def finished_run(sim: Simulator, gateway: str, tmp_path: Path) -> tuple[Path, str]:
    """A two-segment run with retries in it; (its directory, the audit head it printed)."""
    sim.faults = Faults(drop_rate=0.2, error_rate=0.1)
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(30)) + "  - asset_id: nosuch\n"
    job = write_job(tmp_path, "limits: {rate: 2000, attempts: 10}\ntargets:\n" + lines)
    run_dir = tmp_path / "run"
    code, _ = await run_job(job, gateway, run_dir)
    assert code == 1  # nosuch failed
    sim.faults = Faults()
    code, report = await resume_job(job, gateway, run_dir, retry_failed=True)
    assert code == 1
    head = next(line.split()[2] for line in report.splitlines() if "audit head" in line)
    return run_dir, head


def copy_of(run_dir: Path, tmp_path: Path, name: str) -> Path:
    """A copy of the run directory to tamper with."""
    target = tmp_path / name
    shutil.copytree(run_dir, target)
    return target


def rewrite(path: Path, change: Callable[[list[bytes]], list[bytes]]) -> None:
    """Replace a file's lines by change(lines)."""
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(change(lines)))


def edited(lines: list[bytes], index: int) -> list[bytes]:
    """Lines with one field of line `index` changed (and re-serialized)."""
    record = orjson.loads(lines[index])
    record["latency_ms"] = 0.01
    return [*lines[:index], orjson.dumps(record) + b"\n", *lines[index + 1 :]]


def forged(lines: list[bytes]) -> list[bytes]:
    """An attempt record appended with a correct prev: the chain alone cannot tell."""
    record = orjson.loads(lines[2])
    record["prev"] = hashlib.sha256(lines[-1].rstrip(b"\n")).hexdigest()
    return [*lines, orjson.dumps(record) + b"\n"]


async def test_a_real_run_verifies(finished_run: tuple[Path, str]) -> None:
    """Two segments, retries, a retried failure: whole; the head is the one the run printed."""
    run_dir, head = finished_run
    found = verify(RunDir(run_dir), head=head)
    assert found.segments == 2
    assert found.results == 32  # 30 + nosuch, + its superseding retry
    assert found.head == head


def other_target(line: bytes) -> bytes:
    """A result line moved to a target the audit never saw."""
    return line.replace(b"as0000", b"zz0000")


def one_target_less(summary: bytes) -> bytes:
    """summary.json with its target count changed."""
    return summary.replace(b'"targets": 31', b'"targets": 30')


TAMPERING: dict[str, tuple[str, Callable[[list[bytes]], list[bytes]], str]] = {
    "edit": ("audit.jsonl", lambda lines: edited(lines, 3), "audit.jsonl:5: the chain is broken"),
    "delete": ("audit.jsonl", lambda lines: lines[:4] + lines[5:], "audit.jsonl:5: the chain"),
    "reorder": (
        "audit.jsonl",
        lambda lines: [*lines[:4], lines[5], lines[4], *lines[6:]],
        "audit.jsonl:5: the chain",
    ),
    "truncate mid-line": (
        "audit.jsonl",
        lambda lines: [*lines[:-1], lines[-1][:20]],
        "the last line is incomplete",
    ),
    "append forged": ("audit.jsonl", forged, "outside a segment"),
    "append garbage": (
        "audit.jsonl",
        lambda lines: [*lines, b'{"type": "attempt"}\n'],
        "the chain is broken",
    ),
    "result outcome": (
        "results.jsonl",
        lambda lines: [
            lines[0]
            .replace(b'"nothing_to_cancel"', b'"cancelled"')
            .replace(b'"cancelled"', b'"failed"', 1),
            *lines[1:],
        ],
        "summary.json",
    ),
    "forged result": (
        "results.jsonl",
        lambda lines: [*lines, other_target(lines[0])],
        "a result with no attempt record",
    ),
    "second result": ("results.jsonl", lambda lines: [*lines, lines[1]], "a second final result"),
    "summary": (
        "summary.json",
        lambda lines: [one_target_less(b"".join(lines))],
        "summary.json: targets",
    ),
}


@pytest.mark.parametrize("name", list(TAMPERING))
async def test_tampering_is_caught(
    finished_run: tuple[Path, str], tmp_path: Path, name: str
) -> None:
    """Edit, delete, reorder, truncate, append, and results or summary that disagree: each is
    caught, naming the file and line."""
    run_dir, _ = finished_run
    victim = copy_of(run_dir, tmp_path, name.replace(" ", "-"))
    file_name, change, words = TAMPERING[name]
    rewrite(victim / file_name, change)
    with pytest.raises(AuditBroken, match=words):
        verify(RunDir(victim))


async def test_cut_off_records_are_caught_with_the_head(
    finished_run: tuple[Path, str], tmp_path: Path
) -> None:
    """Dropping whole trailing records leaves a valid chain; the recorded head catches it."""
    run_dir, head = finished_run
    victim = copy_of(run_dir, tmp_path, "cut")
    rewrite(victim / "audit.jsonl", lambda lines: lines[:-1])
    with pytest.raises(AuditBroken, match="not at the head given"):
        verify(RunDir(victim), head=head)


async def test_cli_exit_codes(finished_run: tuple[Path, str], tmp_path: Path) -> None:
    """`worker audit verify`: exit 0 and OK for a whole run, 1 and FAILED naming the line."""
    run_dir, head = finished_run
    done = run_worker("audit", "verify", str(run_dir), "--head", head)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK" in done.stdout
    assert head in done.stdout
    victim = copy_of(run_dir, tmp_path, "cli")
    rewrite(victim / "audit.jsonl", lambda lines: lines[:4] + lines[5:])
    done = run_worker("audit", "verify", str(victim))
    assert done.returncode == 1
    assert "FAILED" in done.stdout
    assert "audit.jsonl:5" in done.stdout
