"""The operator's view: the report of finished, failed, resumed, killed and abandoned runs, the
follow-up job, the page in headless Chromium, and the progress line in an 80-column terminal."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import re
import shutil
import signal
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import anyio
import orjson
import pytest

from tests.runs import resume_job, run_job, write_job
from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from tests.test_operate import csv_job, kill_9_midway, start_worker
from worker.core.ports import Progress
from worker.core.ratelimit import RateLimiter
from worker.model import Outcome
from worker.report.console import ProgressLine, fit
from worker.report.details import load_run
from worker.report.html import write_report
from worker.sim.simulator import Simulator
from worker.store.layout import RunDir

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = os.environ.get("WORKER_SCREENSHOT")  # where to keep a copy of the screenshot


async def finished_run(gateway: str, tmp_path: Path) -> Path:
    """30 targets over 2.5 s (long enough for a throughput chart), one unknown (failed 99404),
    one by product key; exit 1."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(1, 30))
    lines += "  - {product_key: pQ7sLk2d, device_key: dev_000033}\n  - asset_id: nosuch01\n"
    job = write_job(tmp_path, "limits: {rate: 12}\ntargets:\n" + lines)
    code, report = await run_job(job, gateway, tmp_path / "run")
    assert code == 1
    assert f"report             {tmp_path / 'run' / 'report.html'}" in report
    return tmp_path / "run"


@pytest.mark.anyio
async def test_a_finished_run_with_a_failure(gateway: str, tmp_path: Path) -> None:
    """The numbers: outcomes, by org and product key, the failed target with its code and
    message, failed.csv and a follow-up job that validates and runs."""
    run_dir = await finished_run(gateway, tmp_path)
    report = load_run(RunDir(run_dir))
    summary, found = report.summary, report.counts
    assert summary.finished
    assert summary.outcomes["failed"] == 1
    assert sum(found.by_org["o15541858646501"].values()) == 31
    assert (
        found.by_product["pQ7sLk2d"]["cancelled"]
        + found.by_product["pQ7sLk2d"]["nothing_to_cancel"]
        == 1
    )
    (failed,) = found.failed.values()
    assert (failed["asset_id"], failed["code"]) == ("nosuch01", 99404)
    assert "does not exist" in failed["msg"]
    header = "asset_id,product_key,device_key,command_id,org_id"
    rows = (run_dir / "failed.csv").read_text().splitlines()
    assert rows == [header, "nosuch01,,,,o15541858646501"]
    followup = run_dir / "followup.yaml"
    assert run_worker("validate", str(followup)).returncode == 0
    code, _ = await run_job(followup, gateway, tmp_path / "followup-run")
    assert code == 1  # it ran: the unknown device is still unknown
    page = (run_dir / "report.html").read_text()
    assert "<title>t: run " in page
    assert page.count('class="chart"') >= 3  # outcomes, throughput, latency
    assert "nosuch01" in page
    assert "not found (no such device, or no such command)" in page


@pytest.mark.anyio
async def test_a_resumed_run_shows_both_segments_and_their_rates(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """A deadline stops segment 1 at 100/s; a resume at 400/s ends it: the summary has both
    asked rates, the chart a segment divider."""
    lines = "".join(f"  - asset_id: as{i:06d}\n" for i in range(150))
    job = write_job(tmp_path, "limits: {rate: 100, deadline: 1s, timeout: 0.2}\ntargets:\n" + lines)
    run_dir = tmp_path / "run"
    code, _ = await run_job(job, gateway, run_dir)
    assert code == 4
    code, report = await resume_job(job, gateway, run_dir, rate=400.0, deadline=None)
    assert code == 0
    summary = load_run(RunDir(run_dir)).summary
    assert [s["asked"] for s in summary.rate.segments] == [100.0, 400.0]
    assert "asked 100/s, then 400/s" in report
    assert "segment 2" in (run_dir / "report.html").read_text()


def test_a_killed_run_is_reported_unfinished(tmp_path: Path) -> None:
    """kill -9: `worker report` says unfinished and resumable with the command, never exit 0,
    and counts the dead segment's requests from its audit records."""
    job = csv_job(tmp_path, 3000, "{rate: 2000, concurrency: 8}")
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "3000") as url:
        kill_9_midway(job, url, run_dir, 500)
    done = run_worker("report", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert "unfinished (the process died; resumable)" in done.stdout
    assert "exit code          none yet" in done.stdout
    assert f"--resume {run_dir}" in done.stdout
    assert "summary.json" not in done.stdout.split("files")[1].splitlines()[0]
    requests = int(re.search(r"requests\s+([\d,]+)", done.stdout).group(1).replace(",", ""))  # type: ignore[union-attr]
    assert requests >= 500
    page = (run_dir / "report.html").read_text()
    assert "did not finish" in page
    assert '<p class="verdict died">Did not finish (the process died): ' in page
    assert f"<code>worker run {job} --resume {run_dir}</code>" in page  # nothing failed: no flag


def test_abandoned_requests_are_counted_and_listed(tmp_path: Path) -> None:
    """A second SIGINT abandons the requests in flight: the summary counts them (the audit's
    abandoned records) and the report lists their targets as possibly cancelled."""
    job = csv_job(tmp_path, 200, "{rate: 1000, concurrency: 8, timeout: 10}")
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "300", "--latency-ms", "3000") as url:
        process = start_worker("run", str(job), "--gateway", url, "--out", str(run_dir), "--yes")
        deadline = time.monotonic() + 30
        while sim_get(url, "/_sim/stats")["by_action"].get("cancel", 0) < 8:  # all in flight
            assert time.monotonic() < deadline, "the requests never went out"
            time.sleep(0.02)
        process.send_signal(signal.SIGINT)  # stop admitting ...
        assert process.stderr is not None
        while "no new targets" not in process.stderr.readline():  # (signals do not queue)
            assert process.poll() is None
        process.send_signal(signal.SIGINT)  # ... then abandon what is in flight
        process.communicate(timeout=30)
    assert process.returncode == 4
    summary = orjson.loads((run_dir / "summary.json").read_bytes())
    audit = _read(run_dir / "audit.jsonl").decode()
    abandoned = audit.count('"decision":"abandoned"')
    assert abandoned > 0
    assert summary["abandoned"] == abandoned
    assert summary["requests"] >= abandoned
    page = (run_dir / "report.html").read_text()
    assert "Requests abandoned in flight" in page
    assert '<p class="verdict stopped">Stopped early (SIGINT): ' in page


def _read(path: Path) -> bytes:
    return path.read_bytes() if path.exists() else b""


@pytest.mark.anyio
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
async def test_the_page_loads_in_headless_chromium(gateway: str, tmp_path: Path) -> None:
    """The report loads in a real browser with no console errors, its SVG charts in the DOM,
    and a screenshot is written (WORKER_SCREENSHOT keeps a copy; the README's picture comes
    from the incident walk-through instead, see docs/report.png's commit)."""
    run_dir = await finished_run(gateway, tmp_path)
    write_report([load_run(RunDir(run_dir))], run_dir / "report.html")
    url = (run_dir / "report.html").as_uri()
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ]
    dom = await anyio.run_process(["chromium", *flags, "--dump-dom", url], check=True)
    page, log = dom.stdout.decode(), dom.stderr.decode()
    assert page.count("<svg") >= 3
    assert "<polyline" in page
    assert "Uncaught" not in log
    assert ":CONSOLE" not in log
    picture = tmp_path / "report.png"
    await anyio.run_process(
        ["chromium", *flags, f"--screenshot={picture}", "--window-size=1100,1900", url], check=True
    )
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if SCREENSHOT:
        shutil.copy(picture, SCREENSHOT)


def test_the_progress_line_stays_one_line_in_80_columns(tmp_path: Path) -> None:
    """In an 80-column pseudo-terminal, while rate changes are logged, every redraw of the
    progress line fits in 80 columns, and each log line first clears the progress line."""
    job = csv_job(tmp_path, 600, "{rate: 300, concurrency: 8}")
    with simulator_process("--devices", "700", "--rate-cap", "150") as url:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
        env = {k: v for k, v in worker_env().items() if k not in ("COLUMNS", "LINES")}
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker",
                "run",
                str(job),
                "--gateway",
                url,
                "--out",
                str(tmp_path / "run"),
                "--yes",
            ],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            env=env,
        )
        os.close(slave)
        output = _drain(master)
        process.wait(timeout=60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-2000:]
    redraws = [
        part
        for line in text.split("\n")
        for part in line.split("\r")
        if part.startswith("  ") and " done" in part
    ]
    assert len(redraws) >= 2, "the progress line was never drawn"
    for part in redraws:
        assert len(part.replace("\x1b[K", "")) <= 80, part
    assert "worker.rate_changed" in text  # a log line came while the progress line was up ...
    for line in text.split("\n"):
        if "worker.rate_changed" in line:
            assert "\r\x1b[K" in line.split("worker.rate_changed")[0]  # ... and cleared it first


def _drain(master: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(master)
    return b"".join(chunks)


@pytest.mark.anyio
async def test_a_follow_up_of_a_selective_job_keeps_its_match(
    sim: Simulator, gateway: str, tmp_path: Path
) -> None:
    """followup.yaml of a selective job carries the job's match; it validates."""
    job = write_job(
        tmp_path,
        "match: {command_name: setPoint42, created_after: "
        "2026-01-01T00:00:00Z}\ntargets:\n  - asset_id: nosuch01\n",
    )
    code, _ = await run_job(job, gateway, tmp_path / "run")
    assert code == 1
    followup = (tmp_path / "run" / "followup.yaml").read_text()
    assert "match:" in followup
    assert 'command_name: "setPoint42"' in followup
    assert run_worker("validate", str(tmp_path / "run" / "followup.yaml")).returncode == 0


def test_a_sweeps_progress_line_counts_searches_not_outcomes() -> None:
    """A verify sweep's probes end as nothing_to_cancel; its line must not say so."""
    progress = Progress()
    progress.outcomes[Outcome.NOTHING_TO_CANCEL] += 7
    progress.outcomes[Outcome.FAILED] += 1
    limiter = RateLimiter(50.0)
    lines = [
        ProgressLine(progress, limiter, 20, 0, tty=True, searching=searching)
        for searching in (True, False)
    ]
    for line in lines:
        line.show(io.StringIO(), 1.0)
    sweep, run = (fit(line.parts(), 200) for line in lines)
    assert sweep.startswith("  8/20 searched · 1 could not be searched")
    assert "cancel" not in sweep
    assert "7 nothing to cancel" in run
