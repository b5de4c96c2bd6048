"""targets_query runs against the simulator: resolved into the run's snapshot at the start
(complete, or told and stopped before any cancel), pages that shrink until the gateway takes
them, adversarial pagination (reshuffles, a drifting fleet), an empty result, shards, a
snapshot never queried again, and the audit's record of it all."""

from __future__ import annotations

import hashlib
import io
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET
from tests.runs import results, summary
from worker.app.prepare import check_recorded, snapshot_targets, start_new, start_resumed
from worker.app.resolve import Resolver
from worker.app.run import execute
from worker.app.wiring import RunOptions
from worker.core.ratelimit import RateLimiter
from worker.core.retry import RetryPolicy
from worker.enos.devices import DevicePage, FoundDevice
from worker.errors import ExitCode, OversizedAnswerError, TargetError, UsageError
from worker.jobs.parse import load_job
from worker.model import Credentials, Shard, identity_key, key_digest
from worker.report import auditverify
from worker.report.details import load_run
from worker.report.html import render_html
from worker.report.query import differing_totals
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.sim.state import DEFAULT_ORG
from worker.store.layout import RunDir, read_manifest
from worker.store.snapshot import SnapshotWriter

pytestmark = pytest.mark.anyio
HEAD = "version: 1\nname: q\norg_id: o15541858646501\n"
PRODUCT = "bXuuAiku"  # every fourth generated device (as000000, as000004, ...)


def query_job(tmp_path: Path, query: str, extra: str = "", name: str = "job.yaml") -> Path:
    """A job whose targets come from `query` (a flow mapping)."""
    path = tmp_path / name
    path.write_text(HEAD + f"targets_query: {query}\n" + extra, encoding="utf-8")
    return path


def options_for(url: str, run_dir: Path, job_path: Path, **settings: Any) -> RunOptions:
    """A run's options as `worker run` builds them (fast backoff, no progress)."""
    limits = replace(load_job(job_path).limits, rate=None)
    return RunOptions(
        url,
        Credentials(APP_KEY, APP_SECRET),
        limits,
        RunDir(run_dir),
        progress=False,
        seed=1,
        backoff_base_s=0.01,
        backoff_cap_s=0.05,
        batch_settle_s=0.01,
        **settings,
    )


async def run_query(
    job_path: Path, url: str, run_dir: Path, *, shard: Shard | None = None, **settings: Any
) -> tuple[int, str]:
    """`worker run JOB` (a new run); (exit code, what it printed)."""
    options = options_for(url, run_dir, job_path, **settings)
    run_dir.mkdir(parents=True, exist_ok=True)
    job = load_job(job_path)
    start = start_new(job, shard, gateway=url, limits=options.limits)
    out = io.StringIO()
    code = await execute(snapshot_targets(start, options.run), options, out=out)
    return code, out.getvalue()


async def resume_query(
    job_path: Path, url: str, run_dir: Path, *, shard: Shard | None = None, **settings: Any
) -> tuple[int, str]:
    """`worker run JOB --resume DIR`; (exit code, what it printed)."""
    options = replace(options_for(url, run_dir, job_path, **settings), resume=True)
    run = RunDir(run_dir)
    start = start_resumed(load_job(job_path), run, shard, retry_failed=False, force=False)
    check_recorded(run, start.manifest, gateway=None)
    out = io.StringIO()
    code = await execute(start, options, out=out)
    return code, out.getvalue()


def simulator(devices: int = 200, products: int = 4, **faults: Any) -> Simulator:
    """A simulator with generated devices and the given faults."""
    return Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=devices,
        seed=7,
        products=products,
        faults=Faults(**faults),
    )


def audit_records(run_dir: Path) -> list[dict[str, Any]]:
    """Every audit record."""
    return [orjson.loads(line) for line in (run_dir / "audit.jsonl").read_bytes().splitlines()]


def snapshot_assets(run_dir: Path) -> list[str]:
    """The asset ids of the run's snapshot (targets.csv)."""
    lines = (run_dir / "targets.csv").read_text().splitlines()
    assert lines[0] == "asset_id,org_id"
    return [line.split(",")[0] for line in lines[1:]]


def of_product(devices: int, product: int = 0, products: int = 4) -> set[str]:
    """The asset ids of one generated product."""
    return {f"as{i:06d}" for i in range(product, devices, products)}


async def test_a_product_query_cancels_on_every_device_of_the_product(tmp_path: Path) -> None:
    """The query resolves after run_started and before any cancel into targets.csv (hashed in
    run.json and the audit's targets_resolved), then every device of the product is cancelled;
    the searches are audited as search_devices attempts; audit verify accepts it all."""
    sim = simulator()
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}")
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, text = await run_query(job, url, run_dir)
    assert code == ExitCode.OK, text
    assert "Query resolved (complete): 50 devices found of 50 counted" in text
    assert {line["target"]["asset_id"] for line in results(run_dir)} == of_product(200)
    manifest = read_manifest(RunDir(run_dir))
    digest = hashlib.sha256((run_dir / "targets.csv").read_bytes()).hexdigest()
    assert manifest.targets_file == "targets.csv"
    assert manifest.targets_sha256 == digest
    assert manifest.query is not None
    assert manifest.query["complete"]
    assert manifest.targets == 50
    kinds = [(r["type"], r.get("action")) for r in audit_records(run_dir)]
    assert kinds[:3] == [
        ("run_started", None),
        ("attempt", "search_devices"),
        ("targets_resolved", None),
    ]
    assert kinds[3] == ("attempt", "cancel")
    resolved = audit_records(run_dir)[2]
    assert resolved["targets_sha256"] == digest
    assert resolved["query"]["expressions"] == [f"productKey = '{PRODUCT}'"]
    assert resolved["query"]["parts"][0]["totals"] == [50]
    query = summary(run_dir)["query"]
    assert (query["found"], query["total"], query["passes"], query["calls"]) == (50, 50, 1, 1)
    assert "query found        50 of 50 devices (complete)" in text
    auditverify.verify(RunDir(run_dir))
    assert not (run_dir / "targets.csv.partial").exists()


async def test_pages_halve_until_the_gateway_takes_them(tmp_path: Path) -> None:
    """A gateway that refuses pages above 300 (99400): 1,000 then 500 are refused, 250 pages
    the product through; each refusal is an audited attempt."""
    sim = simulator(devices=2000, device_page_max=300)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, _ = await run_query(query_job(tmp_path, f"{{product_key: {PRODUCT}}}"), url, run_dir)
    assert code == ExitCode.OK
    query = summary(run_dir)["query"]
    assert (query["page_size"], query["found"], query["calls"]) == (250, 500, 4)
    searches = [r for r in audit_records(run_dir) if r.get("action") == "search_devices"]
    assert [(r["subject"], r["code"], r["decision"]) for r in searches] == [
        ("page 1 of 1000", 99400, "retry"),
        ("page 1 of 500", 99400, "retry"),
        ("page 1 of 250", 0, "done"),
        ("page 2 of 250", 0, "done"),
    ]
    assert len(results(run_dir)) == 500


async def test_reshuffled_pages_are_paged_again_until_complete(tmp_path: Path) -> None:
    """Pages reshuffled every 5 calls overlap and miss devices: the search is paged again
    until the distinct devices add up to totalSize, and the snapshot is exactly the product."""
    sim = simulator(devices=1000, device_page_max=50, device_reshuffle_every=5)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, _ = await run_query(query_job(tmp_path, f"{{product_key: {PRODUCT}}}"), url, run_dir)
    assert code == ExitCode.OK
    query = summary(run_dir)["query"]
    assert query["complete"]
    assert query["passes"] > 1
    assert sorted(snapshot_assets(run_dir)) == sorted(of_product(1000))
    assert len(results(run_dir)) == 250


async def test_pages_that_never_cover_the_product_stop_before_any_cancel(tmp_path: Path) -> None:
    """Reshuffled at every call, 5 passes of small pages miss devices: the run says how many
    it found of how many, cancels nothing, keeps no snapshot (exit 3); a resume resolves again;
    --accept-incomplete runs what was found and records the shortfall."""
    sim = simulator(devices=1000, device_page_max=10, device_reshuffle_every=1)
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}")
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, text = await run_query(job, url, run_dir)
        assert code == ExitCode.ABORTED
        assert "the targets query is incomplete: found 247 of 250 devices after 5 passes" in text
        assert "nothing was cancelled" in text
        assert "cancel" not in sim.stats.by_action
        assert not (run_dir / "targets.csv").exists()
        assert (run_dir / "targets.csv.partial").read_text().count("\n") == 248
        manifest = read_manifest(RunDir(run_dir))
        assert manifest.targets_file is None
        assert manifest.query is not None
        assert not manifest.query["complete"]
        searched = sim.stats.by_action["search_devices"]
        code, text = await resume_query(job, url, run_dir, accept_incomplete=True)
        assert sim.stats.by_action["search_devices"] > searched  # resolved again
    assert code == ExitCode.OK, text
    query = summary(run_dir)["query"]
    assert query["accepted_incomplete"]
    assert not query["complete"]
    assert query["found"] < query["total"] == 250
    assert len(results(run_dir)) == query["found"]
    assert "INCOMPLETE, run as found (--accept-incomplete)" in text
    auditverify.verify(RunDir(run_dir))


@pytest.mark.parametrize("every", [2, 5])
async def test_a_drifting_fleet_is_found_complete_or_told(tmp_path: Path, every: int) -> None:
    """Devices come and go while the pages are read: either one pass saw every device the
    gateway counted (the snapshot holds every device still there), or the run says it did not
    and cancels nothing."""
    sim = simulator(devices=300, products=1, device_page_max=50, device_drift_every=every)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, text = await run_query(query_job(tmp_path, "{status: online}"), url, run_dir)
    query = summary(run_dir)["query"]
    if query["complete"]:  # devices gone since they were found fail (99404): exit 1
        there = sim.devices._matching(DEFAULT_ORG, "status = 'online'")
        assert {f"as{i:06d}" for i in there} <= set(snapshot_assets(run_dir))
        gone = query["found"] - len(there)
        assert summary(run_dir)["outcomes"]["failed"] == gone
        assert code == (ExitCode.FAILED if gone else ExitCode.OK)
    else:
        assert code == ExitCode.ABORTED
        assert f"found {query['found']} of {query['total']} devices" in text
        assert "cancel" not in sim.stats.by_action
        assert len(query["parts"][0]["totals"]) > 1  # the totals it saw changed
    assert query["complete"] == (every == 5)


async def test_a_query_that_matches_nothing_ends_with_exit_0(tmp_path: Path) -> None:
    """No device of the product: the run says so, cancels nothing and ends 0; a resume reads
    the empty snapshot and does not search again."""
    sim = simulator()
    job = query_job(tmp_path, "{product_key: noSuchProduct}")
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, text = await run_query(job, url, run_dir)
        assert code == ExitCode.OK
        assert "the query matched no device; nothing to cancel" in text
        assert summary(run_dir)["targets"] == 0
        code, _ = await resume_query(job, url, run_dir)
    assert code == ExitCode.OK
    assert sim.stats.by_action == {"search_devices": 1}
    auditverify.verify(RunDir(run_dir))


async def test_a_complete_snapshot_is_never_queried_again(tmp_path: Path) -> None:
    """An operator who does not confirm the count stops the run after the resolution (exit 3,
    nothing cancelled); the resume goes over the snapshot without a single search."""
    sim = simulator()
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}, status: online}}")
    run_dir = tmp_path / "run"
    asked: list[int] = []

    def refuse(count: int) -> str:
        asked.append(count)
        return "not confirmed"

    async with serve(sim) as url:
        code, text = await run_query(job, url, run_dir, confirm=refuse)
        assert code == ExitCode.ABORTED
        assert "not confirmed" in text
        assert "cancel" not in sim.stats.by_action
        found = summary(run_dir)["query"]["found"]
        assert asked == [found]
        code, _ = await resume_query(job, url, run_dir)
    assert code == ExitCode.OK
    assert sim.stats.by_action["search_devices"] == 1
    assert len(results(run_dir)) == found
    auditverify.verify(RunDir(run_dir))


async def test_match_command_id_and_lists_apply_to_the_found_devices(tmp_path: Path) -> None:
    """The job's match (and its assets_per_call) apply to every device the query found."""
    sim = simulator()
    job = query_job(
        tmp_path,
        f"{{product_key: {PRODUCT}}}",
        "match: {command_name: setPoint42}\nlimits: {assets_per_call: 10}\n",
    )
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, _ = await run_query(job, url, run_dir)
    assert code == ExitCode.OK
    lines = results(run_dir)
    assert len(lines) == 50
    assert all("matched_command_ids" in line for line in lines)
    assert summary(run_dir)["commands"]["kept"] > 0


async def test_shards_resolve_and_keep_their_part(tmp_path: Path) -> None:
    """Each shard resolves the query and keeps its own devices (the targets' shard hash, the
    job's command id included): together exactly the product, each once. Shards that saw
    different totals are flagged by the report."""
    sim = simulator(devices=400, products=1)
    job = query_job(tmp_path, "{status: offline}", "command_id: '2278935391225618432'\n")
    dirs = [tmp_path / "shard-0", tmp_path / "shard-1"]
    async with serve(sim) as url:
        for index, run_dir in enumerate(dirs):
            code, _ = await run_query(job, url, run_dir, shard=Shard(index, 2))
            assert code in (ExitCode.OK, ExitCode.FAILED)
    parts = [{line["target"]["asset_id"] for line in results(d)} for d in dirs]
    assert parts[0].isdisjoint(parts[1])
    queries = [summary(d)["query"] for d in dirs]
    assert queries[0]["total"] == queries[1]["total"] == len(parts[0] | parts[1])
    assert [q["kept"] for q in queries] == [len(p) for p in parts]
    assert differing_totals([load_run(RunDir(d)).summary for d in dirs]) is None
    for _ in range(40):  # the fleet changes (new devices, until one is offline) ...
        sim.store.add_generated()
        sim.devices._matches.clear()
        if len(sim.devices._matching(DEFAULT_ORG, "status = 'offline'")) > queries[0]["total"]:
            break
    late = tmp_path / "late"  # ... and a shard run late sees another total
    async with serve(sim) as url:
        await run_query(job, url, late, shard=Shard(1, 2))
    assert summary(late)["query"]["total"] == queries[0]["total"] + 1
    reports = [load_run(RunDir(dirs[0])), load_run(RunDir(late))]
    warning = differing_totals([r.summary for r in reports])
    assert warning is not None
    assert "worker resolve JOB --out FILE" in warning
    assert "WARNING" in render_html(reports)


async def test_an_edited_snapshot_is_found(tmp_path: Path) -> None:
    """A snapshot changed after the run: audit verify names it, and a resume refuses it."""
    sim = simulator()
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}", "limits: {deadline: 1h}\n")
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        await run_query(job, url, run_dir)
    with (run_dir / "targets.csv").open("a") as stream:
        stream.write("as000001,o15541858646501\n")
    with pytest.raises(auditverify.AuditBroken, match="no longer hashes"):
        auditverify.verify(RunDir(run_dir))
    with pytest.raises(UsageError, match="no longer hashes"):
        start_resumed(load_job(job), RunDir(run_dir), None, retry_failed=False, force=False)


async def test_a_refused_search_stops_the_run_and_transient_errors_are_retried(
    tmp_path: Path,
) -> None:
    """5xx answers to searches are retried (audited as retries) through the run's policy; a
    99403 stops the run at once (exit 3), keeping no snapshot and cancelling nothing."""
    sim = simulator(devices=2000, error_rate=0.3, device_page_max=100)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, _ = await run_query(query_job(tmp_path, f"{{product_key: {PRODUCT}}}"), url, run_dir)
    assert code in (ExitCode.OK, ExitCode.FAILED)  # a cancel may fail after its 5 attempts
    searches = [r for r in audit_records(run_dir) if r.get("action") == "search_devices"]
    assert "retry" in {r["decision"] for r in searches}
    assert summary(run_dir)["query"]["complete"]
    denied = simulator(denied_orgs=frozenset({"o15541858646501"}))
    run_dir = tmp_path / "denied"
    async with serve(denied) as url:
        code, text = await run_query(query_job(tmp_path, "{status: online}"), url, run_dir)
    assert code == ExitCode.ABORTED
    assert "no permission" in text
    assert "cancel" not in denied.stats.by_action
    assert read_manifest(RunDir(run_dir)).targets_file is None


class _Gateway:
    """A Search Device stand-in: `devices` in order, pages above `largest` too large to read,
    and a 99400 for page `refuse`."""

    def __init__(self, devices: int, largest: int, refuse: int | None = None) -> None:
        self.devices = [f"a{i:05d}" for i in range(devices)]
        self.largest = largest
        self.refuse = refuse
        self.asked: list[tuple[int, int]] = []

    async def search_devices(
        self, org_id: str, expression: str, page: int, page_size: int
    ) -> DevicePage:
        self.asked.append((page, page_size))
        if page_size > self.largest:
            raise OversizedAnswerError("too large", maybe_applied=True, http_status=200)
        if page == self.refuse:
            raise TargetError("Invalid Argument", code=99400, http_status=200)
        chosen = self.devices[(page - 1) * page_size : page * page_size]
        found = tuple(FoundDevice(asset, "P", "online") for asset in chosen)
        return DevicePage(found, len(self.devices), page_size, "r")


async def test_pages_too_large_to_read_are_halved_and_a_later_refusal_stops(
    tmp_path: Path,
) -> None:
    """An answer past the cap halves the page (on any page); a 99400 on a later page is not
    about its size (the size was taken): the search stops and says which page."""
    writer = SnapshotWriter(tmp_path / "p", tmp_path / "f")
    gateway = _Gateway(900, largest=300)
    resolver = Resolver(gateway, RateLimiter(None), RetryPolicy(), writer, org_id="o1")
    result = await resolver.resolve(["x"])
    assert result.complete(1)
    assert result.page_size == 250
    assert gateway.asked[:3] == [(1, 1000), (1, 500), (1, 250)]
    writer.finish()
    assert (tmp_path / "f").read_text().count("\n") == 901
    writer = SnapshotWriter(tmp_path / "p2", tmp_path / "f2")
    gateway = _Gateway(900, largest=1000, refuse=2)
    resolver = Resolver(
        gateway, RateLimiter(None), RetryPolicy(), writer, org_id="o1", page_size=250
    )
    result = await resolver.resolve(["x"])
    assert not result.complete(1)
    assert result.stopped is not None
    assert "page 2 of the search 'x' could not be had" in result.stopped
    assert gateway.asked == [(1, 250), (2, 250)]
    writer.abandon()


async def test_a_shard_the_query_leaves_empty_ends_with_exit_0(tmp_path: Path) -> None:
    """A device found, but in the other shard: this shard has nothing to cancel, and says so."""
    sim = simulator()
    digest = key_digest(identity_key(DEFAULT_ORG, "as000000", None, None, None))
    other = Shard(1 - digest % 2, 2)
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        job = query_job(tmp_path, "{asset_id: [as000000]}")
        code, text = await run_query(job, url, run_dir, shard=other)
    assert code == ExitCode.OK
    assert f"no device the query found falls in shard {other}; nothing to cancel" in text
    query = summary(run_dir)["query"]
    assert (query["found"], query["kept"], query["shard"]) == (1, 0, str(other))


async def test_a_quota_spent_while_resolving_ends_resumable_before_any_cancel(
    tmp_path: Path,
) -> None:
    """The searches pace to the gateway's stated budget like the cancels: a day's quota spent
    by them (at 10:00 UTC, 14 h before it resets) ends the run with exit 4 (quota), the reset
    time said, nothing cancelled, no snapshot kept; a resume resolves again."""
    now = time.time()
    ten = now - now % 86400 + 10 * 3600  # 10:00 UTC today, for the gateway and the worker

    def wall() -> float:
        return ten + (time.time() - now)

    sim = Simulator(
        apps={APP_KEY: APP_SECRET},
        devices=2000,
        seed=7,
        products=4,
        faults=Faults(quota="day=3", device_page_max=10),
        clock=wall,
    )
    run_dir = tmp_path / "run"
    async with serve(sim) as url:
        code, text = await run_query(
            query_job(tmp_path, f"{{product_key: {PRODUCT}}}"), url, run_dir, wall=wall
        )
    assert code == ExitCode.INTERRUPTED, text
    stopped = summary(run_dir)
    assert stopped["stopped"] == "quota"
    assert stopped["quota_reset_at"] is not None
    assert "cancel" not in sim.stats.by_action
    assert read_manifest(RunDir(run_dir)).targets_file is None
    assert not (run_dir / "targets.csv").exists()


async def test_the_deadline_ends_a_resolution_before_any_cancel(tmp_path: Path) -> None:
    """A query whose resolution outlasts the job's deadline (50 pages of 10, each answered in
    0.1 s) stops at the deadline: exit 4 (deadline), nothing cancelled, no snapshot kept, and
    well before the searches would have ended."""
    sim = simulator(devices=2000, device_page_max=10, latency_ms=100)
    run_dir = tmp_path / "run"
    job = query_job(tmp_path, f"{{product_key: {PRODUCT}}}", "limits: {deadline: 1s}\n")
    began = time.monotonic()
    async with serve(sim) as url:
        code, text = await run_query(job, url, run_dir)
    assert code == ExitCode.INTERRUPTED, text
    assert time.monotonic() - began < 4
    assert summary(run_dir)["stopped"] == "deadline"
    assert "cancel" not in sim.stats.by_action
    assert read_manifest(RunDir(run_dir)).targets_file is None
