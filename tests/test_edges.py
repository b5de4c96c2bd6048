"""The edges an operator meets first: never a traceback, never a misleading exit code, hints
that would work. Each class of failure as a real `worker` process."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anyio
import orjson
import pytest
from aiohttp import web

from tests.gateways import gateway, served
from tests.simproc import run_worker, sim_get, simulator_process, worker_env

HEAD = "version: 1\nname: edge\norg_id: o15541858646501\n"
TARGETS = (
    HEAD
    + "limits: {rate: 2000}\ntargets:\n"
    + "".join(f"  - asset_id: as{i:06d}\n" for i in range(20))
)


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    """One simulator process for the module."""
    with simulator_process("--devices", "200") as url:
        yield url


def one_line(done: subprocess.CompletedProcess[str]) -> str:
    """The refusal: one line on stderr, no traceback anywhere."""
    assert "Traceback" not in done.stdout + done.stderr
    refusal = [line for line in done.stderr.splitlines() if line.startswith("worker: ")]
    assert len(refusal) == 1, done.stderr
    return refusal[0]


def test_out_under_a_file_is_one_line_exit_2(sim: str, tmp_path: Path) -> None:
    """--out beneath a file (not a directory): exit 2 naming the path, nothing sent."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    (tmp_path / "a-file").write_text("")
    before = sim_get(sim, "/_sim/stats")["business_calls"]
    done = run_worker("run", str(job), "--gateway", sim, "--out", str(tmp_path / "a-file" / "x"))
    assert done.returncode == 2
    assert "a-file" in one_line(done)
    assert sim_get(sim, "/_sim/stats")["business_calls"] == before


def test_out_that_is_a_file_is_said(sim: str, tmp_path: Path) -> None:
    """--out naming a file: what it is, and no resume hint (a resume would not work)."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    (tmp_path / "a-file").write_text("x")
    done = run_worker("run", str(job), "--gateway", sim, "--out", str(tmp_path / "a-file"))
    line = one_line(done)
    assert done.returncode == 2
    assert "is a file" in line
    assert "--resume" not in line


def test_out_holding_another_jobs_run_offers_no_resume(sim: str, tmp_path: Path) -> None:
    """An --out holding another job's run names it and offers no resume; holding this job's
    run offers the exact resume command."""
    first, second = tmp_path / "first.yaml", tmp_path / "second.yaml"
    first.write_text(TARGETS)
    second.write_text(TARGETS.replace("name: edge", "name: other"))
    out = tmp_path / "run"
    assert run_worker("run", str(first), "--gateway", sim, "--out", str(out)).returncode == 0
    other = run_worker("run", str(second), "--gateway", sim, "--out", str(out))
    assert other.returncode == 2
    assert "another job's run" in one_line(other)
    assert "--resume" not in other.stderr
    same = run_worker("run", str(first), "--gateway", sim, "--out", str(out))
    assert f"worker run {first} --resume {out}" in one_line(same)


def test_a_directory_without_permission_is_one_line_exit_2(sim: str, tmp_path: Path) -> None:
    """--out in a directory the worker may not write: exit 2, one line (root runs it without
    the capability that overrides permissions, as an unprivileged operator would be)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is needed to drop the permission override")
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    bounded = ["setpriv", "--bounding-set=-dac_override,-dac_read_search"]
    if os.geteuid() != 0:
        bounded = []  # an ordinary user meets the permission as it is
    done = subprocess.run(
        [
            *bounded,
            sys.executable,
            "-m",
            "worker",
            "run",
            str(job),
            "--gateway",
            sim,
            "--out",
            str(locked / "run"),
        ],
        env=worker_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "Permission denied" in one_line(done)


def test_a_read_only_filesystem_is_one_line_exit_2(sim: str, tmp_path: Path) -> None:
    """--out on a read-only mount: exit 2, one line (skipped where mounting is refused)."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        done = run_worker("run", str(job), "--gateway", sim, "--out", str(ro / "run"))
        page = run_worker("report", "--html", str(ro / "page.html"), str(tmp_path))
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)
    assert done.returncode == 2
    assert "Read-only file system" in one_line(done)
    assert page.returncode == 2
    one_line(page)


def closed_stdout(*args: str) -> subprocess.CompletedProcess[str]:
    """`worker ARGS | head -0`: stdout's reader is gone before the first line."""
    read, write = os.pipe()
    os.close(read)
    try:
        return subprocess.run(
            [sys.executable, "-m", "worker", *args],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            env=worker_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write)


def test_a_closed_stdout_is_no_traceback_and_the_run_goes_on(sim: str, tmp_path: Path) -> None:
    """validate and run with stdout's reader gone: no traceback, the real exit codes, and the
    run's files complete (its record does not depend on a terminal)."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    validated = closed_stdout("validate", str(job))
    assert validated.returncode == 0
    assert "Traceback" not in validated.stderr
    out = tmp_path / "run"
    ran = closed_stdout("run", str(job), "--gateway", sim, "--out", str(out))
    assert ran.returncode == 0, ran.stderr
    assert "Traceback" not in ran.stderr
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["outcomes"]["cancelled"] + summary["outcomes"]["nothing_to_cancel"] == 20


def test_two_starts_in_one_second_never_share_a_directory(sim: str, tmp_path: Path) -> None:
    """Two runs of one job started together with the default run directory: both finish, in
    two directories (runs/<job>-<UTC time>-<hex>/)."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    command = [sys.executable, "-m", "worker", "run", str(job), "--gateway", sim]
    started = [
        subprocess.Popen(
            command,
            cwd=tmp_path,
            env=worker_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    codes = [process.wait(timeout=60) for process in started]
    for process in started:
        for stream in (process.stdout, process.stderr):
            assert stream is not None
            stream.close()
    assert codes == [0, 0]
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 2
    assert all(name.startswith("edge-") and len(name.split("-")[-1]) == 6 for name in made)


def test_a_busy_run_directory_is_exit_4_and_report_says_running(sim: str, tmp_path: Path) -> None:
    """A run directory held by a live process: a resume is exit 4 ("busy", try again), and
    `worker report` says it is running (pid, host) instead of offering a resume."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    out = tmp_path / "run"
    assert run_worker("run", str(job), "--gateway", sim, "--out", str(out)).returncode == 0
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            f"fd = os.open({str(out / 'run.lock')!r}, os.O_RDWR)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\nos.ftruncate(fd, 0)\n"
            "os.write(fd, b'%d holder-host\\n' % os.getpid())\nprint('held', flush=True)\n"
            "sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        busy = run_worker("run", str(job), "--resume", str(out))
        report = run_worker("report", str(out))
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=10)
        assert holder.stdout is not None
        holder.stdout.close()
    assert busy.returncode == 4
    assert f"pid {holder.pid} on holder-host" in one_line(busy)
    assert report.returncode == 0
    assert f"running now: pid {holder.pid} on holder-host" in report.stdout
    assert "--resume" not in report.stdout


@pytest.mark.parametrize(
    ("command", "codes"),
    [
        (["audit", "verify"], ["0  every audit log is whole", "1  an audit log is broken"]),
        (["validate"], ["0  the job is valid", "2  the job file"]),
        (["report"], ["0  the summaries were printed", "2  bad usage"]),
        (["simulate"], ["0  stopped cleanly", "2  bad usage"]),
        (["demo"], ["1  the run finished; some targets failed", "4  interrupted"]),
    ],
)
def test_each_command_shows_its_own_exit_codes(command: list[str], codes: list[str]) -> None:
    """--help of each command shows its own exit codes, not run's."""
    done = run_worker(*command, "--help")
    assert done.returncode == 0
    for code in codes:
        assert code in done.stdout
    if command != ["demo"]:
        assert "some targets failed" not in done.stdout


def test_small_refusals(tmp_path: Path) -> None:
    """--head that is no sha256, a job with no targets, simulator values out of range: exit 2
    with one line each."""
    done = run_worker("audit", "verify", str(tmp_path), "--head", "abc")
    assert done.returncode == 2
    assert "64 hex digits" in one_line(done)
    empty = tmp_path / "empty.yaml"
    empty.write_text(HEAD + "targets: []\n")
    done = run_worker("validate", str(empty))
    assert done.returncode == 2
    assert "lists no targets" in one_line(done)
    for flags, words in (
        (["--port", "99999"], "--port 99999"),
        (["--devices", "-5"], "--devices"),
        (["--error-rate", "2"], "--error-rate 2"),
    ):
        done = run_worker("simulate", *flags, timeout=20)
        assert done.returncode == 2
        assert words in one_line(done)


HOSTILE = "\x1b]0;pwned\x07\x1b[2J\rALL TARGETS CANCELLED OK\r\n\u202e"


@pytest.mark.anyio
async def test_gateway_text_reaches_the_terminal_escaped(tmp_path: Path) -> None:
    """A gateway whose refusal carries ESC/OSC/CR-LF and a bidi override: the stop reason is
    printed (by the run and by `worker report`) with those characters shown escaped, never
    obeyed; the dry run's "would cancel" list likewise."""

    async def commands(request: web.Request) -> web.Response:
        if request.query.get("action") == "search":
            listed = [{"commandId": f"c{HOSTILE}", "state": 1, "createTime": 1}]
            body = {
                "code": 0,
                "msg": "OK",
                "requestId": "r",
                "data": listed,
                "pagination": {"pageNo": 1, "pageSize": 50, "totalSize": 1},
            }
            return web.json_response(body)
        return web.json_response({"code": 99403, "msg": HOSTILE, "requestId": "r", "data": None})

    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)
    out = tmp_path / "run"
    async with served(gateway(commands)) as url:
        ran = await anyio.to_thread.run_sync(
            lambda: run_worker("run", str(job), "--gateway", url, "--out", str(out))
        )
        dry = await anyio.to_thread.run_sync(
            lambda: run_worker("run", str(job), "--gateway", url, "--dry-run", "--sample", "2")
        )
    report = run_worker("report", str(out))
    assert ran.returncode == 3
    assert dry.returncode == 0, dry.stderr
    for printed in (ran.stdout, report.stdout, dry.stdout):
        assert "\x1b" not in printed
        assert "\u202e" not in printed
        assert "\r" not in printed
    assert "\\x1b]0;pwned" in ran.stdout
    assert "\\x1b]0;pwned" in report.stdout
    assert "\\x1b" in dry.stdout


def test_one_rate_warning_for_a_rate_the_gateway_refuses(tmp_path: Path) -> None:
    """A fixed rate above the gateway's cap: one rate warning with what to do (not one every
    few seconds), and the run's end says how many 429s it met."""
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "limits: {rate: 400}\ntargets_file: t.csv\n")
    (tmp_path / "t.csv").write_text(
        "asset_id\n" + "".join(f"as{i:06d}\n" for i in range(500)), encoding="utf-8"
    )
    with simulator_process("--devices", "600", "--rate-cap", "100") as url:
        done = run_worker("run", str(job), "--gateway", url, "--yes", "--out", str(tmp_path / "r"))
    assert done.returncode == 0, done.stderr[-2000:]
    events = [orjson.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    throttled = [
        e for e in events if e["event"] == "worker.rate_changed" and e["cause"] == "throttled"
    ]
    assert len(throttled) == 1
    assert "--rate auto" in throttled[0]["fix"]
    (finished,) = [e for e in events if e["event"] == "worker.run_finished"]
    assert finished["throttled"] > 1


def test_simulate_stops_cleanly_on_sigterm() -> None:
    """`worker simulate` stops with exit 0 on SIGTERM as on Ctrl-C (its --help says so), and
    says the credentials it accepts with a line a shell can take."""
    process = subprocess.Popen(
        [sys.executable, "-m", "worker", "simulate", "--port", "0", "--devices", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={k: v for k, v in worker_env().items() if not k.startswith("ENOS_")},
    )
    assert process.stdout is not None
    lines = [process.stdout.readline() for _ in range(3)]
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 0, err
    assert lines[0].startswith("worker simulate: serving http://127.0.0.1:")
    assert "ENOS_APP_KEY=sim-app-key ENOS_APP_SECRET=sim-app-secret" in lines[1]
    assert lines[2].strip().startswith("export ENOS_GATEWAY=http://127.0.0.1:")
    assert "Traceback" not in out + err


def test_validate_probe_reads_the_budget_and_says_whether_the_job_fits(tmp_path: Path) -> None:
    """`validate --probe`: one token and one read-only call (no cancel), the budget the
    gateway states, and whether the job's calls fit in what is left: 0 fits, 1 does not, 3
    could not probe."""
    job = tmp_path / "job.yaml"
    job.write_text(TARGETS)  # 20 targets, 20 calls
    with simulator_process("--devices", "50", "--quota", "minute=1000,day=15") as url:
        short = run_worker("validate", str(job), "--probe", "--gateway", url)
        stats = sim_get(url, "/_sim/stats")
    assert short.returncode == 1, short.stdout + short.stderr
    assert "day: 14 of 15 left" in short.stdout
    assert "fits              NO: 20 calls do not fit" in short.stdout
    assert stats["by_action"] == {"search": 1}  # one read-only call, never a cancel
    with simulator_process("--devices", "50", "--quota", "minute=1000,day=500") as url:
        ample = run_worker("validate", str(job), "--probe", "--gateway", url, "--json")
        wrong = run_worker(
            "validate",
            str(job),
            "--probe",
            "--gateway",
            url,
            env=worker_env(ENOS_APP_SECRET="not-the-secret"),
        )
    assert ample.returncode == 0
    facts = orjson.loads(ample.stdout)
    assert facts["probe"]["fits"] is True
    assert any(w.startswith("day: 499 of 500 left") for w in facts["probe"]["windows"])
    assert wrong.returncode == 3
    assert "could not probe" in wrong.stdout
