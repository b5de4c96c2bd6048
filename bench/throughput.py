"""(a) Throughput and CPU per request: `worker run` against the bare aiohttp loop, same run.

Both talk to one simulator process pinned to its own core; each client is pinned to the other.
The worker's CPU per request is measured by difference (a 20,000-target run minus a
2,000-target run), so process start-up and job planning are not charged to requests; its
throughput is requests over the run's own duration (summary.json). Every run uses fresh devices.

    python -m bench.throughput            # prints a Markdown table (concurrency 16, 64, 256)
    python -m bench.throughput 64         # one level only
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

from bench.common import (
    CLIENT_CORE,
    machine,
    pinned,
    process_cpu_s,
    run_worker_timed,
    simulator,
    table,
    write_targets,
)

BIG, SMALL = 20_000, 2_000
LEVELS = (16, 64, 256)


def bare(url: str, count: int, concurrency: int, first: int) -> dict[str, float]:
    """One bare-loop run; its own measurement of wall and CPU time."""
    command = pinned(CLIENT_CORE, [sys.executable, "bench/bare_loop.py", url, str(count),
                                   str(concurrency), str(first)])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    result: dict[str, float] = orjson.loads(done.stdout)
    return result


def main() -> None:
    levels = tuple(int(x) for x in sys.argv[1:]) or LEVELS
    rows = []
    per_level = BIG * 2 + SMALL
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(per_level * len(levels) + 10)) as (url, sim_pid),
    ):
        base = Path(tmp)
        for level, concurrency in enumerate(levels):
            first = level * per_level
            sim_before = process_cpu_s(sim_pid)
            floor = bare(url, BIG, concurrency, first)
            sim_load_bare = (process_cpu_s(sim_pid) - sim_before) / floor["wall_s"]
            limits = f"{{rate: unlimited, concurrency: {concurrency}}}"
            small = write_targets(base / f"s{level}", SMALL, limits, first=first + BIG)
            big = write_targets(base / f"b{level}", BIG, limits, first=first + BIG + SMALL)
            _, cpu_small, _ = run_worker_timed(small, url, base / f"s{level}" / "run")
            sim_before = process_cpu_s(sim_pid)
            wall, cpu_big, summary = run_worker_timed(big, url, base / f"b{level}" / "run")
            sim_load = (process_cpu_s(sim_pid) - sim_before) / wall
            assert summary["outcomes"]["failed"] == 0
            bare_rps = floor["requests"] / floor["wall_s"]
            bare_us = floor["cpu_s"] / floor["requests"] * 1e6
            worker_rps = summary["attempts"] / summary["duration_s"]
            worker_us = (cpu_big - cpu_small) / (BIG - SMALL) * 1e6
            rows.append([
                str(concurrency), f"{bare_rps:,.0f}", f"{worker_rps:,.0f}",
                f"{worker_rps / bare_rps:.2f}", f"{bare_us:.0f}", f"{worker_us:.0f}",
                f"{worker_us / bare_us:.2f}", f"{sim_load_bare:.2f} / {sim_load:.2f}",
            ])  # fmt: skip
    print(f"Machine: {machine()}; simulator and client pinned to separate cores.\n")
    print(table(
        "Throughput and CPU per request: worker vs a bare aiohttp loop (same simulator, same run)",
        ["concurrency", "bare req/s", "worker req/s", "throughput ratio", "bare CPU us/req",
         "worker CPU us/req", "CPU ratio", "simulator core busy (bare / worker)"],
        rows,
    ))  # fmt: skip


if __name__ == "__main__":
    main()
