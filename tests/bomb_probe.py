"""Peak memory of a client fed compression bombs, measured in a process of its own.

``python -m tests.bomb_probe MIB CALLS`` serves a gateway whose every cancel answer is a gzip
bomb (about 1 KB a MiB, announced with its Content-Length) inflating to MIB MiB, makes CALLS
cancels at once, and prints one JSON line: the peak RSS (MiB) and what each call ended in. A
process of its own, so the peak is this client's and nobody else's: read from VmHWM, the peak
of this program's own memory, since Linux carries ``ru_maxrss`` over an exec (a probe started
by a pytest process of 360 MB would report at least that).
"""

from __future__ import annotations

import asyncio
import resource
import sys
from pathlib import Path

import orjson

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import bomb, encoded_answer, gateway, served
from worker import logs
from worker.enos.client import EnOSClient
from worker.model import Credentials, Target


async def probe(inflated_mib: int, calls: int) -> list[str]:
    """Each call's outcome: the error's class and message, or "accepted"."""
    handler = encoded_answer(bomb(inflated_mib), "gzip", length=True)
    async with (
        served(gateway(handler)) as url,
        EnOSClient(url, Credentials(APP_KEY, APP_SECRET), timeout=120) as client,
    ):
        target = Target(org_id=ORG, asset_id="as000001")
        done = await asyncio.gather(
            *(client.cancel(target) for _ in range(calls)), return_exceptions=True
        )
    return [
        f"{type(one).__name__}: {one}" if isinstance(one, BaseException) else "accepted"
        for one in done
    ]


def main() -> None:
    inflated_mib, calls = int(sys.argv[1]), int(sys.argv[2])
    logs.configure(json=True, stream=sys.stderr)  # stdout carries the one JSON line
    outcomes = asyncio.run(probe(inflated_mib, calls))
    sys.stdout.write(orjson.dumps({"peak_rss_mib": peak_rss_mib(), "outcomes": outcomes}).decode())


def peak_rss_mib() -> float:
    """The peak resident memory of this program, in MiB."""
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


if __name__ == "__main__":
    main()
