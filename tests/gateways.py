"""Small real gateways for tests: an aiohttp app served on 127.0.0.1, canned answers."""

from __future__ import annotations

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
