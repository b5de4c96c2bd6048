"""The page an incident manager forwards: the verdict and the facts at the top of each run, what
to do next in every state (finished clean, failed, effect unknown, stopped, running), the
folded timeline, the outcome bar and the throughput chart over the whole run, and the page at
a phone's and a desktop's width in headless Chromium."""

from __future__ import annotations

import getpass
import hashlib
import html
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from tests.runs import run_job, write_job
from tests.test_report import finished_run
from worker import __version__
from worker.model import Limits
from worker.report import facts
from worker.report import html as html_page
from worker.report.auditverify import verify
from worker.report.charts import WIDTH, achieved_steps, bar_widths, outcome_bar, spans, throughput
from worker.report.details import load_run, timeline
from worker.report.html import render_html
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.store.appendlog import last_line
from worker.store.layout import RunDir, read_manifest
from worker.store.state import Manifest, Segment, Summary

ROOT = Path(__file__).resolve().parent.parent


def _page(run_dir: Path) -> str:
    return (run_dir / "report.html").read_text(encoding="utf-8")


def _next_block(page: str) -> str:
    """The what-next list of the (first) run."""
    start = page.index("<h3>What next</h3>")
    return page[start : page.index("</ol>", start)]


# -- the header ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_header_states_the_facts(gateway: str, tmp_path: Path) -> None:
    """The verdict in one sentence, then job and sha256, what it cancelled, gateway, operator,
    host, version and the audit head, which is the head `worker audit verify` computes."""
    run_dir = await finished_run(gateway, tmp_path)
    run = RunDir(run_dir)
    page, manifest = _page(run_dir), read_manifest(run)
    head = verify(run).head
    line = last_line(run.audit)
    assert line is not None
    assert head == hashlib.sha256(line).hexdigest()
    verdict = "Finished: 30 of 31 targets cancelled or had nothing to cancel; 1 failed (see below)."
    assert f'<p class="verdict failed">{verdict}</p>' in page
    facts = page[page.index('<table class="facts">') :]
    for fact in (
        manifest.job_sha256,
        manifest.gateway,
        getpass.getuser(),
        socket.gethostname(),
        __version__,
        head,
        f"worker audit verify {run_dir} --head {head}",
        "every cached command of each target (cancel-all)",
        manifest.segments[0].started_at,
    ):
        assert html.escape(fact) in facts.split("</table>")[0], fact
    title = f"t: run {manifest.run_id}"
    assert page.count(title) == 2  # the <title> and the one visible <h1>
    assert f"<h1>{title}</h1>" in page
    assert "<h2>" not in page  # one run: no second heading repeating it


@pytest.mark.anyio
async def test_a_selective_run_says_its_match_rule_in_words(gateway: str, tmp_path: Path) -> None:
    """What a selective job cancelled is its match rule, as `worker validate` words it."""
    job = write_job(
        tmp_path,
        "match: {command_name: setPoint42, command_type: 1}\ntargets:\n  - asset_id: as000001\n",
    )
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 0
    assert (
        "the cached commands that match: name contains &#x27;setPoint42&#x27; and "
        "commandType = 1" in _page(tmp_path / "run")
    )


def _started(segment: int, operator: str, version: str) -> bytes:
    return orjson.dumps(
        {
            "type": "run_started",
            "at": f"2026-12-01T1{segment}:00:00.000Z",
            "run_id": "r",
            "segment": segment,
            "worker_version": version,
            "operator": operator,
            "host": f"host{segment}",
        }
    )


@pytest.mark.parametrize("block", [7, 64, 1 << 20])
def test_the_last_segments_start_is_found_from_the_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block: int
) -> None:
    """Three segments: the first run_started is the first line, the last is searched for
    backwards in blocks (any block size, a record across a block's edge included); the header
    names both operators and both versions."""
    monkeypatch.setattr(facts, "BLOCK", block)
    attempt = orjson.dumps({"type": "attempt", "at": "x", "decision": "done"})
    lines = [_started(1, "alice", "0.1.0"), attempt, _started(2, "bob", "0.1.0"), attempt]
    lines += [_started(3, "carol", "0.2.0"), *[attempt] * 50]
    run = RunDir(tmp_path)
    run.audit.write_bytes(b"\n".join(lines) + b"\n")
    segments = [Segment(f"2026-12-01T1{n}:00:00.000Z", Limits()) for n in (1, 2, 3)]
    manifest = Manifest("r", "job.yaml", "j", "", "", 1, "gw", Limits(), segments)
    found = facts.read_facts(run, manifest)
    assert found.first is not None
    assert found.last is not None
    assert (found.first["operator"], found.last["operator"]) == ("alice", "carol")
    assert found.head == hashlib.sha256(attempt).hexdigest()
    assert html_page._who_ran(found) == "alice on host1 (segment 1); carol on host3 (segment 3)"
    assert html_page._version(found) == "0.2.0 (segment 1: 0.1.0)"


def test_one_segment_reads_only_the_first_and_the_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run of one segment never searches its audit for run_started records."""

    def refuse(_: Path) -> None:
        raise AssertionError("searched the audit")

    monkeypatch.setattr(facts, "_last_started", refuse)
    run = RunDir(tmp_path)
    run.audit.write_bytes(_started(1, "alice", "0.1.0") + b"\n")
    manifest = Manifest("r", "job.yaml", "j", "", "", 1, "gw", Limits(), [Segment("t", Limits())])
    found = facts.read_facts(run, manifest)
    assert found.last == found.first


# -- what next, in each state ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_what_next_when_every_target_is_done(gateway: str, tmp_path: Path) -> None:
    """A clean run: the verdict says so and there is nothing to do."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(5))
    code, _ = await run_job(write_job(tmp_path, "targets:\n" + lines), gateway, tmp_path / "run")
    assert code == 0
    page = _page(tmp_path / "run")
    assert "Finished: 5 of 5 targets cancelled or had nothing to cancel.</p>" in page
    assert "Nothing to do: every target was cancelled or had nothing to cancel." in page
    assert "--resume" not in _next_block(page)


@pytest.mark.anyio
async def test_what_next_when_targets_failed(gateway: str, tmp_path: Path) -> None:
    """Failed targets of a complete run: the follow-up job, validated first, with the count."""
    run_dir = await finished_run(gateway, tmp_path)
    block = _next_block(_page(run_dir))
    assert "1 target failed: read why below and fix the cause" in block
    validate = f"<code>worker validate {run_dir / 'followup.yaml'}</code>"
    run = f"<code>worker run {run_dir / 'followup.yaml'} --gateway {gateway}</code>"
    assert block.index(validate) < block.index(run)
    assert "--resume" not in block


@pytest.mark.anyio
async def test_what_next_when_effects_are_unknown(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """Lost answers: `worker verify DIR`, and each unknown target says why it is unknown."""
    sim.faults = Faults(drop_rate=0.3)
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(40))
    job = write_job(tmp_path, "limits: {rate: 500, attempts: 12}\ntargets:\n" + lines)
    await run_job(job, gateway, tmp_path / "run")
    report = load_run(RunDir(tmp_path / "run"))
    assert report.summary.effect_unknown > 0
    page = _page(tmp_path / "run")
    assert f"<code>worker verify {tmp_path / 'run'}</code>" in _next_block(page)
    assert "with an effect unknown (see below)" in page
    unknown = page[page.index("<h3>Effect unknown") :]
    assert "<th>why unknown</th>" in unknown
    assert "answer lost: no reply read after a call that may have taken effect" in unknown


@pytest.mark.anyio
@pytest.mark.parametrize("failing", [False, True])
async def test_what_next_when_the_run_stopped_early(
    gateway: str, tmp_path: Path, failing: bool
) -> None:
    """A deadline stop: resumable, with the exact resume command; --retry-failed only when a
    target failed."""
    lines = "  - asset_id: nosuch01\n" if failing else ""
    lines += "".join(f"  - asset_id: as{i:06d}\n" for i in range(150))
    job = write_job(tmp_path, "limits: {rate: 100, deadline: 1s, timeout: 0.2}\ntargets:\n" + lines)
    run_dir = tmp_path / "run"
    code, _ = await run_job(job, gateway, run_dir)
    assert code == 4
    summary = load_run(RunDir(run_dir)).summary
    page = _page(run_dir)
    total = 151 if failing else 150
    assert (
        f"Stopped early (deadline reached): {summary.not_attempted:,} of {total} targets not "
        "attempted; resumable." in page
    )
    flag = " --retry-failed" if failing else ""
    assert f"<code>worker run {job} --resume {run_dir}{flag}</code>" in _next_block(page)
    assert "followup.yaml" not in _next_block(page)  # the resume runs the failed ones again


LOCKER = (
    "import sys\nfrom pathlib import Path\nfrom worker.store.layout import RunDir\n"
    "from worker.store.lock import run_dir_lock\n"
    "with run_dir_lock(RunDir(Path(sys.argv[1]))):\n"
    "    print('held', flush=True)\n    sys.stdin.read()\n"
)


@contextmanager
def held_by_another_process(run_dir: Path) -> Iterator[int]:
    """run.lock flock'ed by a child process, as a live worker holds it; yields its pid."""
    with subprocess.Popen(
        [sys.executable, "-c", LOCKER, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as child:
        assert child.stdout is not None
        assert child.stdin is not None
        try:
            assert child.stdout.readline() == "held\n"
            yield child.pid
        finally:
            child.stdin.close()
            child.wait(timeout=10)


@pytest.mark.anyio
async def test_what_next_while_another_process_runs_it(gateway: str, tmp_path: Path) -> None:
    """A directory another process holds is running: say who, and only to check again later."""
    run_dir = await finished_run(gateway, tmp_path)
    with held_by_another_process(run_dir) as pid:
        page = render_html([load_run(RunDir(run_dir))])
    holder = f"pid {pid} on {socket.gethostname()}"
    assert f'<p class="verdict running">Running now ({holder}): 31 of 31 targets' in page
    block = _next_block(page)
    assert "Running; check again later." in block
    assert "--resume" not in block
    assert "followup" not in block
    assert "Running now" not in render_html([load_run(RunDir(run_dir))])  # released


# -- the timeline ----------------------------------------------------------------------------------


def _cuts_timeline() -> tuple[Manifest, list[list[Any]]]:
    """A segment whose fixed rate sat above the gateway's limit: 41 cuts from +3 s to +120 s,
    down to 50/s; then a second segment with a single cut."""
    rates: list[list[Any]] = [[1, 1.0, 480.0, 500.0], [1, 2.0, 490.0, 500.0]]
    for i in range(41):
        allowed = round(500 * 0.1 ** ((i + 1) / 41), 1)
        rates.append([1, round(3 + i * 117 / 40, 1), 100.0, allowed])
        rates.append([1, round(3 + i * 117 / 40, 1) + 0.5, 100.0, allowed])  # unchanged
    rates += [[2, 1.0, 50.0, 100.0], [2, 5.0, 40.0, 60.0]]
    segments = [
        Segment("2026-12-01T10:00:00.000Z", Limits(rate=500.0), "2026-12-01T10:02:05.000Z"),
        Segment("2026-12-01T11:00:00.000Z", Limits(rate=100.0), "2026-12-01T11:00:06.000Z"),
    ]
    for segment in segments:
        segment.reason, segment.exit_code = "finished", 0
    manifest = Manifest("r", "job.yaml", "j", "", "", 10, "gw", Limits(), segments)
    return manifest, rates


def test_consecutive_rate_cuts_are_one_row() -> None:
    """41 cuts of one segment are one row between that segment's start and end; a lone cut of
    the next segment keeps its own row."""
    manifest, rates = _cuts_timeline()
    rows = [what for _, what in timeline(manifest, rates)]
    assert rows == [
        "segment 1 started: 10 targets, rate 500.0",
        "segment 1: allowed rate lowered 41 times between +3 s and +120 s, from 500/s, lowest 50/s",
        "segment 1 ended (finished, exit 0)",
        "segment 2 started: 10 targets, rate 100.0",
        "segment 2 +5 s: allowed rate lowered 100 -> 60/s",
        "segment 2 ended (finished, exit 0)",
    ]
    when = [at for at, _ in timeline(manifest, rates)]
    assert when[1] == "2026-12-01T10:00:03.000Z"  # dated from the segment's start


# -- the charts ------------------------------------------------------------------------------------


def _summary(**changes: Any) -> Summary:
    """A summary of a finished run, with `changes`."""
    data: dict[str, Any] = {
        "job": "j",
        "run_id": "r",
        "targets": 300,
        "outcomes": {"cancelled": 255, "nothing_to_cancel": 0, "failed": 45},
        "not_attempted": 0,
        "effect_unknown": 0,
        "attempts": 300,
        "errors": {},
        "started_at": "2026-12-01T10:00:00.000Z",
        "finished_at": "2026-12-01T10:00:06.000Z",
        "duration_s": 5.5,
        "segments": 2,
        "stopped": "finished",
        "stop_message": "",
        "rate": {"requested": 100, "achieved": 54.5, "timeline": []},
        "latency_ms": {"p50": 1, "p95": 2, "p99": 3},
        "exit_code": 1,
        "resumable": True,
    }
    data.update(changes)
    return Summary.from_json(data)


def test_a_small_failed_share_stays_visible_in_the_outcome_bar() -> None:
    """255 cancelled and 45 failed: the failed part is red and its true share; 10 failed of
    10,000 still get 1.5 % of the bar; the counts and shares are written beside it."""
    assert bar_widths([255, 0, 45, 0]) == pytest.approx([510.0, 0.0, 90.0, 0.0])
    tiny = bar_widths([9990, 0, 10, 0])
    assert tiny[2] == pytest.approx(0.015 * WIDTH)
    assert sum(tiny) == pytest.approx(WIDTH)
    bar = outcome_bar(_summary())
    assert '<rect x="510.0" y="0" width="90.0" height="28" fill="#cf222e">' in bar
    assert "failed <b>45</b> (15.0 %)" in bar
    assert f'viewBox="0 0 {WIDTH} 28" width="100%"' in bar
    few = _summary(
        targets=10000, outcomes={"cancelled": 9990, "nothing_to_cancel": 0, "failed": 10}
    )
    assert 'width="9.0" height="28" fill="#cf222e"' in outcome_bar(few)
    assert "failed <b>10</b> (0.1 %)" in outcome_bar(few)


def test_the_throughput_chart_covers_every_segment_whole() -> None:
    """Samples start at +1 s and stop before a segment's end: the line starts at 0 s, reaches
    each segment's end (the last sample carried there), and a segment that died before its
    first sample shows its average."""
    summary = _summary(
        rate={
            "requested": 100,
            "achieved": 54.5,
            "timeline": [[1, 1.0, 100.0, 100.0], [1, 2.0, 100.0, 100.0]],
            "segments": [
                {"asked": 100.0, "achieved": 80.0, "requests": 200, "duration_s": 2.5},
                {"asked": 100.0, "achieved": 33.3, "requests": 100, "duration_s": 3.0},
            ],
        }
    )
    first, second = spans(summary)
    assert achieved_steps(first) == [(0.0, 1.0, 100.0), (1.0, 2.0, 100.0), (2.0, 2.5, 100.0)]
    ((start, end, average),) = achieved_steps(second)
    assert (start, end) == (0.0, 3.0)
    assert average == pytest.approx(100 / 3)
    chart = throughput(summary)
    assert 'width="100%"' in chart
    assert 'width="640"' not in chart
    xs = [
        float(point.split(",")[0])
        for line in chart.split('points="')[1:]
        for point in line.split('"')[0].split()
    ]
    assert min(xs) == pytest.approx(84.0)  # the plot's left edge: 0 s
    assert max(xs) == pytest.approx(WIDTH - 8)  # the run's last moment
    assert "0 to 6 s" in chart


# -- in a browser ----------------------------------------------------------------------------------

PROBE = """<script>
const svgs = [...document.querySelectorAll("svg")].map((e) => e.getBoundingClientRect());
const failed = document.querySelector('rect[fill="#cf222e"]');
const facts = document.querySelector("table.facts");
const found = {
  width: innerWidth,
  page: document.documentElement.scrollWidth,
  charts: svgs.map((r) => [r.left, r.right, r.height]),
  failed: failed ? failed.getBoundingClientRect().width : 0,
  verdict: document.querySelector(".verdict").innerText,
  facts: facts.innerText,
  factsHeight: facts.getBoundingClientRect().height,
};
parent.document.getElementById("at" + innerWidth).textContent = JSON.stringify(found);
</script></body>"""

FRAMES = (
    '<!doctype html><html><body style="margin:0"><pre id="at420"></pre><pre id="at1200"></pre>'
    '<iframe src="probe.html" style="width:420px;height:3000px;border:0"></iframe>'
    '<iframe src="probe.html" style="width:1200px;height:3000px;border:0"></iframe></body></html>'
)


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
async def test_the_page_fits_a_phone_and_a_desktop(gateway: str, tmp_path: Path) -> None:
    """At 420 and 1200 CSS pixels wide (frames: headless Chromium will not make a window
    narrower than 500): no chart is wider than the window, the page does not scroll sideways,
    the failed share of the bar is visible, the verdict and the facts render. The report has
    no script; a probe is added to a test-only copy."""
    run_dir = await finished_run(gateway, tmp_path)
    page = _page(run_dir)
    assert "<script" not in page
    assert "src=" not in page
    assert "href=" not in page
    (tmp_path / "probe.html").write_text(page.replace("</body>", PROBE), encoding="utf-8")
    (tmp_path / "frames.html").write_text(FRAMES, encoding="utf-8")
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    flags += ["--allow-file-access-from-files", "--enable-logging=stderr", "--v=0"]
    dom = await anyio.run_process(
        [
            "chromium",
            *flags,
            "--window-size=1300,3000",
            "--dump-dom",
            (tmp_path / "frames.html").as_uri(),
        ],
        check=True,
    )
    assert "Uncaught" not in dom.stderr.decode()
    head = verify(RunDir(run_dir)).head
    for width in (420, 1200):
        marker = f'<pre id="at{width}">'
        text = dom.stdout.decode().split(marker)[1].split("</pre>")[0]
        found = orjson.loads(html.unescape(text))
        assert found["width"] == width
        assert found["page"] <= width, "the page scrolls sideways"
        assert len(found["charts"]) == 3
        for left, right, height in found["charts"]:
            assert 0 <= left < right <= width
            assert height > 10
        assert found["failed"] >= 3, "the failed share of the bar is not visible"
        assert found["verdict"].startswith("Finished: 30 of 31 targets")
        assert head in found["facts"].replace("\n", "")
        assert socket.gethostname() in found["facts"]
        assert found["factsHeight"] > 100
