"""targets_query from the command line: ``worker resolve`` (the file a job then runs as is),
``worker validate`` (the query in words, nothing sent), no device secret in any output even
from a gateway that always sends them, and kill -9 or SIGTERM while a query is resolved, then
a resume that resolves again."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from worker.sim.devices import device_secret

HEAD = "version: 1\nname: q\norg_id: o15541858646501\n"
PRODUCT = "bXuuAiku"


def query_job(tmp_path: Path, query: str, extra: str = "") -> Path:
    """A job whose targets come from `query` (a flow mapping)."""
    path = tmp_path / "job.yaml"
    path.write_text(HEAD + f"targets_query: {query}\n" + extra, encoding="utf-8")
    return path


def lines_of(path: Path) -> list[dict[str, Any]]:
    """The JSON lines of a file."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def test_worker_resolve_writes_the_file_a_job_runs_as_is(tmp_path: Path) -> None:
    """resolve pages the query into a reviewed targets file (counts by product and status, its
    sha256), refuses to overwrite it, and a job naming it as targets_file runs every device."""
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}, status: online}}")
    out = tmp_path / "devices.csv"
    with simulator_process("--devices", "400") as url:
        done = run_worker("resolve", str(job), "--gateway", url, "--out", str(out))
        assert done.returncode == 0, done.stderr
        assert f"search            productKey = '{PRODUCT}' and status = 'online'" in done.stdout
        assert "by product and status" in done.stdout
        rows = out.read_text().splitlines()
        assert rows[0] == "asset_id,org_id"
        found = len(rows) - 1
        assert f"{PRODUCT}             online     {found:>10,}" in done.stdout
        assert f"targets_file: {out}" in done.stdout
        again = run_worker("resolve", str(job), "--gateway", url, "--out", str(out))
        assert again.returncode == 2
        assert "never overwrites" in again.stderr
        reviewed = tmp_path / "reviewed.yaml"
        reviewed.write_text(HEAD + f"targets_file: {out.name}\n")
        checked = run_worker("validate", str(reviewed))
        assert f"targets           {found:,} targets" in checked.stdout
        run_dir = str(tmp_path / "run")
        fast = ("--rate", "unlimited")
        ran = run_worker("run", str(reviewed), "--gateway", url, "--out", run_dir, *fast)
    assert ran.returncode == 0, ran.stderr
    assert len(lines_of(tmp_path / "run" / "results.jsonl")) == found


def test_worker_resolve_of_an_incomplete_query_exits_3(tmp_path: Path) -> None:
    """Pages reshuffled at every call never add up: resolve says how many it found of how
    many, writes only FILE.partial (exit 3); with --accept-incomplete it writes FILE (exit 0)."""
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}")
    out = tmp_path / "devices.csv"
    extra = ("--device-page-max", "10", "--reshuffle-every", "1")
    with simulator_process(*extra) as url:
        fast = ("--rate", "unlimited")
        done = run_worker("resolve", str(job), "--gateway", url, "--out", str(out), *fast)
        assert done.returncode == 3
        assert "INCOMPLETE        found 247 of 250 devices after 5 passes" in done.stdout
        assert not out.exists()
        assert (tmp_path / "devices.csv.partial").exists()
        accepted = ("--accept-incomplete", "--rate", "unlimited")
        done = run_worker("resolve", str(job), "--gateway", url, "--out", str(out), *accepted)
    assert done.returncode == 0, done.stderr
    assert "devices short; written anyway" in done.stdout
    assert out.exists()


def test_validate_says_the_query_in_words_and_sends_nothing(tmp_path: Path) -> None:
    """validate needs no gateway: it says where the targets come from and the searches it
    would send; a dry run points at resolve."""
    job = query_job(tmp_path, f"{{product_key: [{PRODUCT}, pQ7sLk2d], status: offline}}")
    done = run_worker("validate", str(job))
    assert done.returncode == 0, done.stderr
    assert "from a query (Search Device)" in done.stdout
    assert f"of product {PRODUCT} or pQ7sLk2d, whose status is offline" in done.stdout
    assert "search            productKey = 'pQ7sLk2d' and status = 'offline'" in done.stdout
    data = orjson.loads(run_worker("validate", str(job), "--json").stdout)
    assert len(data["targets_query"]["expressions"]) == 2
    dry = run_worker("run", str(job), "--gateway", "http://127.0.0.1:9", "--dry-run")
    assert dry.returncode == 2
    assert "worker resolve" in dry.stderr


def test_device_secrets_reach_no_file_and_no_log(tmp_path: Path) -> None:
    """A gateway that sends every device's secret whatever the projection: not one of them is
    in the resolved file, the run directory, the report, the audit or any log line."""
    job = query_job(tmp_path, "{status: online}")
    out = tmp_path / "devices.csv"
    run_dir = tmp_path / "run"
    with simulator_process("--devices", "300", "--leak-secrets", "--seed", "11") as url:
        fast = ("--log-json", "--rate", "unlimited")
        outputs = [
            run_worker("resolve", str(job), "--gateway", url, "--out", str(out), *fast),
            run_worker("run", str(job), "--gateway", url, "--out", str(run_dir), *fast, "--yes"),
        ]
    outputs += [run_worker("report", str(run_dir)), run_worker("audit", "verify", str(run_dir))]
    assert [done.returncode for done in outputs] == [0, 0, 0, 0], outputs[1].stderr
    assert "search_devices" in (run_dir / "audit.jsonl").read_text()
    secrets = [device_secret(11, index) for index in range(300)]
    texts = [done.stdout + done.stderr for done in outputs]
    texts += [path.read_text(errors="replace") for path in [out, *run_dir.iterdir()]]
    for secret in secrets:
        assert not any(secret in text for text in texts), secret


def _start(job: Path, url: str, run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "worker", "run", str(job), "--gateway", url),
            *("--out", str(run_dir), "--yes", "--rate", "unlimited", "--no-progress"),
        ],
        env=worker_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _searches(run_dir: Path) -> int:
    path = run_dir / "audit.jsonl"
    return path.read_bytes().count(b'"search_devices"') if path.exists() else 0


def _wait_for_searches(process: subprocess.Popen[str], run_dir: Path, count: int) -> None:
    deadline = time.monotonic() + 60
    while _searches(run_dir) < count:
        assert process.poll() is None, "the run ended before the point of interruption"
        assert time.monotonic() < deadline, "the resolution made no progress"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["kill -9", "SIGTERM"])
def test_a_run_stopped_while_resolving_resolves_again_on_resume(tmp_path: Path, how: str) -> None:
    """kill -9 (or SIGTERM, exit 4) in the middle of the searches: no snapshot is kept and
    nothing was cancelled; the resume resolves again from the start and runs every device
    once; the audit holds both segments whole."""
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}")
    run_dir = tmp_path / "run"
    extra = ("--devices", "2000", "--device-page-max", "10", "--latency-ms", "20")
    with simulator_process(*extra) as url:
        process = _start(job, url, run_dir)
        _wait_for_searches(process, run_dir, 8)
        if how == "kill -9":
            process.kill()
        else:
            process.send_signal(signal.SIGTERM)
        process.communicate(timeout=30)
        assert process.returncode == (-signal.SIGKILL if how == "kill -9" else 4)
        manifest = orjson.loads((run_dir / "run.json").read_bytes())
        assert manifest["targets_file"] is None
        assert not (run_dir / "targets.csv").exists()
        assert not (run_dir / "results.jsonl").read_bytes()
        fast = ("--yes", "--rate", "unlimited")
        resumed = run_worker("run", str(job), "--gateway", url, "--resume", str(run_dir), *fast)
    assert resumed.returncode == 0, resumed.stderr
    records = lines_of(run_dir / "audit.jsonl")
    starts = [i for i, r in enumerate(records) if r["type"] == "run_started"]
    resolved = [i for i, r in enumerate(records) if r["type"] == "targets_resolved"]
    assert len(starts) == 2
    assert resolved[-1] > starts[1]
    assert records[starts[1] + 1]["action"] == "search_devices"
    targets = [line["target"]["asset_id"] for line in lines_of(run_dir / "results.jsonl")]
    assert sorted(targets) == [f"as{i:06d}" for i in range(0, 2000, 4)]
    assert run_worker("audit", "verify", str(run_dir)).returncode == 0


def test_validate_probe_of_a_query_job_searches_one_device(tmp_path: Path) -> None:
    """`validate --probe` of a query job: one Search Device of one device per search (no
    cancel, no resolution) counts the devices; the calls estimated from them (1 page + 100
    cancels) against what the gateway says is left: 0 when they fit, 1 when they do not."""
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}")
    with simulator_process("--devices", "400", "--quota", "minute=1000,day=500") as url:
        probed = run_worker("validate", str(job), "--probe", "--gateway", url)
        stats = sim_get(url, "/_sim/stats")
    assert probed.returncode == 0, probed.stdout + probed.stderr
    assert "day: 499 of 500 left" in probed.stdout
    assert "query counts      100 devices now" in probed.stdout
    assert "101 calls fit in what is left" in probed.stdout
    assert stats["by_action"] == {"search_devices": 1}
    with simulator_process("--devices", "400", "--quota", "minute=1000,day=1") as url:
        spent = run_worker("validate", str(job), "--probe", "--gateway", url)
    assert spent.returncode == 1, spent.stdout + spent.stderr
    assert "fits              NO: 101 calls do not fit: day: 0 of 1 left" in spent.stdout
