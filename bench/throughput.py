"""(a) Throughput and CPU per request: `worker run` against the bare aiohttp loop, interleaved.

Both talk to one simulator process pinned to its own core (``os.sched_setaffinity``); each client
runs pinned to the other. CPU per request is measured the same way for both, by the difference
of a BIG- and a SMALL-target run from the child's getrusage, so process start-up, the token and
job planning are not charged to requests. Rounds interleave (bare, worker, bare, worker, ...) so
that a noisy stretch of the machine hits both; every figure is given as min / median over the
rounds. Every run uses fresh devices.

    python -m bench.throughput                 # concurrency 16, 64, 256; 3 rounds
    python -m bench.throughput 64 --rounds 5
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from bench.common import (
    CLIENT_CORE,
    machine,
    process_cpu_s,
    run_worker_timed,
    simulator,
    table,
    write_targets,
)

BIG, SMALL = 20_000, 2_000


def _pin_client() -> Callable[[], None] | None:
    cores = os.sched_getaffinity(0)
    if len(cores) < 2:
        return None
    return lambda: os.sched_setaffinity(0, {int(CLIENT_CORE)})


def _child_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def bare(url: str, count: int, concurrency: int, first: int) -> tuple[float, float, float]:
    """One bare-loop run: (its loop's wall s, its requests/s, the process's CPU s)."""
    before = _child_cpu()
    done = subprocess.run(
        [sys.executable, "bench/bare_loop.py", url, str(count), str(concurrency), str(first)],
        capture_output=True,
        text=True,
        check=True,
        preexec_fn=_pin_client(),
    )
    result = orjson.loads(done.stdout)
    return result["wall_s"], count / result["wall_s"], _child_cpu() - before


def worker(base: Path, url: str, count: int, concurrency: int, first: int) -> tuple[float, float]:
    """One `worker run`: (requests/s over its own duration, the process's CPU s)."""
    limits = f"{{rate: unlimited, concurrency: {concurrency}}}"
    job = write_targets(base / f"w{first}", count, limits, first=first)
    _, cpu, summary = run_worker_timed(job, url, base / f"w{first}" / "run")
    assert summary["outcomes"]["failed"] == 0
    return summary["requests"] / summary["duration_s"], cpu


def one_level(
    url: str, sim_pid: int, base: Path, *, concurrency: int, rounds: int, first: int
) -> list[str]:
    figures: dict[str, list[float]] = {
        k: [] for k in ("bare_rps", "worker_rps", "bare_us", "worker_us", "sim_bare", "sim_worker")
    }
    for _ in range(rounds):
        _, _, small_cpu = bare(url, SMALL, concurrency, first)
        first += SMALL
        sim_before, began = process_cpu_s(sim_pid), time.perf_counter()
        _, rps, big_cpu = bare(url, BIG, concurrency, first)
        figures["sim_bare"].append(
            (process_cpu_s(sim_pid) - sim_before) / (time.perf_counter() - began)
        )
        first += BIG
        figures["bare_rps"].append(rps)
        figures["bare_us"].append((big_cpu - small_cpu) / (BIG - SMALL) * 1e6)
        _, small_cpu = worker(base, url, SMALL, concurrency, first)
        first += SMALL
        sim_before, began = process_cpu_s(sim_pid), time.perf_counter()
        rps, big_cpu = worker(base, url, BIG, concurrency, first)
        figures["sim_worker"].append(
            (process_cpu_s(sim_pid) - sim_before) / (time.perf_counter() - began)
        )
        first += BIG
        figures["worker_rps"].append(rps)
        figures["worker_us"].append((big_cpu - small_cpu) / (BIG - SMALL) * 1e6)
    ratios_rps = [w / b for w, b in zip(figures["worker_rps"], figures["bare_rps"], strict=True)]
    ratios_cpu = [w / b for w, b in zip(figures["worker_us"], figures["bare_us"], strict=True)]

    def both(values: list[float], fmt: str) -> str:
        return f"{min(values):{fmt}} / {statistics.median(values):{fmt}}"

    return [
        str(concurrency),
        both(figures["bare_rps"], ",.0f"),
        both(figures["worker_rps"], ",.0f"),
        both(ratios_rps, ".2f"),
        both(figures["bare_us"], ".0f"),
        both(figures["worker_us"], ".0f"),
        both(ratios_cpu, ".2f"),
        f"{statistics.median(figures['sim_bare']):.2f} / "
        f"{statistics.median(figures['sim_worker']):.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("levels", nargs="*", type=int, default=[16, 64, 256])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    per_level = args.rounds * 2 * (BIG + SMALL)
    rows = []
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(per_level * len(args.levels) + 10)) as (url, sim_pid),
    ):
        for level, concurrency in enumerate(args.levels):
            rows.append(
                one_level(
                    url,
                    sim_pid,
                    Path(tmp),
                    concurrency=concurrency,
                    rounds=args.rounds,
                    first=level * per_level,
                )
            )
    print(
        f"Machine: {machine()}; simulator and client on separate cores; {args.rounds} "
        f"interleaved rounds; min / median.\n"
    )
    print(
        table(
            "Throughput and CPU per request: worker vs a bare aiohttp loop (same simulator)",
            [
                "concurrency",
                "bare req/s",
                "worker req/s",
                "throughput ratio",
                "bare CPU us/req",
                "worker CPU us/req",
                "CPU ratio",
                "simulator core busy (bare / worker)",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
