"""Selective cancels: calls per device and devices cleared per second at a fixed rate, for 0,
1 and 3 matches per device, beside a cancel-all job (one call per device).

A selective target costs one search (a device caches at most 50 commands: one page) and one
cancel per match, all at the run's rate, so devices/s falls as matches rise:
rate / (1 + matches). One generated device in eight has no cached command (no match).

    python -m bench.selective            # 1,000 devices at 200/s per case
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from bench.common import ORG, machine, run_worker_timed, sim_json, simulator, table

RATE = 200
CASES = (
    ("cancel all (no match)", 4, None),
    ("match, 0 matches a device", 4, "{command_name: noSuchCommand}"),
    ("match, 1 match a device", 4, "{command_name: setPoint42}"),
    ("match, 3 matches a device", 12, "{tsl_identifier: restart}"),
)


def one_case(count: int, commands: int, match: str | None) -> list[str]:
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(count + 10), "--commands", str(commands)) as (url, _),
    ):
        directory = Path(tmp)
        (directory / "d.csv").write_text(
            "asset_id\n" + "".join(f"as{i:06d}\n" for i in range(count))
        )
        rule = f"match: {match}\n" if match else ""
        job = directory / "job.yaml"
        limits = f"limits: {{rate: {RATE}, concurrency: 32}}\n"
        job.write_text(f"version: 1\nname: sel\norg_id: {ORG}\n{rule}{limits}targets_file: d.csv\n")
        _, _, summary = run_worker_timed(job, url, directory / "run")
        calls = sim_json(url, "/_sim/stats")["business_calls"]
    matched = summary.get("commands", {}).get("matched", 0)
    cancelled = summary.get("commands", {}).get("cancelled", 0)
    seconds = summary["duration_s"]
    return [
        f"{matched / count:.2f}",
        f"{cancelled:,}",
        f"{calls / count:.2f}",
        f"{count / seconds:.0f}",
        f"{summary['rate']['achieved']:.0f}/s",
    ]


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rows = [[name, *one_case(count, commands, match)] for name, commands, match in CASES]
    print(f"Machine: {machine()}.\n")
    print(
        table(
            f"Selective cancels at {RATE}/s, {count:,} devices (simulator: 1 in 8 has none)",
            [
                "job",
                "matches per device",
                "commands cancelled",
                "calls per device",
                "devices per s",
                "achieved rate",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
