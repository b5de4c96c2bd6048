"""Wire details against a recording gateway: token calls as JSON under the gateway's path prefix,
redirects never followed, and flags that only make sense together refused alone."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import structlog
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import answer, canned_gateway, served
from tests.runs import results, run_job, write_job
from tests.simproc import run_worker
from worker import logs
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.errors import FatalError
from worker.model import Credentials, Target


def recording_gateway(seen: list[web.Request], redirect_to: str) -> web.Application:
    """A gateway below /apim: a real token answer, and a 307 for every business call."""

    async def token(request: web.Request) -> web.Response:
        seen.append(request)
        data = {"accessToken": "tok-1234567890", "expire": 7200}
        return web.json_response({"status": 0, "msg": "SUCCESS", "data": data})

    async def commands(request: web.Request) -> web.Response:
        seen.append(request)
        raise web.HTTPTemporaryRedirect(redirect_to + "/connect-service/v2.1/commands?x=1")

    app = web.Application()
    app.router.add_post("/apim" + p.TOKEN_GET_PATH, token)
    app.router.add_route("*", "/apim" + p.COMMANDS_PATH, commands)
    return app


@pytest.mark.anyio
async def test_token_call_is_json_under_the_prefix_and_redirects_are_fatal() -> None:
    """The token request keeps the gateway's path prefix and says JSON; a 307 on a cancel is a
    fatal error naming the redirect, and nothing reaches the host it points to."""
    elsewhere: list[web.Request] = []

    async def record(request: web.Request) -> web.Response:
        elsewhere.append(request)
        return web.Response()

    other = web.Application()
    other.router.add_route("*", "/{tail:.*}", record)
    seen: list[web.Request] = []
    credentials = Credentials(APP_KEY, APP_SECRET)
    async with (
        served(other) as other_url,
        served(recording_gateway(seen, other_url)) as url,
        EnOSClient(url + "/apim", credentials) as client,
    ):
        with pytest.raises(FatalError, match="HTTP 307") as caught:
            await client.cancel(Target(org_id=ORG, asset_id="as000001"))
    token_request, cancel_request = seen
    assert token_request.path == "/apim" + p.TOKEN_GET_PATH
    assert token_request.headers["Content-Type"] == p.JSON_CONTENT_TYPE
    assert cancel_request.path == "/apim" + p.COMMANDS_PATH
    assert elsewhere == []
    assert caught.value.http_status == 307
    assert other_url not in str(caught.value)  # gateway text is not repeated


ODD_ANSWERS = {
    "superscript createTime": (answer([{"commandId": "c1", "createTime": "\u00b2"}]), ["c1"], 0),
    "5,000-digit createTime": (answer([{"commandId": "c1", "createTime": "9" * 5000}]), ["c1"], 0),
    "createTime an object": (answer([{"commandId": 7, "createTime": {"a": 1}}]), ["7"], 0),
    "an item without id": (answer([{"commandId": "c1"}, {"state": 1}]), ["c1"], 1),
    "an item that is text": (answer(["c9", {"commandId": "c2"}]), ["c2"], 1),
    "data an object": (answer({"commandId": "c1"}), [], 1),
    "state as text, name a list": (
        answer([{"commandId": "c3", "state": "1", "commandName": ["x"]}]),
        ["c3"],
        0,
    ),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", list(ODD_ANSWERS))
async def test_odd_answers_keep_what_can_be_read(name: str) -> None:
    """A code-0 answer with fields the client cannot parse: the readable ids are kept, the
    unreadable commands counted and the problem said; nothing raises."""
    body, ids, unreadable = ODD_ANSWERS[name]
    async with (
        served(canned_gateway(body)) as url,
        EnOSClient(url, Credentials(APP_KEY, APP_SECRET)) as client,
    ):
        reply = await client.cancel(Target(org_id=ORG, asset_id="as000001"))
    assert [c.command_id for c in reply.commands] == ids
    assert reply.unreadable == unreadable
    assert (reply.problem is not None) == bool(unreadable)
    assert all(c.create_time_ms is None for c in reply.commands)


@pytest.mark.anyio
async def test_a_run_records_odd_answers_as_results(tmp_path: Path) -> None:
    """Through a whole run: every target gets a final line with the ids read and the problem
    in `error`; the run finishes (exit 0) instead of ending as an internal error."""
    body = answer([{"commandId": "c1", "createTime": "\u00b2"}, {"state": 1}])
    job = write_job(
        tmp_path,
        "limits: {rate: 500}\ntargets:\n" + "".join(f"  - asset_id: as{i:06d}\n" for i in range(5)),
    )
    async with served(canned_gateway(body)) as url:
        code, _ = await run_job(job, url, tmp_path / "run")
    assert code == 0
    lines = results(tmp_path / "run")
    assert len(lines) == 5
    for line in lines:
        assert (line["outcome"], line["cancelled_command_ids"]) == ("cancelled", ["c1"])
        assert line["effect_unknown"] is True  # one listed command could not be read
        assert "commandId" in line["error"]


@pytest.mark.parametrize(
    ("flags", "needs"),
    [
        (["--sample", "5"], "--dry-run"),
        (["--retry-failed"], "--resume DIR"),
        (["--force"], "--resume DIR"),
    ],
)
def test_lone_flags_are_refused(tmp_path: Path, flags: list[str], needs: str) -> None:
    """--sample without --dry-run would cancel for real: refused (exit 2), as are --retry-failed
    and --force without --resume; nothing is sent (the gateway does not even exist)."""
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nname: t\norg_id: {ORG}\ntargets: [{{asset_id: a}}]\n")
    done = run_worker("run", str(job), "--gateway", "http://127.0.0.1:9", *flags)
    assert done.returncode == 2, done.stderr
    assert f"{flags[0]} only works with {needs}" in done.stderr
    assert not (tmp_path / "runs").exists()


def test_token_body_is_the_documented_json() -> None:
    """The token body: appKey, encryption, timestamp (as JSON, parsed back)."""
    client = EnOSClient("http://127.0.0.1:9", Credentials(APP_KEY, APP_SECRET), clock=lambda: 1.5)
    body = orjson.loads(client._token_body(None))
    assert set(body) == {"appKey", "encryption", "timestamp"}
    assert body["timestamp"] == "1500"


LIGHT_MODULES = [
    "worker.app.settings",
    "worker.report.summary",
    "worker.report.console",
    "worker.store.state",
    "worker.store.layout",
    "worker.store.tally",
    "worker.model",
    "worker.core.decide",
    "worker.core.engine",
    "worker.jobs.units",
]


@pytest.mark.parametrize("module", LIGHT_MODULES)
def test_light_modules_load_neither_aiohttp_nor_yaml(module: str) -> None:
    """design.md: importing settings, model or report (and the engine's core) must not load
    aiohttp or YAML; checked in a fresh interpreter."""
    code = (
        f"import sys, {module}; print(sorted(m for m in ('aiohttp', 'yaml') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


class _Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_log_lines_clear_the_progress_line_on_a_terminal() -> None:
    """On a TTY a log line starts by clearing the live progress line, so the two never glue
    together; JSON lines (off a TTY) are left as they are."""
    terminal, pipe = _Terminal(), io.StringIO()
    try:
        logs.configure(stream=terminal)
        structlog.get_logger("t").warning("worker.rate_changed", cause="throttled")
        logs.configure(stream=pipe)
        structlog.get_logger("t").warning("worker.rate_changed", cause="throttled")
    finally:
        structlog.reset_defaults()
    assert terminal.getvalue().startswith("\r\x1b[K")
    assert orjson.loads(pipe.getvalue())["cause"] == "throttled"
