"""`worker` as a process: exit codes, refusals that send nothing, the example job end to end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET
from tests.simproc import run_worker, sim_get, simulator_process, worker_env

ROOT = Path(__file__).resolve().parent.parent
HEAD = "version: 1\nname: t\norg_id: o15541858646501\n"


@pytest.fixture(scope="module")
def sim_url() -> Iterator[str]:
    """One simulator process for the module's runs."""
    with simulator_process("--devices", "1000") as url:
        yield url


@pytest.fixture(scope="module")
def idle_sim() -> Iterator[str]:
    """A simulator that must never receive a request (refusal tests)."""
    with simulator_process() as url:
        yield url


def test_example_job_runs_to_exit_0(sim_url: str, tmp_path: Path) -> None:
    """worker run jobs/example.yaml --gateway URL against worker simulate exits 0."""
    out = tmp_path / "run"
    done = run_worker(
        "run",
        str(ROOT / "jobs" / "example.yaml"),
        "--gateway",
        sim_url,
        "--rate",
        "1000",
        "--out",
        str(out),
    )
    assert done.returncode == 0, done.stderr
    summary = orjson.loads((out / "summary.json").read_bytes())
    assert summary["targets"] == 300
    assert summary["not_attempted"] == 0
    assert sum(summary["outcomes"].values()) == 300
    assert "exit code          0" in done.stdout
    assert APP_SECRET not in done.stdout + done.stderr
    page = tmp_path / "report.html"
    report = run_worker("report", str(out), str(out), "--html", str(page))  # totals add up
    assert report.returncode == 0, report.stderr
    assert "All 2 runs: 600 targets" in report.stdout
    html = page.read_text()
    assert "<h3>Throughput</h3>" in html
    assert f"<tr><th>targets</th><td>{600:,}</td></tr>" in html


@pytest.mark.parametrize(
    "body",
    [
        "targets: [{asset_id: a}]\n",  # no version
        HEAD + "targets: [{asset_id: ''}]\n",
        HEAD + "targets: [{product_key: p}]\n",
        HEAD + "limits: {rate: 0}\ntargets: [{asset_id: a}]\n",
        HEAD + "limits: {concurrency: -1}\ntargets: [{asset_id: a}]\n",
        HEAD + "unknown: 1\ntargets: [{asset_id: a}]\n",
        HEAD + "targets_file: devices.csv\n",  # bad row 3 of the file
        "- not a mapping\n",
        HEAD + "targets: []\n",  # nothing to do
    ],
)
def test_bad_job_exits_2_and_sends_nothing(idle_sim: str, tmp_path: Path, body: str) -> None:
    """A bad job file: exit 2, a message naming the file, and no request at all."""
    (tmp_path / "devices.csv").write_text("asset_id\nas000001\n\nas000002,extra\n")
    job = tmp_path / "job.yaml"
    job.write_text(body)
    done = run_worker("run", str(job), "--gateway", idle_sim, "--out", str(tmp_path / "run"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert str(job.name) in done.stderr or "devices.csv" in done.stderr
    stats = sim_get(idle_sim, "/_sim/stats")
    assert stats["business_calls"] == 0
    assert stats["token_requests"] == 0


def test_usage_refusals_exit_2(idle_sim: str, tmp_path: Path) -> None:
    """No credentials, plain http to a remote host, an existing run directory: exit 2."""
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "targets: [{asset_id: as000001}]\n")
    env = {k: v for k, v in worker_env().items() if k != "ENOS_APP_SECRET"}
    done = run_worker("run", str(job), "--gateway", idle_sim, env=env)
    assert (done.returncode, "ENOS_APP_SECRET" in done.stderr) == (2, True)
    done = run_worker("run", str(job), "--gateway", "http://10.1.2.3")
    assert (done.returncode, "--insecure" in done.stderr) == (2, True)
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.jsonl").write_text("")
    done = run_worker("run", str(job), "--gateway", idle_sim, "--out", str(tmp_path / "old"))
    assert (done.returncode, "--resume" in done.stderr) == (2, False)  # it would not work
    assert "holds files but no run" in done.stderr
    assert sim_get(idle_sim, "/_sim/stats")["business_calls"] == 0


def test_credentials_file(sim_url: str, tmp_path: Path) -> None:
    """--credentials FILE with ENOS_APP_KEY=/ENOS_APP_SECRET= lines works like the environment."""
    secret_file = tmp_path / "creds.env"
    secret_file.write_text(
        f"# test\nENOS_APP_KEY={APP_KEY}\nexport ENOS_APP_SECRET='{APP_SECRET}'\n"
    )
    secret_file.chmod(0o600)
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "targets: [{asset_id: as000900}]\n")
    env = {k: v for k, v in worker_env().items() if not k.startswith("ENOS_")}
    done = run_worker(
        "run",
        str(job),
        "--gateway",
        sim_url,
        "--credentials",
        str(secret_file),
        "--out",
        str(tmp_path / "run"),
        env=env,
    )
    assert done.returncode == 0, done.stderr


def test_validate_prints_the_plan(tmp_path: Path) -> None:
    """validate: counts, duplicates, estimate at the rate, deadline warning; sends nothing."""
    job = tmp_path / "job.yaml"
    job.write_text(
        HEAD + "limits: {rate: 1, deadline: 1s}\ntargets:\n  - asset_id: a\n"
        "  - asset_id: b\n  - asset_id: a\n"
    )
    done = run_worker("validate", str(job))
    assert done.returncode == 0, done.stderr
    assert "2 targets (1 duplicate dropped)" in done.stdout
    assert "0m02s at 1/s" in done.stdout
    assert "deadline          0m01s" in done.stdout
    assert "abort rule        none" in done.stdout
    assert "WARNING" in done.stdout
    assert "duplicate of the target at" in done.stderr
    auto = run_worker("validate", str(job), "--rate", "auto", "--json")
    facts = orjson.loads(auto.stdout)
    assert (facts["rate"], facts["targets"], facts["estimated_s"]) == ("auto", 2, None)
    assert "auto (from" in run_worker("validate", str(job), "--rate", "auto").stdout


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["validate", "JOB", "--rate", "fast"], "--rate fast:"),
        (["validate", "JOB", "--deadline", "2hours"], "--deadline 2hours:"),
        (["run", "JOB", "--gateway", "http://127.0.0.1:181660"], "port out of range"),
        (["report", "NOPE"], "not a run directory"),
        (["simulate", "--port", "PORT_IN_USE"], "pick another --port"),
    ],
)
def test_operator_mistakes_exit_2_with_the_flag_named(
    tmp_path: Path, idle_sim: str, args: list[str], words: str
) -> None:
    """Each mistake: exit 2, a message naming that flag alone, no traceback."""
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "targets: [{asset_id: a}]\n")
    port = idle_sim.rsplit(":", 1)[1]
    argv = [
        a.replace("JOB", str(job))
        .replace("NOPE", str(tmp_path / "nope"))
        .replace("PORT_IN_USE", port)
        for a in args
    ]
    done = run_worker(*argv)
    assert done.returncode == 2, done.stdout + done.stderr
    assert words in done.stderr
    assert "Traceback" not in done.stderr
    assert "--deadline" not in done.stderr or "--deadline" in words


def test_report_html_path_mistakes_exit_2(sim_url: str, tmp_path: Path) -> None:
    """--html into a missing folder, or at a folder: exit 2 with the fix, no traceback."""
    out = tmp_path / "run"
    done = run_worker(
        "run",
        str(ROOT / "jobs" / "example.yaml"),
        "--gateway",
        sim_url,
        "--rate",
        "1000",
        "--out",
        str(out),
        "--no-progress",
    )
    assert done.returncode == 0, done.stderr
    for page, words in (
        (tmp_path / "missing" / "x.html", "does not exist"),
        (tmp_path, "is a directory"),
    ):
        done = run_worker("report", str(out), "--html", str(page))
        assert (done.returncode, "Traceback" in done.stderr) == (2, False), done.stderr
        assert words in done.stderr
