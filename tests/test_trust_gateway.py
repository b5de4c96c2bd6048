"""A hostile gateway, part two: what it sends is bounded after decompression, secrets it echoes
in any spelling are kept out of every output, answers of an odd shape are never a clean
"nothing", and requests that cannot be sent, or that every call refuses alike, stop the run."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import anyio
import orjson
import pytest
import structlog
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import (
    answer,
    bomb,
    compressed,
    encoded_answer,
    gateway,
    served,
    token_gateway,
)
from tests.runs import results, resume_job, run_job, write_job
from worker import logs, redact
from worker.app.sweep import verify_run
from worker.app.wiring import RunOptions
from worker.core.ports import EngineSettings, StopReason
from worker.core.stops import REFUSALS_TO_STOP, StopRules
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.errors import (
    EnOSError,
    FatalError,
    RateLimitedError,
    RetryableError,
    TargetError,
)
from worker.model import Credentials, Limits, Target
from worker.store.layout import RunDir

pytestmark = pytest.mark.anyio
TARGET = Target(org_id=ORG, asset_id="as000001")
CREDENTIALS = Credentials(APP_KEY, APP_SECRET)
ENCODINGS = ["gzip", "deflate", "raw-deflate"]
PAST_THE_CAP = "larger than 1,048,576 bytes"


# -- 1. compressed answers are capped after decompression --------------------------------------


def test_a_gzip_bomb_does_not_inflate_in_memory() -> None:
    """Three cancels at once, each answered by 1 MB of gzip with its Content-Length that
    inflates to 1,000 MiB of JSON: refused as oversized, and the client process peaks far below
    what one inflated answer would take (it took 1.3-3.2 GB and accepted the answers)."""
    command = [sys.executable, "-m", "tests.bomb_probe", "1000", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)
    probe = orjson.loads(done.stdout)
    # OversizedAnswerError is a RetryableError (a search answers it with smaller pages)
    oversized = f"OversizedAnswerError: the answer is {PAST_THE_CAP}; not read"
    assert probe["outcomes"] == [oversized] * 3
    assert probe["peak_rss_mib"] < 200


def _token_answer(token: str = "tok-1234567890") -> bytes:  # noqa: S107 (a test token)
    data = {"accessToken": token, "expire": 7200}
    return orjson.dumps({"status": 0, "msg": "SUCCESS", "data": data})


async def _plain_token(_: web.Request) -> web.Response:
    return web.Response(body=_token_answer(), content_type="application/json")


@pytest.mark.parametrize("length", [True, False], ids=["length", "chunked"])
@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("call", ["cancel", "token"])
async def test_a_compressed_answer_past_the_cap_is_not_read(
    call: str, encoding: str, *, length: bool
) -> None:
    """4 KB of compressed JSON inflating to 4 MiB, with or without a Content-Length, to a
    cancel or to the token call: the oversized-answer error (retryable, maybe applied), as a
    plain answer past 1 MiB gets (with a Content-Length it was inflated whole and accepted)."""
    prefix = b'{"code":0,"msg":"'
    if call == "token":
        prefix = b'{"status":0,"data":{"accessToken":"tok-1234567890","expire":7200},"msg":"'
    handler = encoded_answer(bomb(4, encoding=encoding, prefix=prefix), encoding, length=length)
    app = token_gateway(handler, handler) if call == "token" else gateway(handler)
    async with served(app) as url, EnOSClient(url, CREDENTIALS) as client:
        with pytest.raises(RetryableError, match=PAST_THE_CAP) as caught:
            await (client.authenticate() if call == "token" else client.cancel(TARGET))
    assert caught.value.maybe_applied is True


@pytest.mark.parametrize("length", [True, False], ids=["length", "chunked"])
@pytest.mark.parametrize("encoding", ENCODINGS)
async def test_compressed_answers_under_the_cap_are_read(encoding: str, *, length: bool) -> None:
    """A guard for the client's own decompression: a token answer and a cancel answer of
    900 KiB once inflated, compressed each way, with or without a Content-Length, are read."""
    msg = "x" * (900 << 10)
    data = [{"commandId": "c1"}, {"commandId": "c2"}]
    cancel = orjson.dumps({"code": 0, "msg": msg, "requestId": "r-9", "data": data})
    token = encoded_answer(compressed(_token_answer(), encoding), encoding, length=length)
    answer = encoded_answer(compressed(cancel, encoding), encoding, length=length)
    async with (
        served(token_gateway(token, answer)) as url,
        EnOSClient(url, CREDENTIALS) as client,
    ):
        reply = await client.cancel(TARGET)
    assert [c.command_id for c in reply.commands] == ["c1", "c2"]
    assert reply.request_id == "r-9"


async def test_an_encoding_not_asked_for_is_unreadable() -> None:
    """The client asks for gzip or deflate only; an answer in another encoding (here br) is
    an unreadable answer naming it, not a dropped connection."""
    seen: list[str] = []

    async def brotli(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding", ""))
        headers = {"Content-Type": "application/json", "Content-Encoding": "br"}
        return web.Response(body=b"\x0b\x02\x80{}\x03", headers=headers)

    async with served(gateway(brotli)) as url, EnOSClient(url, CREDENTIALS) as client:
        with pytest.raises(RetryableError, match="encoded as 'br', which was not asked for"):
            await client.cancel(TARGET)
    assert seen == ["gzip, deflate"]


async def test_a_truncated_compressed_answer_is_cut_short() -> None:
    """A gzip stream that stops before its end: the cut-short error (maybe applied)."""
    body = compressed(orjson.dumps({"code": 0, "msg": "OK", "data": []}), "gzip")[:-12]
    handler = encoded_answer(body, "gzip", length=True)
    async with served(gateway(handler)) as url, EnOSClient(url, CREDENTIALS) as client:
        with pytest.raises(RetryableError, match="cut short") as caught:
            await client.cancel(TARGET)
    assert caught.value.maybe_applied is True


# -- 2. secrets the gateway echoes, in any spelling, reach no output ---------------------------

OUTPUTS = ["results.jsonl", "audit.jsonl", "summary.json", "report.html", "checkpoint.json"]
OUTPUTS += ["run.json"]
HOSTILE_TOKEN = "Tok-5f3a9c2e81d74b60XyZ"


@pytest.fixture
def registry() -> Iterator[None]:
    """The process's secret registry as it was before the test (a token registered here, such
    as 'finished', must not mask other tests' text)."""
    secrets, digests = dict(redact._secrets), list(redact._digests)
    yield
    redact._secrets.clear()
    redact._secrets.update(secrets)
    redact._digests.clear()
    redact._digests.extend(digests)
    redact._compile()


@pytest.fixture
def json_logs() -> Iterator[io.StringIO]:
    """The process's log lines, as `worker` writes them (JSON, redaction included)."""
    stream = io.StringIO()
    logs.configure(json=True, stream=stream)
    try:
        yield stream
    finally:
        structlog.reset_defaults()


def spelled(text: str, how: str) -> bytes:
    """`text` as a JSON string literal: every character escaped (backslash-u), upper-cased, or
    both."""
    if "upper" in how:
        text = text.upper()
    if "escaped" in how:
        return ('"' + "".join(f"\\u{ord(c):04x}" for c in text) + '"').encode()
    return orjson.dumps(text)


class Echo:
    """A gateway that echoes the secrets of each request (the access token and the request's
    signature; the token request's body) into the answer's `field`, spelt `how`."""

    def __init__(self, field: str, how: str, *, code: int = 0, token_status: int = 0) -> None:
        self.field, self.how, self.code, self.token_status = field, how, code, token_status
        self.secrets: set[str] = {HOSTILE_TOKEN, APP_SECRET}

    async def token(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.secrets.add(orjson.loads(body)["encryption"])
        if self.token_status:
            echoed = spelled(body.decode(), self.how)
            raw = b'{"status":%d,"msg":%s,"data":null}' % (self.token_status, echoed)
            return web.Response(body=raw, content_type="application/json")
        data = {"accessToken": HOSTILE_TOKEN, "expire": 7200}
        return web.json_response({"status": 0, "msg": "SUCCESS", "data": data})

    async def commands(self, request: web.Request) -> web.Response:
        signature = request.headers[p.HEADER_SIGNATURE]
        self.secrets.add(signature)
        echo = spelled(request.headers[p.HEADER_TOKEN] + " " + signature, self.how)
        fields = {"msg": b'"OK"', "requestId": b'"r-1"'}
        data = b'[{"commandId":"c1"}]' if self.code == 0 else b"null"
        if self.field == "commandId":
            data = b'[{"commandId":%s},{"commandId":"c1"}]' % echo
        else:
            fields[self.field] = echo
        raw = b'{"code":%d,"msg":%s,"requestId":%s,"data":%s}' % (
            self.code,
            fields["msg"],
            fields["requestId"],
            data,
        )
        return web.Response(body=raw, content_type="application/json")

    def app(self) -> web.Application:
        return token_gateway(self.token, self.commands)


def leaked(run_dir: Path, texts: list[str], secrets: set[str]) -> list[str]:
    """Every secret (in any case) found in an output file or one of `texts`."""
    everything = [(run_dir / name).read_text(encoding="utf-8") for name in OUTPUTS]
    haystack = "\n".join(everything + texts).lower()
    return sorted(secret for secret in secrets if secret.lower() in haystack)


FIELDS = [("commandId", 0), ("requestId", 0), ("msg", 0), ("msg", 99404), ("requestId", 99404)]
SPELLINGS = ("escaped", "upper", "escaped-upper")
ECHOES = [(field, how, code) for how in SPELLINGS for field, code in FIELDS]


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(("field", "how", "code"), ECHOES)
async def test_secrets_echoed_in_any_spelling_reach_no_output(
    tmp_path: Path, json_logs: io.StringIO, field: str, how: str, code: int
) -> None:
    """The access token and each request's signature, echoed escaped, upper-cased or both
    into commandId, requestId or msg (of a success or of a 99404): no output file, printed
    report or log line holds either (nor the app secret, nor a token request's encryption), in
    any case. A command id holding one is unreadable, not kept: the target's effect is unknown."""
    echo = Echo(field, how, code=code)
    job = write_job(tmp_path, "targets:\n" + "".join(f"  - asset_id: a{i}\n" for i in range(3)))
    async with served(echo.app()) as url:
        exit_code, printed = await run_job(job, url, tmp_path / "run", rate=1000)
    assert exit_code == (0 if code == 0 else 1)
    assert leaked(tmp_path / "run", [printed, json_logs.getvalue()], echo.secrets) == []
    assert len(echo.secrets) >= 5  # the token, the app secret, an encryption, 3 signatures
    for line in results(tmp_path / "run"):
        if field == "commandId":
            assert (line["cancelled_command_ids"], line["effect_unknown"]) == (["c1"], True)
            assert "holds a secret" in line["error"]
        elif field == "requestId":
            assert line["request_id"] == "[redacted] [redacted]"
        else:
            assert "[redacted]" in (line["msg"] or line["error"])


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("how", ["escaped", "upper"])
async def test_a_token_service_echoing_its_request_reaches_no_output(
    tmp_path: Path, json_logs: io.StringIO, how: str
) -> None:
    """A token service that refuses the application (1003) and echoes the request's body,
    `encryption` included, into its msg: the run stops (exit 3) saying why, and neither the
    encryption nor the app secret reaches the summary, the report, run.json, the audit or a log
    line (the stop message carried it to all of them)."""
    echo = Echo("msg", how, token_status=p.TOKEN_BAD_ENCRYPTION)
    job = write_job(tmp_path, "targets:\n  - asset_id: a1\n")
    async with served(echo.app()) as url:
        exit_code, printed = await run_job(job, url, tmp_path / "run")
    assert exit_code == 3
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert "rejected the application credentials" in summary["stop_message"]
    assert "[redacted]" in summary["stop_message"]
    texts = [printed, json_logs.getvalue()]
    texts += [(tmp_path / "run" / name).read_text() for name in ("run.json", "audit.jsonl")]
    haystack = "\n".join([*texts, (tmp_path / "run" / "report.html").read_text()]).lower()
    assert [s for s in echo.secrets if s.lower() in haystack] == []


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize("token", ["commandId", "finished"])
async def test_a_token_spelt_like_a_word_censors_nothing(
    tmp_path: Path, json_logs: io.StringIO, token: str
) -> None:
    """A gateway whose access token is an ordinary word: the answers' keys still read (a token
    'commandId' made every listed command unreadable), and log keys, event names and values
    stay as written (a token 'finished' masked the run's outcome in the log)."""
    answers = answer([{"commandId": "c1"}])

    async def issue(_: web.Request) -> web.Response:
        data = {"accessToken": token, "expire": 7200}
        return web.json_response({"status": 0, "msg": "SUCCESS", "data": data})

    async def commands(_: web.Request) -> web.Response:
        return web.Response(body=answers, content_type="application/json")

    job = write_job(tmp_path, "targets:\n  - asset_id: a1\n  - asset_id: a2\n")
    async with served(token_gateway(issue, commands)) as url:
        exit_code, _ = await run_job(job, url, tmp_path / "run", rate=1000)
    assert exit_code == 0
    for line in results(tmp_path / "run"):
        assert (line["cancelled_command_ids"], line["effect_unknown"]) == (["c1"], False)
    events = [orjson.loads(line) for line in json_logs.getvalue().splitlines()]
    finished = next(e for e in events if e["event"] == "worker.run_finished")
    assert finished["reason"] == "finished"
    assert "[redacted]" not in json_logs.getvalue()


# -- 3. search answers that would hide a match ------------------------------------------------

MATCH_JOB = "match: {tsl_identifier: restart}\nlimits: {rate: 1000}\ntargets:\n"
MATCH_JOB += "  - asset_id: a1\n  - asset_id: a2\n"


def command(command_id: str, tsl: str = "restart") -> dict[str, object]:
    """A cached command as Search Command lists it."""
    return {"commandId": command_id, "state": 1, "tslIdentifier": tsl, "createTime": 1}


def searched(data: object, pagination: object = "ok") -> dict[str, object]:
    """A code-0 search answer with this `data` and `pagination` ("ok": one page, as many as
    listed; None: left out)."""
    body: dict[str, object] = {"code": 0, "msg": "OK", "requestId": "r-s", "data": data}
    if pagination == "ok":
        count = len(data) if isinstance(data, list) else 1
        pagination = {"pageNo": 1, "pageSize": 50, "totalSize": count}
    if pagination is not None:
        body["pagination"] = pagination
    return body


ODD_SEARCHES = {
    "data an object": searched({"list": [command("c1")]}),
    "data null": searched(None),
    "an item that is text": searched(["c9", command("c1")]),
    "an item without an id": searched([{"state": 1, "tslIdentifier": "restart"}]),
    "more than the page size": searched([command(f"c{i}") for i in range(51)]),
    "no pagination": searched([command("c1")], None),
    "pagination a list": searched([command("c1")], [1, 50, 1]),
    "no totalSize": searched([command("c1")], {"pageNo": 1, "pageSize": 50}),
    "totalSize negative": searched([command("c1")], {"pageNo": 1, "totalSize": -1}),
    "totalSize text": searched([command("c1")], {"pageNo": 1, "totalSize": "1"}),
    "totalSize true": searched([command("c1")], {"pageNo": 1, "totalSize": True}),
}


class Searches:
    """A gateway answering each search with `answer(page)`, each cancel as a cancel of what
    it names; it records the actions called."""

    def __init__(self, answer: Callable[[int], object]) -> None:
        self.answer = answer
        self.calls: list[str] = []

    async def commands(self, request: web.Request) -> web.Response:
        action = request.query["action"]
        self.calls.append(action)
        if action == "search":
            page = orjson.loads(await request.read())["pagination"]["pageNo"]
            return web.json_response(self.answer(page))
        named = request.query.get("commandId")
        return web.Response(body=answer([{"commandId": named}] if named else []))

    def app(self) -> web.Application:
        return gateway(self.commands)


@pytest.mark.parametrize("name", list(ODD_SEARCHES))
async def test_a_search_answer_of_an_odd_shape_fails_the_target(tmp_path: Path, name: str) -> None:
    """A selective run whose searches come back in a shape the docs do not give (a list
    hidden in an object, a null, an unreadable item, no usable pagination, more than a page):
    each target fails saying the answer is unreadable, nothing is cancelled by guess, the run
    ends 1. It was a clean nothing_to_cancel (exit 0), or cancelled on half a reading."""
    gateway_ = Searches(lambda _: ODD_SEARCHES[name])
    async with served(gateway_.app()) as url:
        exit_code, _ = await run_job(write_job(tmp_path, MATCH_JOB), url, tmp_path / "run")
    assert exit_code == 1
    for line in results(tmp_path / "run"):
        assert (line["outcome"], line["effect_unknown"]) == ("failed", False)
        assert "search answer is not of the documented shape" in line["error"]
        assert line["request_id"] == "r-s"
    assert set(gateway_.calls) == {"search"}


async def test_pages_that_never_end_fail_the_target_after_three(tmp_path: Path) -> None:
    """Search answers counting a billion commands, a full page each time: each target reads 3
    pages (150 commands: a device caches at most 50) and fails saying why, instead of searching
    without end (35,773 searches in 30 s, memory growing)."""

    def endless(page: int) -> object:
        listed = [command(f"p{page}-{i}", "other") for i in range(50)]
        return searched(listed, {"pageNo": page, "pageSize": 50, "totalSize": 10**9})

    gateway_ = Searches(endless)
    async with served(gateway_.app()) as url:
        with anyio.fail_after(30):
            exit_code, _ = await run_job(write_job(tmp_path, MATCH_JOB), url, tmp_path / "run")
    assert exit_code == 1
    assert gateway_.calls == ["search"] * 6
    for line in results(tmp_path / "run"):
        assert (line["outcome"], line["effect_unknown"]) == ("failed", False)
        assert "1,000,000,000 commands, more than 3 pages of 50" in line["error"]


async def test_verify_does_not_call_unreadable_searches_verified(tmp_path: Path) -> None:
    """A selective run that cancelled its matches, then `worker verify` against a gateway
    whose searches hide their list in an object: the sweep verifies nothing and says so
    (exit 1, '0 of 2 targets verified'); it said all were verified (exit 0)."""
    shape = {"now": searched([command("c1")])}
    gateway_ = Searches(lambda _: shape["now"])
    run_dir = tmp_path / "run"
    async with served(gateway_.app()) as url:
        assert (await run_job(write_job(tmp_path, MATCH_JOB), url, run_dir))[0] == 0
        assert all(line["cancelled_command_ids"] == ["c1"] for line in results(run_dir))
        shape["now"] = ODD_SEARCHES["data an object"]
        out = io.StringIO()
        options = RunOptions(url, CREDENTIALS, Limits(rate=1000), RunDir(run_dir), seed=1)
        options = replace(options, backoff_base_s=0.01, backoff_cap_s=0.1, verify_settle_s=0.0)
        assert await verify_run(options, out) == 1
    assert "0 of 2 targets verified" in out.getvalue()
    assert "2 could not be searched" in out.getvalue()
    verified = [orjson.loads(x) for x in (run_dir / "verify.jsonl").read_bytes().splitlines()]
    assert [line["verified"] for line in verified] == [None, None]
    assert all("documented shape" in line["error"] for line in verified)


# -- 4. requests that cannot be sent, or that every call refuses alike, stop the run ------------

FLEET = "limits: {rate: 2000, concurrency: 16}\ntargets:\n"
FLEET += "".join(f"  - asset_id: a{i:03d}\n" for i in range(60))


class Counting:
    """A gateway issuing `token` and answering every business call with `status` (200: a
    cancel that lists c1); it counts the business calls."""

    def __init__(self, token: str = "tok-1234567890", status: int = 200) -> None:  # noqa: S107
        self.token, self.status, self.calls = token, status, 0

    async def issue(self, _: web.Request) -> web.Response:
        data = {"accessToken": self.token, "expire": 7200}
        return web.json_response({"status": 0, "msg": "SUCCESS", "data": data})

    async def commands(self, _: web.Request) -> web.Response:
        self.calls += 1
        if self.status != 200:
            return web.json_response({"message": "Cannot process request body"}, status=400)
        return web.Response(body=answer([{"commandId": "c1"}]), content_type="application/json")

    def app(self) -> web.Application:
        return token_gateway(self.issue, self.commands)


@pytest.mark.usefixtures("registry")
@pytest.mark.parametrize(
    ("token", "words"),
    [
        ("tok-123\n4567890", "a control character"),
        ("tok-123 4567890", "a space"),
        ("tok-123\u00e94567890", "not printable ASCII"),
        ("t" * 512_000, "512,000 characters long (at most 4,096)"),
    ],
    ids=["newline", "space", "non-ascii", "500 KB"],
)
async def test_a_token_that_cannot_be_sent_stops_before_anything_is(
    tmp_path: Path, token: str, words: str
) -> None:
    """An access token with a newline (which aiohttp refuses in a header), a space, a
    non-ASCII letter, or 500 KB of text: refused when obtained, so the run stops at once (exit 3)
    naming the problem, not the token; no business call is sent and no result claims an
    unknown effect. A newline made every target failed with effect_unknown (exit 1); 500 KB
    made every call HTTP 400 and failed the fleet."""
    fleet = Counting(token)
    async with served(fleet.app()) as url:
        exit_code, _ = await run_job(write_job(tmp_path, FLEET), url, tmp_path / "run")
    assert exit_code == 3
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert "access token" in summary["stop_message"]
    assert words in summary["stop_message"]
    assert token[:12] not in summary["stop_message"]
    assert fleet.calls == 0
    assert not (tmp_path / "run" / "results.jsonl").read_bytes()


async def test_a_request_the_http_library_refuses_is_fatal_and_not_sent() -> None:
    """A request aiohttp will not build (here: a cached token holding a newline, as one
    obtained before validation could): a FatalError saying nothing was sent, not a raw
    ValueError that the engine turned into failed + effect_unknown."""
    fleet = Counting()
    async with served(fleet.app()) as url, EnOSClient(url, CREDENTIALS) as client:
        await client.authenticate()
        assert client._token is not None
        client._token = replace(client._token, value="tok-123\n4567890")
        with pytest.raises(FatalError, match="could not be built") as caught:
            await client.cancel(TARGET)
    assert caught.value.maybe_applied is False
    assert "tok-123" not in str(caught.value)
    assert fleet.calls == 0


async def test_the_first_answers_all_refused_alike_stop_the_run(tmp_path: Path) -> None:
    """Every business call answered HTTP 400 (a gateway that cannot take the requests): the run
    stops after 20 such answers with nothing succeeding (exit 3), saying what repeated and
    what to check; no target is failed (each one refused waits, and is left to resume); a
    resume against a gateway that answers cancels them all. It failed all 60 targets."""
    fleet = Counting(status=400)
    job = write_job(tmp_path, FLEET)
    async with served(fleet.app()) as url:
        exit_code, _ = await run_job(job, url, tmp_path / "run")
    assert exit_code == 3
    summary = orjson.loads((tmp_path / "run" / "summary.json").read_bytes())
    assert "the first 20 answers" in summary["stop_message"]
    assert "HTTP 400" in summary["stop_message"]
    assert summary["outcomes"]["failed"] == 0
    assert 20 <= fleet.calls <= 20 + 16  # what was in flight when it stopped
    fixed = Counting()
    async with served(fixed.app()) as url:
        exit_code, _ = await resume_job(job, url, tmp_path / "run")
    assert exit_code == 0
    lines = results(tmp_path / "run")
    assert len(lines) == 60
    assert {line["outcome"] for line in lines} == {"cancelled"}


async def test_refusals_after_a_success_fail_their_targets_only(tmp_path: Path) -> None:
    """The rule is about a segment's first answers: once a call succeeded, HTTP 400s are
    the targets' own (failed, exit 1), however many follow."""
    refused = {f"a{i:03d}" for i in range(1, 60)}

    async def commands(request: web.Request) -> web.Response:
        if request.query["assetId"] in refused:
            return web.json_response({"message": "Cannot process request body"}, status=400)
        return web.Response(body=answer([{"commandId": "c1"}]), content_type="application/json")

    job = write_job(tmp_path, FLEET.replace("concurrency: 16", "concurrency: 1"))
    async with served(token_gateway(Counting().issue, commands)) as url:
        exit_code, _ = await run_job(job, url, tmp_path / "run")
    assert exit_code == 1
    outcomes = {line["target"]["asset_id"]: line["outcome"] for line in results(tmp_path / "run")}
    assert outcomes == {asset: "failed" if asset in refused else "cancelled" for asset in outcomes}
    assert len(outcomes) == 60


def refusal(status: int = 400, code: int | None = None) -> EnOSError:
    """An answer refusing a call: an HTTP 4xx of the gateway's, or an EnOS code."""
    return TargetError(f"HTTP {status}", http_status=status, code=code)


@pytest.mark.parametrize(
    ("before", "stops"),
    [
        ([refusal()] * 19, True),
        ([refusal()] * 5 + [RetryableError("HTTP 503", maybe_applied=True)] * 3, True),
        ([refusal()] * 5 + [RateLimitedError("HTTP 429", retry_after=1, request_id=None)], True),
        ([refusal()] * 5 + ["success"], False),
        ([refusal()] * 5 + [refusal(413)], False),
        ([refusal()] * 5 + [refusal(200, code=p.CODE_NOT_FOUND)], False),
        ([refusal(200, code=p.CODE_INVALID_PARAM)], False),
    ],
    ids=["19 alike", "5xx between", "429 between", "a success", "another 4xx", "99404", "99400"],
)
def test_the_refusal_rule_is_about_the_first_answers_alike(
    before: list[EnOSError | str], *, stops: bool
) -> None:
    """The rule, pure: the 20th HTTP 400 stops the run when all answers before it were HTTP 400
    (transient failures and 429s in between are no answers); a success, another status or a
    target's own EnOS code settles it, after which refusals are the targets' own. A held
    refusal comes back retryable and took no effect."""
    rules = StopRules(EngineSettings(concurrency=16))
    for event in before:
        if event == "success":
            rules.answered()
        elif isinstance(event, RetryableError):
            assert rules.transient(event) is None
        else:
            assert isinstance(event, EnOSError)
            rules.refused(event)
    counted = sum(1 for e in before if isinstance(e, TargetError) and e.http_status == 400)
    for _ in range(REFUSALS_TO_STOP - counted - 1):
        assert rules.refused(refusal())[1] is None
    held, stop = rules.refused(refusal())
    assert (stop is not None) == stops
    assert isinstance(held, RetryableError) == stops
    if stop is not None:
        assert stop[0] is StopReason.FATAL
        assert held.maybe_applied is False


async def test_verify_after_a_run_whose_searches_were_unreadable(tmp_path: Path) -> None:
    """The run's own searches were unreadable (its targets failed, nothing known matched): the
    sweep searches them with the job's match from run.json and finds the matching command
    still pending; a target with an inline rule of its own is unverified, never verified."""
    shape = {"now": ODD_SEARCHES["data an object"]}
    gateway_ = Searches(lambda _: shape["now"])
    run_dir, inline_dir = tmp_path / "run", tmp_path / "inline"
    inline = (
        "limits: {rate: 1000}\ntargets:\n  - asset_id: a1\n    match: {tsl_identifier: restart}\n"
    )
    async with served(gateway_.app()) as url:
        assert (await run_job(write_job(tmp_path, MATCH_JOB), url, run_dir))[0] == 1
        job = write_job(tmp_path, inline, name="inline.yaml")
        assert (await run_job(job, url, inline_dir))[0] == 1
        assert all(line["matched_command_ids"] == [] for line in results(run_dir))
        shape["now"] = searched([command("c1"), command("c2", tsl="keep")])
        outs = []
        for directory in (run_dir, inline_dir):
            out = io.StringIO()
            options = RunOptions(url, CREDENTIALS, Limits(rate=1000), RunDir(directory), seed=1)
            options = replace(options, backoff_base_s=0.01, verify_settle_s=0.0)
            assert await verify_run(options, out) == 1
            outs.append(out.getvalue())
    assert "0 of 2 targets verified, 2 still pending (2 commands)" in outs[0]
    swept = [orjson.loads(x) for x in (run_dir / "verify.jsonl").read_bytes().splitlines()]
    assert [line["still_pending"] for line in swept] == [["c1"], ["c1"]]
    assert "0 of 1 targets verified" in outs[1]
    assert "1 could not be searched" in outs[1]
    (line,) = [orjson.loads(x) for x in (inline_dir / "verify.jsonl").read_bytes().splitlines()]
    assert (line["verified"], line["still_pending"]) == (None, [])
    assert "not known" in line["error"]
