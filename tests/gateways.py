"""Small real gateways for tests: an aiohttp app served on 127.0.0.1, canned answers."""

from __future__ import annotations

import struct
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import orjson
from aiohttp import web

from worker.enos import protocol as p

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """Serve an aiohttp app on 127.0.0.1 (any free port); yields its base URL."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def _token(_: web.Request) -> web.Response:
    data = {"accessToken": "tok-1234567890", "expire": 7200}
    return web.json_response({"status": 0, "msg": "SUCCESS", "data": data})


def gateway(commands: Handler) -> web.Application:
    """A gateway that issues tokens and answers every business call with `commands`."""
    app = web.Application()
    app.router.add_post(p.TOKEN_GET_PATH, _token)
    app.router.add_route("*", p.COMMANDS_PATH, commands)
    return app


def canned_gateway(cancel_answer: bytes) -> web.Application:
    """A gateway that issues tokens and answers every cancel with these bytes."""

    async def commands(_: web.Request) -> web.Response:
        return web.Response(body=cancel_answer, content_type="application/json")

    return gateway(commands)


def answer(data: object, code: int = 0, msg: str = "OK") -> bytes:
    """A cancel answer with this `data` (code 0 unless told)."""
    return orjson.dumps({"code": code, "msg": msg, "requestId": "r-1", "data": data})


MIB = 1 << 20


def bomb(
    inflated_mib: int,
    *,
    encoding: str = "gzip",
    prefix: bytes = b'{"code":0,"msg":"',
    suffix: bytes = b'","requestId":"r-1","data":[]}',
) -> bytes:
    """A compressed JSON answer whose string field inflates to `inflated_mib` MiB of spaces, in
    a few milliseconds: after a full flush, every MiB of spaces compresses to the same ~1 KB
    block, so the block is made once and repeated, and the trailer's checksum is chained.
    `encoding` is ``gzip``, ``deflate`` (zlib-wrapped, as RFC 9110 says) or ``raw-deflate``
    (what some servers send as ``deflate``)."""
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    squeeze = zlib.compressobj(9, zlib.DEFLATED, wbits)
    fill = b" " * MIB
    head = squeeze.compress(prefix) + squeeze.flush(zlib.Z_FULL_FLUSH)
    block = squeeze.compress(fill) + squeeze.flush(zlib.Z_FULL_FLUSH)
    tail = squeeze.compress(suffix) + squeeze.flush(zlib.Z_FINISH)
    if encoding == "gzip":
        crc = zlib.crc32(prefix)
        for _ in range(inflated_mib):
            crc = zlib.crc32(fill, crc)
        size = len(prefix) + inflated_mib * MIB + len(suffix)
        tail = tail[:-8] + struct.pack("<II", zlib.crc32(suffix, crc), size & 0xFFFFFFFF)
    elif encoding == "deflate":
        adler = zlib.adler32(prefix)
        for _ in range(inflated_mib):
            adler = zlib.adler32(fill, adler)
        tail = tail[:-4] + struct.pack(">I", zlib.adler32(suffix, adler))
    return head + block * inflated_mib + tail


def compressed(raw: bytes, encoding: str) -> bytes:
    """`raw` compressed as `encoding` (``gzip``, ``deflate``, ``raw-deflate``)."""
    wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
    squeeze = zlib.compressobj(6, zlib.DEFLATED, wbits)
    return squeeze.compress(raw) + squeeze.flush()


def encoded_answer(body: bytes, encoding: str, *, length: bool) -> Handler:
    """A handler answering `body` (already compressed) with Content-Encoding `encoding`
    (``raw-deflate`` is sent as ``deflate``), announced with a Content-Length or streamed in
    chunks without one."""
    name = "deflate" if encoding == "raw-deflate" else encoding

    async def handler(request: web.Request) -> web.StreamResponse:
        headers = {"Content-Type": "application/json", "Content-Encoding": name}
        if length:
            return web.Response(body=body, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(body), 16384):
            await response.write(body[start : start + 16384])
        await response.write_eof()
        return response

    return handler


def token_gateway(token_handler: Handler, commands: Handler) -> web.Application:
    """A gateway whose token answers come from `token_handler` (get and refresh)."""
    app = web.Application()
    app.router.add_post(p.TOKEN_GET_PATH, token_handler)
    app.router.add_post(p.TOKEN_REFRESH_PATH, token_handler)
    app.router.add_route("*", p.COMMANDS_PATH, commands)
    return app
