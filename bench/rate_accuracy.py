"""(b) Rate accuracy: `worker run --rate R` for about 5 s, measured at the simulator.

Arrival times are the simulator's own (CLOCK_MONOTONIC), so they include everything between the
two processes. Reports the achieved mean over the run and the most requests in any sliding
1-second window, both as ratios to R.

    python -m bench.rate_accuracy            # R = 20, 200, 2000
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import machine, run_worker_timed, sim_json, simulator, table, write_targets

RATES = (20, 200, 2000)
SECONDS = 5


def worst_window(arrivals: list[float]) -> int:
    """The most arrivals in any window [t, t + 1 s)."""
    worst, start = 0, 0
    for end, moment in enumerate(arrivals):
        while moment - arrivals[start] >= 1.0:
            start += 1
        worst = max(worst, end - start + 1)
    return worst


def main() -> None:
    rates = tuple(int(x) for x in sys.argv[1:]) or RATES
    rows = []
    first = 0
    with tempfile.TemporaryDirectory() as tmp:
        for rate in rates:
            count = rate * SECONDS
            with simulator("--devices", str(first + count + 10)) as (url, _):
                job = write_targets(
                    Path(tmp) / f"r{rate}", count, f"{{rate: {rate}, concurrency: 64}}", first=first
                )
                run_worker_timed(job, url, Path(tmp) / f"r{rate}" / "run")
                arrivals = sorted(sim_json(url, "/_sim/arrivals"))
            first += count
            mean = (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])
            worst = worst_window(arrivals)
            rows.append(
                [
                    str(rate),
                    str(len(arrivals)),
                    f"{mean:,.1f}",
                    f"{mean / rate:.3f}",
                    str(worst),
                    f"{worst / rate:.3f}",
                ]
            )
    print(f"Machine: {machine()}.\n")
    print(
        table(
            f"Rate accuracy over {SECONDS} s, measured at the simulator",
            [
                "rate/s",
                "requests",
                "achieved mean/s",
                "mean ratio",
                "worst 1-s window",
                "worst ratio",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
