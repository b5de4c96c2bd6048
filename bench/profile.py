"""Where the worker's CPU per request goes, by layer: aim the next change here.

Runs the real `worker run` (unlimited rate) under cProfile against a simulator pinned to its own
core, then adds up the functions' own time per layer and divides by the requests sent. cProfile
slows Python code more than C code, so read the split, not the absolute numbers (those come from
`bench.throughput`).

    python -m bench.profile            # 30,000 targets at concurrency 64
    python -m bench.profile 50000 --concurrency 256
"""

from __future__ import annotations

import argparse
import pstats
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

import orjson

from bench.common import CLIENT_CORE, pinned, run_args, simulator, table, worker_env, write_targets

LAYERS = (  # (layer, what a function's file or name contains), first match wins
    ("event loop (uvloop, asyncio, anyio)", ("uvloop", "asyncio", "anyio", "selectors")),
    ("aiohttp (client, connector, parser)", ("aiohttp", "multidict", "propcache")),
    ("yarl (URLs)", ("yarl",)),
    (
        "engine (worker/core)",
        ("worker/core/",),
    ),
    ("client (worker/enos: client, answers)", ("worker/enos/client", "worker/enos/answers")),
    ("signing", ("worker/enos/signing", "sha256", "hexdigest")),
    (
        "records (worker/store, the app's recorder)",
        ("worker/store/", "worker/app/run"),
    ),
    ("orjson", ("orjson",)),
    ("os.write / fdatasync", ("posix.write", "'write'", "fdatasync")),
    ("targets (worker/jobs, model)", ("worker/jobs/", "worker/model")),
)


def layer(key: tuple[str, int, str]) -> str:
    """The layer a profiled function belongs to."""
    where = f"{key[0]}:{key[2]}"
    for name, needles in LAYERS:
        if any(needle in where for needle in needles):
            return name
    return "other (builtins, logging, start-up)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", nargs="?", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(args.count + 10)) as (url, _),
    ):
        job = write_targets(
            Path(tmp), args.count, f"{{rate: unlimited, concurrency: {args.concurrency}}}"
        )
        out, profile = Path(tmp) / "run", Path(tmp) / "worker.prof"
        command = pinned(
            CLIENT_CORE,
            [
                sys.executable,
                *("-m", "cProfile", "-o", str(profile), "-m", "worker"),
                *run_args(job, url, out, "--no-progress"),
            ],
        )
        subprocess.run(command, env=worker_env(), capture_output=True, check=True)
        requests = orjson.loads((out / "summary.json").read_bytes())["requests"]
        stats = pstats.Stats(str(profile))
    own: Counter[str] = Counter()
    for key, value in stats.stats.items():  # type: ignore[attr-defined]
        own[layer(key)] += value[2]  # tottime: the function's own time
    total = sum(own.values())
    rows = [
        [name, f"{seconds / requests * 1e6:.1f}", f"{seconds / total:.0%}"]
        for name, seconds in own.most_common()
    ]
    print(f"{requests:,} requests at concurrency {args.concurrency}, under cProfile.\n")
    print(
        table(
            "Own CPU time per request, by layer (cProfile: relative, not absolute)",
            ["layer", "us per request", "share"],
            rows,
        )
    )
    top = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:25]  # type: ignore[attr-defined]
    print(
        table(
            "The 25 functions with the most own time",
            ["function", "calls", "us per request"],
            [
                [f"{Path(k[0]).name}:{k[1]} {k[2]}", f"{v[1]:,}", f"{v[2] / requests * 1e6:.2f}"]
                for k, v in top
            ],
        )
    )


if __name__ == "__main__":
    main()
