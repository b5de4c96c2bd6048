"""The journal on disk: torn tails, damaged lines, the audit hash chain across segments."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import cast

import orjson
import pytest

from tests.runs import resume_job, run_job, write_job
from worker.model import Limits
from worker.report.details import Details, RunReport
from worker.report.html import render_html
from worker.store.admitted import AdmissionMark
from worker.store.appendlog import repair_tail
from worker.store.audit import AuditLog
from worker.store.journal import read_journal
from worker.store.layout import RunDir
from worker.store.records import AuditRecord
from worker.store.resume import counts_of, finished_targets
from worker.store.state import Manifest, Summary
from worker.store.tally import Counts, JournalFold


def kind(name: str) -> AuditRecord:
    """A bare audit record of a kind (the chain does not care what is in it)."""
    return cast("AuditRecord", {"type": name})


def lines(path: Path) -> list[bytes]:
    """The file's lines without newlines."""
    return path.read_bytes().splitlines()


@pytest.mark.parametrize(
    ("tail", "kept"),
    [
        (b'{"a": 3', 2),  # unterminated: a write cut short
        (b'{"a": 3\n', 2),  # terminated but not JSON: cut too
        (b'{"a": 3}\n', 3),  # intact
    ],
)
def test_repair_tail_cuts_only_a_torn_end(tmp_path: Path, tail: bytes, kept: int) -> None:
    """Whatever a crash leaves at the end goes; complete lines stay."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": 2}\n' + tail)
    repair_tail(path)
    assert [orjson.loads(x)["a"] for x in lines(path)] == list(range(1, kept + 1))


def test_damaged_middle_line_is_skipped_not_truncated(tmp_path: Path) -> None:
    """Damage inside the file loses that one line (its target runs again), nothing after it."""
    path = tmp_path / "results.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": \x00\n{"a": 3}\n')
    assert repair_tail(path) == 0
    assert [cast("dict[str, int]", r)["a"] for r in read_journal(path)] == [1, 3]


def chain_breaks(path: Path, run_id: str) -> list[int]:
    """Line numbers whose `prev` is not the sha256 of the line before."""
    previous = hashlib.sha256(run_id.encode()).hexdigest()
    broken = []
    for number, line in enumerate(lines(path), start=1):
        if orjson.loads(line)["prev"] != previous:
            broken.append(number)
        previous = hashlib.sha256(line).hexdigest()
    return broken


def test_audit_chain_continues_when_appending(tmp_path: Path) -> None:
    """A second AuditLog on the same file chains to the last line written by the first."""
    first = AuditLog(RunDir(tmp_path), "run-1")
    first.write(kind("a"))
    first.write(kind("b"))
    first.log.close()
    second = AuditLog(RunDir(tmp_path), "run-1")
    second.write(kind("c"))
    second.log.close()
    assert chain_breaks(tmp_path / "audit.jsonl", "run-1") == []
    text = (tmp_path / "audit.jsonl").read_bytes()
    (tmp_path / "audit.jsonl").write_bytes(text.replace(b'"b"', b'"B"'))
    assert chain_breaks(tmp_path / "audit.jsonl", "run-1") == [3]


@pytest.mark.anyio
async def test_audit_chain_spans_a_resumed_run(gateway: str, tmp_path: Path) -> None:
    """Run, stop at a deadline, resume: one unbroken chain, two run_started records."""
    targets = "".join(f"  - asset_id: as{i:06d}\n" for i in range(60))
    job = write_job(
        tmp_path, "limits: {rate: 40, timeout: 0.5, deadline: 1s}\ntargets:\n" + targets
    )
    run_dir = tmp_path / "run"
    assert (await run_job(job, gateway, run_dir))[0] == 4
    assert (await resume_job(job, gateway, run_dir, rate=1000.0, deadline=None))[0] == 0
    run_id = orjson.loads((run_dir / "run.json").read_bytes())["run_id"]
    assert chain_breaks(run_dir / "audit.jsonl", run_id) == []
    kinds = [orjson.loads(x)["type"] for x in lines(run_dir / "audit.jsonl")]
    assert kinds.count("run_started") == 2
    assert kinds.count("run_finished") == 2
    attempts = sum(1 for k in kinds if k == "attempt")
    assert attempts == 60


def manifest_for(summary: dict[str, object]) -> Manifest:
    """A manifest to go with a hand-written summary."""
    return Manifest(
        str(summary["run_id"]), "job.yaml", str(summary["job"]), "", "", 2, "gw", Limits()
    )


def test_html_report_escapes_and_charts() -> None:
    """The page escapes what it shows and draws the rate timeline when there is one."""
    summary = {
        "job": "<b>x</b>",
        "run_id": "r",
        "stopped": "finished",
        "stop_message": "",
        "exit_code": 0,
        "targets": 2,
        "not_attempted": 0,
        "effect_unknown": 0,
        "attempts": 2,
        "segments": 1,
        "started_at": "a",
        "finished_at": "b",
        "duration_s": 2.0,
        "outcomes": {"cancelled": 1, "nothing_to_cancel": 0, "failed": 1},
        "errors": {"99404": 1},
        "latency_ms": {"p50": 1, "p95": 2, "p99": 3},
        "rate": {
            "requested": 10,
            "achieved": 1.0,
            "timeline": [[1, 1.0, 1.0, 10.0], [1, 2.0, 1.0, 10.0]],
        },
        "resumable": True,
    }
    report = RunReport(
        RunDir(Path("run")), manifest_for(summary), Summary.from_json(summary), Counts(), Details()
    )
    page = render_html([report])
    assert "&lt;b&gt;x&lt;/b&gt;" in page
    assert "<b>x</b>" not in page
    assert "<polyline" in page
    assert (
        '<td>99404</td><td>not found (no such device, or no such command)</td><td class="n">1'
        in page
    )


def test_admission_mark_is_written_ahead_and_only_grows(tmp_path: Path) -> None:
    """The mark covers every admitted ordinal before it is sent, written `ahead` at a time;
    a later segment reads it back; it never shrinks when a resume starts again from 0."""
    mark = AdmissionMark(RunDir(tmp_path), ahead=4, earlier_segments=False)
    assert not mark.sent_before(0)
    for ordinal in range(6):
        mark.admit(ordinal)
    mark.close()
    assert (tmp_path / "admitted").read_bytes() == b"%020d\n" % 7
    again = AdmissionMark(RunDir(tmp_path), ahead=4, earlier_segments=True)
    assert again.sent_before(7)
    assert not again.sent_before(8)
    again.admit(2)  # the resume admits from the start: below the mark, nothing is written
    again.close()
    assert int((tmp_path / "admitted").read_bytes()) == 7


@pytest.mark.parametrize(
    ("content", "earlier_segments", "sent_before_0", "sent_before_huge"),
    [
        (None, False, False, False),  # a new run
        (None, True, True, True),  # a run from before the mark existed: assume any was sent
        (b"", True, False, False),  # the earlier segment admitted nothing
        (b"garbage\n", True, True, True),  # unreadable: assume any was sent
    ],
)
def test_admission_mark_without_a_readable_number(
    tmp_path: Path,
    content: bytes | None,
    earlier_segments: bool,
    sent_before_0: bool,
    sent_before_huge: bool,
) -> None:
    """What the mark says when there is no number to read: never less careful than the facts."""
    if content is not None:
        (tmp_path / "admitted").write_bytes(content)
    mark = AdmissionMark(RunDir(tmp_path), ahead=4, earlier_segments=earlier_segments)
    assert (mark.sent_before(0), mark.sent_before(10**9)) == (sent_before_0, sent_before_huge)
    mark.close()


def test_counts_continued_from_the_resume_read_equal_a_full_recount(tmp_path: Path) -> None:
    """The fold begun while reading the done set and finished on the segment's new lines (a
    --retry-failed line superseding a failed one among them) counts what one full pass does."""
    journal = tmp_path / "results.jsonl"

    def line(asset: str, outcome: str, code: int | None, latency: float) -> bytes:
        return (
            orjson.dumps(
                {
                    "target": {"asset_id": asset},
                    "org_id": "o1",
                    "command_id": None,
                    "outcome": outcome,
                    "cancelled_command_ids": ["c"] * (outcome == "cancelled"),
                    "attempts": 1,
                    "code": code,
                    "http_status": 200,
                    "latency_ms": latency,
                    "effect_unknown": outcome == "failed",
                }
            )
            + b"\n"
        )

    journal.write_bytes(
        b"".join(line(f"a{i}", "cancelled", 0, i) for i in range(5))
        + line("bad", "failed", 99404, 3.0)
    )
    counted = JournalFold()
    finished = finished_targets(
        RunDir(tmp_path), retry_failed=True, cursor=counted.cursor, visit=counted.add
    )
    assert len(finished.done) == 5
    with journal.open("ab") as stream:  # the segment retries the failed one, and one more
        stream.write(line("bad", "cancelled", 0, 7.0) + line("a9", "nothing_to_cancel", 0, 1.0))
    continued = details = counted.read_rest(RunDir(tmp_path))
    full = full_details = counts_of(RunDir(tmp_path))
    assert continued == full
    assert continued.outcomes == {"cancelled": 6, "nothing_to_cancel": 1}
    assert not continued.errors
    assert details.by_org == full_details.by_org == {"o1": {"cancelled": 6, "nothing_to_cancel": 1}}
    assert not details.failed
