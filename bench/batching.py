"""Many assets per call: devices cleared per second at a gateway capped at 40 requests/s (429 with
Retry-After above the cap), one asset per call against 25, for each list behaviour the
simulator can show. Every case is checked: every target has one line, none failed, and no
cached command is left on any device.

Gateways cap requests, not devices, so lists multiply devices/s by up to N once they are
trusted. The first seconds of a run are the trial (a few lists, each verified by searching its
assets after the 2 s settle delay, while the rest goes one per call), so a longer run shows
more of the gain. A gateway without lists (off) costs the trial's bisections and then runs
one per call; one that ignores part of a list (first) is caught by the trial.

    python -m bench.batching            # 800 devices one per call, 20,000 with lists
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import machine, run_worker_timed, sim_json, simulator, table, write_targets

CAP = 40  # requests per second the simulated gateway allows


def one_case(mode: str, per_call: int, count: int) -> dict[str, Any]:
    """Run one job; return its devices/s, calls, and whether every target came out right."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator(
            "--devices",
            str(count),
            "--commands",
            "2",
            "--rate-cap",
            str(CAP),
            "--multi-asset",
            mode,
        ) as (url, _),
    ):
        job = write_targets(Path(tmp), count, f"{{rate: {CAP}, concurrency: 16}}")
        _, _, summary = run_worker_timed(
            job, url, Path(tmp) / "run", "--assets-per-call", str(per_call)
        )
        stats = sim_json(url, "/_sim/stats")
        devices = sim_json(url, "/_sim/devices")
    left = sum(state == 1 for device in devices for state in device["commands"].values())
    outcomes = summary["outcomes"]
    right = (
        summary["not_attempted"] == 0
        and outcomes["failed"] == 0
        and left == 0
        and len(devices) == count
        and sum(outcomes.values()) == count
    )
    return {
        "devices_per_s": count / summary["duration_s"],
        "calls": stats["by_action"].get("cancel", 0) + stats["by_action"].get("search", 0),
        "throttled": stats["by_status"].get("429", 0),
        "count": count,
        "right": right,
        "trust": summary.get("batching", {}).get("trust", "-"),
    }


def main() -> None:
    small = int(sys.argv[1]) if len(sys.argv) > 1 else 800
    large = int(sys.argv[2]) if len(sys.argv) > 2 else 20_000
    single = one_case("strict", 1, small)
    rows = [_row("any", 1, single, single)]
    for mode, count in (("strict", large), ("lenient", large), ("off", small), ("first", small)):
        rows.append(_row(mode, 25, one_case(mode, 25, count), single))
    print(f"Machine: {machine()}.\n")
    print(
        table(
            f"Devices cleared per second at a gateway capped at {CAP} requests/s",
            [
                "lists (simulator)",
                "assets per call",
                "devices",
                "devices per s",
                "x one per call",
                "calls per device",
                "429s",
                "lists ended",
                "all right",
            ],
            rows,
        )
    )


def _row(mode: str, per_call: int, case: dict[str, Any], single: dict[str, Any]) -> list[str]:
    per_device = case["calls"] / case["count"]
    return [
        mode,
        str(per_call),
        f"{case['count']:,}",
        f"{case['devices_per_s']:.0f}",
        f"{case['devices_per_s'] / single['devices_per_s']:.1f}x",
        f"{per_device:.3f} ({per_device / (single['calls'] / single['count']):.2f}x)",
        str(case["throttled"]),
        case["trust"],
        "yes" if case["right"] else "NO",
    ]


if __name__ == "__main__":
    main()
