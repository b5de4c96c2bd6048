"""The floor: a minimal aiohttp client loop doing the same signed cancel calls as `worker`.

K tasks pull asset ids from one shared iterator and POST signed cancels; nothing else (no rate
limit, no journal, no retries). Prints JSON: requests, wall seconds, CPU seconds of the loop.
Usage: python bench/bare_loop.py URL COUNT CONCURRENCY [FIRST_DEVICE]
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import resource
import sys
import time

import aiohttp
import orjson

APP_KEY, APP_SECRET = "bench-app", "bench-secret-0123456789"
ORG = "o15541858646501"


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def main(url: str, count: int, concurrency: int, first: int) -> None:
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        stamp = str(int(time.time() * 1000))
        encryption = hashlib.sha256(f"{APP_KEY}{stamp}{APP_SECRET}".encode()).hexdigest()
        body = {"appKey": APP_KEY, "encryption": encryption, "timestamp": stamp}
        async with session.post(url + "/apim-token-service/v2.0/token/get", json=body) as resp:
            token = (await resp.json())["data"]["accessToken"]
        ids = iter(range(first, first + count))
        endpoint = url + "/connect-service/v2.1/commands"

        async def loop() -> None:
            for index in ids:
                asset = f"as{index:06d}"
                ts = str(int(time.time() * 1000))
                params = {"action": "cancel", "orgId": ORG, "assetId": asset}
                signed = f"{token}actioncancelassetId{asset}orgId{ORG}{ts}{APP_SECRET}"
                headers = {
                    "apim-accesstoken": token,
                    "apim-timestamp": ts,
                    "apim-signature": hashlib.sha256(signed.encode()).hexdigest(),
                }
                async with session.post(endpoint, params=params, headers=headers) as resp:
                    payload = orjson.loads(await resp.read())
                    assert payload["code"] == 0

        cpu, began = _cpu(), time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        wall, used = time.perf_counter() - began, _cpu() - cpu
    print(orjson.dumps({"requests": count, "wall_s": wall, "cpu_s": used}).decode())


if __name__ == "__main__":
    first_device = int(sys.argv[4]) if len(sys.argv) > 4 else 0
    job = main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), first_device)
    if importlib.util.find_spec("uvloop") is not None:  # as `worker` does
        import uvloop

        uvloop.run(job)
    else:
        asyncio.run(job)
