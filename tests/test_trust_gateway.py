"""A hostile gateway, part two: what it sends is bounded after decompression, secrets it echoes
in any spelling are kept out of every output, answers of an odd shape are never a clean
"nothing", and requests that cannot be sent, or that every call refuses alike, stop the run."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import (
    bomb,
    compressed,
    encoded_answer,
    gateway,
    served,
    token_gateway,
)
from worker.enos.client import EnOSClient
from worker.errors import RetryableError
from worker.model import Credentials, Target

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
    assert probe["outcomes"] == [f"RetryableError: the answer is {PAST_THE_CAP}; not read"] * 3
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
