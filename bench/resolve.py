"""(i) A targets_query over a large fleet: how long it takes to resolve, what it costs in calls,
and the peak RSS, for `worker resolve` and for a `worker run` that resolves at its start.

The simulator serves DEVICES generated devices in PRODUCTS products (1,000,000 in 100 of 10,000
by default); the job's query names every product (one search each, as a job would for a
product list), or with --single one search over the whole fleet (`productType = 'Device'`).
The run is stopped at the confirmation of the count (no --yes, no terminal: exit 3, nothing
cancelled), so it measures the resolution and the plan over the snapshot. Peak RSS is the
kernel's (`/usr/bin/time -v`).

    python -m bench.resolve                              # 1,000,000 devices, unlimited rate
    python -m bench.resolve 1000000 --rate 200           # at 200 calls/s
    python -m bench.resolve 100000 --page-max 250        # a gateway that takes pages of 250
    python -m bench.resolve 1000000 --single             # one search of 980,000 devices
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import CLIENT_CORE, ORG, machine, pinned, sim_json, simulator, table, worker_env

HEADER = ("wall s", "devices / s", "peak RSS MB")


def timed(*args: str) -> tuple[int, float, subprocess.CompletedProcess[str]]:
    """Run `worker ARGS` under /usr/bin/time -v: (peak RSS MB, wall s, process)."""
    command = ["/usr/bin/time", "-v", *pinned(CLIENT_CORE, [sys.executable, "-m", "worker", *args])]
    started = time.monotonic()
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return (int(match.group(1)) // 1024 if match else -1), wall, done


def job_file(directory: Path, products: int, *, single: bool, name: str) -> Path:
    """A query job over every product (or, --single, one search over the fleet)."""
    if single:
        query = "{product_type: Device}"
    else:
        keys = ", ".join(f"simP{k:04d}" for k in range(products))
        query = f"{{product_key: [{keys}]}}"
    job = directory / f"{name}.yaml"
    job.write_text(
        f"version: 1\nname: {name}\norg_id: {ORG}\nlimits: {{concurrency: 64}}\n"
        f"targets_query: {query}\n"
    )
    return job


def searches(url: str) -> int:
    """Search Device calls the simulator answered so far."""
    stats = sim_json(url, "/_sim/stats")
    return int(stats["by_action"].get("search_devices", 0))


def measure(args: argparse.Namespace, tmp: Path, url: str, command: str) -> list[str]:
    """One resolution (by `worker resolve`, or at the start of a `worker run`): a table row."""
    job = job_file(tmp, args.products, single=args.single, name=f"bench-{command}")
    before = searches(url)
    if command == "resolve":
        out = tmp / "devices.csv"
        rss, wall, done = timed(
            "resolve", str(job), "--gateway", url, "--out", str(out), "--rate", args.rate
        )
        assert done.returncode == 0, done.stderr[-2000:]
        found = out.read_bytes().count(b"\n") - 1
    else:
        run_dir = tmp / "run"
        flags = ("--out", str(run_dir), "--rate", args.rate, "--no-progress")
        rss, wall, done = timed("run", str(job), "--gateway", url, *flags)
        assert done.returncode == 3, done.stderr[-2000:]  # stopped at the confirmation
        assert "without a terminal to confirm on" in done.stdout, done.stdout[-2000:]
        found = (run_dir / "targets.csv").read_bytes().count(b"\n") - 1
    calls = searches(url) - before
    return [
        f"worker {command}",
        f"{found:,}",
        f"{calls:,}",
        f"{1000 * calls / max(found, 1):.2f}",
        f"{wall:.1f}",
        f"{found / wall:,.0f}",
        f"{rss}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("devices", type=int, nargs="?", default=1_000_000)
    parser.add_argument("--products", type=int, default=100)
    parser.add_argument("--rate", default="unlimited", help="the job's --rate (calls per second)")
    parser.add_argument("--page-max", type=int, default=1000, help="the gateway's largest page")
    parser.add_argument("--single", action="store_true", help="one search over the whole fleet")
    args = parser.parse_args()
    sim_flags = ("--devices", str(args.devices), "--products", str(args.products))
    rows = []
    with (
        tempfile.TemporaryDirectory() as name,
        simulator(*sim_flags, "--device-page-max", str(args.page_max)) as (url, _),
    ):
        tmp = Path(name)
        for command in ("resolve", "run"):
            rows.append(measure(args, tmp, url, command))
    print(f"Machine: {machine()}.\n")
    shape = "one search" if args.single else f"{args.products} searches (one per product)"
    print(
        table(
            f"{args.devices:,} devices, {shape}, rate {args.rate}, pages of at most "
            f"{args.page_max:,}",
            [*("", "devices", "calls", "calls / 1,000 devices"), *HEADER],
            rows,
        )
    )


if __name__ == "__main__":
    main()
