"""Spool trust (design.md): in `worker watch`, credentials go only to the watcher's own gateway;
a job reaches nothing outside the spool; what the spool's users read about a failed job never
quotes a file. Each attack plants what another user of a shared spool could plant (the files
are the test's own, put where the attacker would put them)."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import orjson
import pytest
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import answer, gateway, served
from tests.runs import results
from tests.simproc import run_worker, worker_env
from tests.test_spool import settled, watcher
from worker.app import prepare
from worker.app.settings import same_gateway
from worker.app.spool import open_spool
from worker.app.spoolcheck import public_text
from worker.app.watch import Watcher, WatchOptions
from worker.errors import JobFileError, UsageError
from worker.jobs.plan import Plan
from worker.jobs.plan import plan as real_plan
from worker.model import Credentials, Job, Limits, Shard
from worker.sim.simulator import Simulator, serve

SECRET = "s3cr3t-0123456789"  # what a planted or private file holds; no spool file may show it


def drop_job(spool: Path, name: str, body: str, *, mode: int = 0o644) -> Path:
    """A job file with `body` after its header, dropped into incoming/ as a producer should
    (written beside it, then renamed in)."""
    open_spool(spool, create=True)
    staging = spool / f".{name}.yaml"
    staging.write_text(f"version: 1\nname: {name}\norg_id: {ORG}\n{body}")
    staging.chmod(mode)
    return staging.rename(spool / "incoming" / f"{name}.yaml")


def targets_csv(path: Path, first: int, count: int) -> Path:
    """A targets file over devices as{first}.."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("asset_id\n" + "".join(f"as{i:06d}\n" for i in range(first, first + count)))
    return path


def spool_texts(spool: Path) -> str:
    """Everything in done/ and failed/ (job files aside): what every user of the spool reads."""
    return "".join(
        path.read_text(errors="replace")
        for folder in ("done", "failed")
        for path in (spool / folder).iterdir()
        if path.name.endswith((".exit.json", ".error.txt"))
    )


def error_of(spool: Path, name: str) -> str:
    """The error file of the job `name` in failed/."""
    (path,) = (spool / "failed").glob(f"{name}.*.error.txt")
    return path.read_text()


@asynccontextmanager
async def recording() -> AsyncIterator[tuple[str, list[str]]]:
    """A second HTTP server that records every request it gets (and answers none usefully)."""
    seen: list[str] = []

    async def any_request(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path_qs}")
        return web.Response(status=500)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", any_request)
    async with served(app) as url:
        yield url, seen


@pytest.mark.parametrize(
    ("one", "other", "same"),
    [
        ("https://apigw.example.com", "https://APIGW.Example.com/", True),
        ("https://apigw.example.com", "HTTPS://apigw.example.com:443", True),
        ("http://127.0.0.1", "http://127.0.0.1:80//", True),
        ("https://gw.example.com/prefix", "https://gw.example.com/prefix/", True),
        ("https://gw.example.com/prefix", "https://gw.example.com", False),
        ("https://gw.example.com/prefix", "https://gw.example.com/Prefix", False),
        ("https://gw.example.com", "http://gw.example.com", False),
        ("https://gw.example.com", "https://gw.example.com:8443", False),
        ("https://gw.example.com", "https://gw.example.com.evil.test", False),
        ("https://gw.example.com", "https://user@gw.example.com", False),
        ("https://gw.example.com", "https://gw.example.com?to=elsewhere", False),
        ("https://gw.example.com", "https://gw.example.com:99999", False),
        ("https://gw.example.com", "ftp://gw.example.com", False),
    ],
)
def test_the_same_gateway_is_compared_after_normalising(one: str, other: str, same: bool) -> None:
    """Scheme and host in any case, the default port written or not, trailing slashes are one
    gateway; another path prefix, port, scheme, user or query is another."""
    assert same_gateway(one, other) is same
    assert same_gateway(other, one) is same


def test_watch_refuses_to_start_without_a_gateway_of_its_own(tmp_path: Path) -> None:
    """No --gateway and no ENOS_GATEWAY: exit 2 saying so, even when a job names one."""
    spool = tmp_path / "spool"
    drop_job(spool, "named", "gateway: http://127.0.0.1:9\ntargets: [{asset_id: a1}]\n")
    done = run_worker("watch", str(spool), "--once", env=worker_env())
    assert done.returncode == 2
    assert "--gateway" in done.stderr
    assert "ENOS_GATEWAY" in done.stderr
    assert list((spool / "incoming").iterdir())  # nothing claimed


@pytest.mark.anyio
async def test_a_job_naming_another_gateway_is_refused_and_it_receives_nothing(
    tmp_path: Path,
) -> None:
    """A dropped job's gateway: http://attacker gets no token request and no call; the job
    goes to failed/ saying why. A job naming the watcher's own gateway (spelt otherwise) runs."""
    spool = tmp_path / "spool"
    targets_csv(spool / "targets" / "t.csv", 0, 20)
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=40, seed=7)
    async with serve(sim) as url, recording() as (attacker, seen):
        drop_job(spool, "stolen", f"gateway: {attacker}\ntargets_file: ../targets/t.csv\n")
        drop_job(spool, "own", f"gateway: {url}//\ntargets_file: ../targets/t.csv\n")
        code = await watcher(spool, url).run()
    assert seen == []
    assert code == 1  # --once: a job went to failed/
    assert settled(spool, "done")["own"]["exit_code"] == 0
    refused = settled(spool, "failed")["stolen"]
    assert refused["exit_code"] == 2
    assert refused["finished"] is False
    error = error_of(spool, "stolen")
    assert "gateway:" in error
    assert "Nothing was sent" in error
    assert attacker.rsplit(":", 1)[1] not in error  # the job's value is not echoed
    stolen = next((spool / "failed").glob("stolen.*.yaml"))
    assert not list((spool / "runs" / stolen.stem).glob("*.jsonl"))  # nothing was run


async def _drained_after_some_results(spool: Path) -> None:
    """Run the spooled job against a gateway that holds its fourth call, then drain: the job
    stays in running/ with a run directory holding three results."""
    arrived, release = anyio.Event(), anyio.Event()
    calls = 0

    async def commands(_: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        if calls > 3:
            arrived.set()
            await release.wait()
        return web.Response(body=answer([]), content_type="application/json")

    async with served(gateway(commands)) as url, anyio.create_task_group() as group:
        first = watcher(spool, url, once=False)
        group.start_soon(first.run)
        await arrived.wait()
        first.drain("the test stops it")
        release.set()


@pytest.mark.anyio
async def test_a_resumed_job_runs_against_the_watchers_gateway_never_run_json(
    tmp_path: Path,
) -> None:
    """A job left in running/ whose run.json was rewritten to name another gateway is resumed
    against the watcher's: the other gateway receives nothing."""
    spool = tmp_path / "spool"
    targets_csv(spool / "targets" / "t.csv", 0, 30)
    drop_job(spool, "left", "limits: {concurrency: 1}\ntargets_file: ../targets/t.csv\n")
    await _drained_after_some_results(spool)
    (run,) = (spool / "runs").iterdir()
    async with recording() as (attacker, seen):
        manifest = orjson.loads((run / "run.json").read_bytes())
        manifest["gateway"] = attacker
        (run / "run.json").write_bytes(orjson.dumps(manifest))
        sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=40, seed=7)
        async with serve(sim) as url:
            assert await watcher(spool, url).run() == 0
    assert seen == []
    assert settled(spool, "done")["left"]["exit_code"] == 0
    assert len(results(run)) == 30


@pytest.mark.anyio
async def test_error_files_never_quote_the_content_of_a_file(tmp_path: Path) -> None:
    """A private (0600) job's keys and values and the first line of another user's targets
    file inside the spool are not in failed/ (which every user reads): the error names the
    field, the path and the problem. The error file is readable by the spool's users."""
    spool = tmp_path / "spool"
    theirs = spool / "targets" / "theirs.csv"
    theirs.parent.mkdir(parents=True)
    theirs.write_text(f"ENOS_APP_SECRET={SECRET}\nas000001\n")
    theirs.chmod(0o600)
    drop_job(
        spool,
        "private",
        f"ENOS_APP_SECRET: {SECRET}\nlimits: {{rate: '{SECRET}'}}\ntargets: [{{asset_id: a1}}]\n",
        mode=0o600,
    )
    drop_job(spool, "borrower", "targets_file: ../targets/theirs.csv\n")
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=4, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    texts = spool_texts(spool)
    assert SECRET not in texts
    assert "ENOS_APP_SECRET" not in texts
    private = error_of(spool, "private")
    assert "limits.rate:" in private
    assert "is not a number" in private
    assert "unknown key" in private
    assert str(spool / "failed" / "private.") in private  # where the job is now, and its line
    borrower = error_of(spool, "borrower")
    assert "theirs.csv:1: unknown column(s)" in borrower
    umask = os.umask(0)
    os.umask(umask)
    for path in (spool / "failed").glob("*.error.txt"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644 & ~umask


def test_public_text_keeps_our_words_and_hides_the_files() -> None:
    """Keys (even with spaces and colons), quoted values, unknown words are hidden; the
    location, the field, the problem and our own hints stay."""
    job = Path("/spool/running/j.yaml")
    error = JobFileError(
        [
            f"{job}:3: my db: password: unknown key; did you mean 'limits'?",
            f"{job}:4: limits.rate: 'correct horse {SECRET}' is not a number; expected N",
            f"{job}:1: version: missing or not 1; write 'version: 1'",
            f"/etc/shadow:1: root:{SECRET}:19000 is not valid",
        ]
    )
    text = public_text(error, [Path("/spool")])
    lines = text.splitlines()
    assert lines[0] == f"{job}:3: …: unknown key; did you mean 'limits'?"
    assert lines[1].startswith(f"{job}:4: limits.rate: '…' is not a number; expected")
    assert lines[2] == f"{job}:1: version: missing or not 1; write 'version: 1'"
    assert "shadow" not in lines[3]
    assert SECRET not in text
    assert "password" not in text
    assert "horse" not in text


def _outside_jobs(spool: Path, planted: Path) -> Iterator[str]:
    """Three ways to name a file outside the spool: absolute, ../.., a link inside."""
    link = spool / "targets" / "link.csv"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(planted)
    relative = os.path.relpath(planted, spool / "running")
    for name, where in (
        ("absolute", planted),
        ("climbing", relative),
        ("linked", "../targets/link.csv"),
    ):
        drop_job(spool, name, f"targets_file: {where}\n")
        yield name


@pytest.mark.anyio
async def test_a_targets_file_outside_the_spool_is_refused_before_it_is_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A planted CSV outside the spool (whose first line holds a secret), named directly,
    by ../.., or through a symbolic link in the spool: failed/, nothing planned from it,
    nothing of it in the error."""
    spool = tmp_path / "spool"
    planted = tmp_path / "elsewhere" / "planted.csv"
    planted.parent.mkdir()
    planted.write_text(f"ENOS_APP_SECRET={SECRET}\nas000001\n")
    names = list(_outside_jobs(spool, planted))
    planned: list[Path] = []

    def spying(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
        planned.append(job.path)
        return real_plan(job, shard, done)

    monkeypatch.setattr(prepare, "plan", spying)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=4, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert planned == []
    assert sorted(settled(spool, "failed")) == sorted(names)
    for name in names:
        assert "targets_file must be inside the spool" in error_of(spool, name)
    assert SECRET not in spool_texts(spool)


@pytest.mark.anyio
async def test_a_job_file_that_is_a_link_is_refused_unread(tmp_path: Path) -> None:
    """A symbolic link dropped into incoming/, to a private job file elsewhere: failed/,
    nothing of the file it points to in the error."""
    spool = tmp_path / "spool"
    open_spool(spool, create=True)
    private = tmp_path / "root-only.yaml"
    private.write_text(f"version: 1\nname: x\n{SECRET}: {SECRET}\n")
    private.chmod(0o600)
    (spool / "incoming" / "link.yaml").symlink_to(private)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=4, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert "symbolic link" in error_of(spool, "link")
    assert SECRET not in spool_texts(spool)
    assert private.read_text().endswith(f"{SECRET}: {SECRET}\n")


@pytest.mark.anyio
async def test_a_run_directory_planted_as_a_link_is_not_written_through(tmp_path: Path) -> None:
    """A job in running/ whose runs/NAME is a symbolic link to another user's directory:
    failed/, and nothing is written there."""
    spool = tmp_path / "spool"
    targets_csv(spool / "targets" / "t.csv", 0, 5)
    claimed = drop_job(spool, "job", "targets_file: ../targets/t.csv\n")
    claimed = claimed.rename(spool / "running" / "job.20260101T000000Z-abcdef.yaml")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("mine\n")
    (spool / "runs" / claimed.stem).symlink_to(victim)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        assert await watcher(spool, url).run() == 1
    assert [p.name for p in victim.iterdir()] == ["keep.txt"]
    assert "is not a directory" in error_of(spool, "job")


@pytest.mark.anyio
async def test_a_run_directory_of_another_user_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """runs/NAME made by someone else (here: the watcher runs as another uid than the test
    that made it) is refused, not filled."""
    spool = tmp_path / "spool"
    targets_csv(spool / "targets" / "t.csv", 0, 5)
    claimed = drop_job(spool, "job", "targets_file: ../targets/t.csv\n")
    claimed = claimed.rename(spool / "running" / "job.20260101T000000Z-abcdef.yaml")
    (spool / "runs" / claimed.stem).mkdir()
    monkeypatch.setattr(os, "geteuid", lambda: os.getuid() + 1)
    async with serve(Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)) as url:
        watch = Watcher(
            WatchOptions(
                spool,
                Credentials(APP_KEY, APP_SECRET),
                Limits(rate=1000),
                url,
                once=True,
                poll_s=0.05,
                quiet_s=0.0,
            )
        )
        assert await watch.run() == 1
    assert "belongs to another user" in error_of(spool, "job")
    assert list((spool / "runs" / claimed.stem).iterdir()) == []


def test_a_spool_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    """failed/ planted as a symbolic link to another user's directory would have every exit
    record and error file written there: the watcher does not start (exit 2)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (spool / "failed").symlink_to(elsewhere)
    with pytest.raises(UsageError, match="failed is not a directory"):
        open_spool(spool, create=False)
    assert list(elsewhere.iterdir()) == []
