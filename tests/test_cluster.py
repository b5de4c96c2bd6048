"""One job over several processes and machines: shards, the Kubernetes manifests, metrics."""

from __future__ import annotations

import random
import re
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import orjson
import pytest
import yaml
from aiohttp import web

from tests.gateways import answer, gateway, served
from tests.runs import results, run_job, write_job
from tests.simproc import run_worker, sim_get, simulator_process, worker_env
from worker.app.metrics import MetricsAddress
from worker.cli.grammar import build_parser
from worker.cli.main import HANDLERS
from worker.jobs.parse import load_job
from worker.jobs.plan import plan, run_targets
from worker.jobs.units import parse_shard
from worker.model import Shard

DEPLOY = Path(__file__).parent.parent / "deploy" / "kubernetes"


def shard_job(tmp_path: Path, rows: list[str], name: str = "job.yaml") -> Path:
    (tmp_path / f"{name}.csv").write_text("asset_id\n" + "".join(f"{r}\n" for r in rows))
    return write_job(tmp_path, f"targets_file: {name}.csv\nlimits: {{rate: 2000}}\n", name)


def test_shards_split_every_target_exactly_once_whatever_the_order(tmp_path: Path) -> None:
    rows = [f"as{i:06d}" for i in range(2000)]
    shuffled = rows[:]
    random.Random(3).shuffle(shuffled)
    owners: dict[str, int] = {}
    for name, listed in (("a.yaml", rows), ("b.yaml", shuffled)):
        job = load_job(shard_job(tmp_path, listed, name))
        seen: Counter[str] = Counter()
        for index in range(4):
            shard_plan = plan(job, Shard(index, 4))
            assets = [t.asset_id or "" for _, t in run_targets(job, shard_plan)]
            assert shard_plan.total == len(assets)
            assert 400 < len(assets) < 600  # about a quarter each
            for asset in assets:
                assert owners.setdefault(asset, index) == index  # the same shard either way
            seen.update(assets)
        assert set(seen) == set(rows)
        assert set(seen.values()) == {1}


@pytest.mark.parametrize("text", ["4/4", "1", "a/2", "-1/3", "0/0", "1/2/3"])
def test_bad_shards_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match=r"K/N|K must be"):
        parse_shard(text)


def test_four_shard_processes_cover_every_target_exactly_once(tmp_path: Path) -> None:
    """Four `worker run --shard K/4` at once against one gateway; `worker report` merges them."""
    count = 1200
    with simulator_process("--devices", str(count)) as url:
        job = shard_job(tmp_path, [f"as{i:06d}" for i in range(count)])
        processes = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "worker",
                    "run",
                    str(job),
                    "--gateway",
                    url,
                    "--yes",
                    "--shard",
                    f"{k}/4",
                    "--rate",
                    "500",
                    "--out",
                    str(tmp_path / f"shard-{k}"),
                    "--no-progress",
                ],
                env=worker_env(),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for k in range(4)
        ]
        for process in processes:
            _, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
        devices = sim_get(url, "/_sim/devices")
    journalled = Counter(
        line["target"]["asset_id"] for k in range(4) for line in results(tmp_path / f"shard-{k}")
    )
    assert len(journalled) == count
    assert set(journalled.values()) == {1}
    assert {d["cancel_calls"] for d in devices} == {1}  # no device was called twice
    merged = run_worker(
        "report",
        *(str(tmp_path / f"shard-{k}") for k in range(4)),
        "--json",
        "--html",
        str(tmp_path / "all.html"),
    )
    assert merged.returncode == 0, merged.stderr
    total = orjson.loads(merged.stdout)["total"]
    assert total["targets"] == count
    assert sum(total["outcomes"].values()) == count
    shards = {run["shard"] for run in orjson.loads(merged.stdout)["runs"]}
    assert shards == {"0/4", "1/4", "2/4", "3/4"}


def test_a_shard_resumes_only_as_the_same_shard(tmp_path: Path) -> None:
    with simulator_process("--devices", "100") as url:
        job = shard_job(tmp_path, [f"as{i:06d}" for i in range(100)])
        out = tmp_path / "shard-1"
        first = ["run", str(job), "--gateway", url, "--yes", "--shard", "1/3", "--out", str(out)]
        assert run_worker(*first).returncode == 0
        other = run_worker("run", str(job), "--gateway", url, "--resume", str(out), "--yes")
        assert other.returncode == 2
        assert "covers shard 1/3; pass --shard 1/3" in other.stderr
        again = run_worker(*first, "--resume-existing")  # a retried Kubernetes index
        assert again.returncode == 0, again.stderr
    assert len(results(out)) == plan(load_job(job), Shard(1, 3)).total


# -- the Kubernetes manifests --------------------------------------------------------------


def manifest(name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((DEPLOY / name).read_text(encoding="utf-8"))
    return loaded


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    template: dict[str, Any] = spec["template"]["spec"]
    return template


def worker_args(container: dict[str, Any], index: int) -> Any:
    """The container's args as `worker` parses them, with the shard index put in."""
    args = [re.sub(r"\$\(SHARD_INDEX\)", str(index), arg) for arg in container["args"]]
    return build_parser(HANDLERS).parse_args(args)


def assert_credentials_from_the_secret(container: dict[str, Any]) -> None:
    env = {item["name"]: item for item in container["env"]}
    for name in ("ENOS_APP_KEY", "ENOS_APP_SECRET"):
        assert "value" not in env[name]  # never a literal secret in a manifest
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "worker-enos-app"


def test_the_indexed_job_runs_each_shard_once_and_resumes_a_retried_index() -> None:
    doc = manifest("indexed-job.yaml")
    spec, pod = doc["spec"], pod_spec(doc)
    shards = spec["completions"]
    assert (doc["kind"], spec["completionMode"]) == ("Job", "Indexed")
    assert spec["parallelism"] == shards
    assert spec["backoffLimitPerIndex"] >= 1
    assert pod["restartPolicy"] == "Never"  # required by backoffLimitPerIndex
    (container,) = pod["containers"]
    env = {item["name"]: item for item in container["env"]}
    assert "job-completion-index" in env["SHARD_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert_credentials_from_the_secret(container)
    outs = set()
    for index in range(shards):
        args = worker_args(container, index)
        assert args.command == "run"
        assert str(parse_shard(args.shard)) == f"{index}/{shards}"
        assert (args.resume_existing, args.yes) == (True, True)
        outs.add(args.out)
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts[str(args.job.parent)] == "job"
        assert any(
            str(args.out).startswith(path) for path, name in mounts.items() if name == "results"
        )
        assert float(args.rate) * shards == 100  # per-shard rate = total / shards
        assert (
            MetricsAddress.parse(args.metrics_port).port == container["ports"][0]["containerPort"]
        )
    assert len(outs) == shards  # one run directory per shard
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["job"]["configMap"]["name"] == manifest("configmap.yaml")["metadata"]["name"]
    claim = volumes["results"]["persistentVolumeClaim"]["claimName"]
    assert claim == manifest("results-pvc.yaml")["metadata"]["name"]
    # its podFailurePolicy (what each exit code does): tests/test_deploy.py


def test_the_cronjob_runs_the_job_on_schedule_without_overlap(tmp_path: Path) -> None:
    doc = manifest("cronjob.yaml")
    assert doc["kind"] == "CronJob"
    assert len(doc["spec"]["schedule"].split()) == 5
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    (container,) = pod_spec(doc)["containers"]
    args = worker_args(container, 0)
    assert (args.command, args.yes, args.resume_existing) == ("run", True, True)
    assert_credentials_from_the_secret(container)
    job_file = manifest("maintenance-configmap.yaml")["data"]["job.yaml"]
    (tmp_path / "job.yaml").write_text(job_file)
    devices = manifest("maintenance-configmap.yaml")["data"]["devices.csv"]
    (tmp_path / "devices.csv").write_text(devices)
    assert plan(load_job(tmp_path / "job.yaml")).total == 4  # the ConfigMap's job is valid


# -- Prometheus metrics --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.anyio
async def test_metrics_are_served_during_the_run(tmp_path: Path) -> None:
    """The gateway holds the last calls until the test has scraped: the scrape sees requests
    by status and code, outcomes, the rate, in flight and latency while the run is going."""
    arrived, release = anyio.Event(), anyio.Event()
    calls = 0

    async def commands(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls == 3:
            return web.Response(status=503)
        if calls > 5:
            arrived.set()
            await release.wait()
        return web.Response(
            body=answer([{"commandId": f"c{calls}"}]), content_type="application/json"
        )

    job = write_job(tmp_path, "targets:\n" + "".join(f"  - asset_id: a{i}\n" for i in range(8)))
    port = free_port()
    async with served(gateway(commands)) as url, anyio.create_task_group() as group:
        group.start_soon(
            lambda: run_job(job, url, tmp_path / "run", metrics=MetricsAddress("127.0.0.1", port))
        )
        await arrived.wait()
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
        release.set()
    assert 'worker_requests_total{action="cancel",code="0",http_status="200"}' in text
    assert 'worker_requests_total{action="cancel",code="none",http_status="503"} 1.0' in text
    assert 'worker_retries_total{decision="retry"} 1.0' in text
    assert re.search(r'worker_targets_finished_total\{outcome="cancelled"\} [1-9]', text)
    assert re.search(r"worker_requests_in_flight [1-9]", text)
    assert "worker_rate_allowed 10.0" in text
    assert "worker_request_latency_seconds_bucket" in text
    assert len(results(tmp_path / "run")) == 8
