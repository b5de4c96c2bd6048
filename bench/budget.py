"""(h) The gateway's budget: `worker run` against a simulator counting quota windows.

Three runs, each against its own `worker simulate --quota ...` process:

1. **headers**: windows second=100, minute=5000 stated in X-RateLimit-* headers, `--rate 400`
   (above the binding 83.3/s). Started just after a UTC minute turns; the calls the gateway
   admitted in the three whole minutes that follow, against the 15,000 the budget allows;
   429s per window.
2. **no headers**: the same windows, no budget headers (Retry-After still the rest of the
   window), `--rate auto`.
3. **day quota**: second=100, minute=5000 and a "day" of 3,000 shortened to 120 s (X-RateLimit
   headers say Day; the worker takes it for the UTC day), 4,000 targets: the day is spent
   mid-run, the run ends with exit 4 and no failed target; after the simulator's day turns,
   `--resume` finishes the rest.

Counts come from the run's audit log (every attempt with its time and HTTP status) and from the
simulator's own stats (`quota_refused`).

    python -m bench.budget                 # all three (about 10 minutes)
    python -m bench.budget headers         # any of: headers, no-headers, day, ietf
"""

from __future__ import annotations

import bisect
import math
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson

from bench.common import (
    machine,
    run_worker,
    sim_json,
    simulator,
    table,
    write_targets,
)

WINDOWS = "second=100,minute=5000"
BINDING = 5000 / 60  # requests/s: the minute binds
MINUTES = 3


def attempts(run_dir: Path) -> list[tuple[float, int | None]]:
    """(epoch s, HTTP status) of every attempt in the run's audit log."""
    found = []
    for line in (run_dir / "audit.jsonl").read_bytes().splitlines():
        record = orjson.loads(line)
        if record["type"] == "attempt":
            found.append((datetime.fromisoformat(record["at"]).timestamp(), record["http_status"]))
    return found


def wait_for_boundary(length: float, within: float = 1.0) -> float:
    """Sleep until just after the next multiple of `length` epoch seconds; returns it."""
    boundary = (math.floor(time.time() / length) + 1) * length
    time.sleep(max(0.0, boundary - time.time() + 0.05))
    assert time.time() - boundary < within
    return boundary


def refusals_per_window(seen: list[tuple[float, int | None]]) -> tuple[int, int]:
    """The most 429s refused by one second window and by one minute window: a 429 is the
    minute's when 5,000 calls of its UTC minute had been admitted before it, else the
    second's (the audit's times are the client's, within a millisecond of the simulator's)."""
    admitted = sorted(at for at, status in seen if status != 429)
    per_second: Counter[int] = Counter()
    per_minute: Counter[int] = Counter()
    for at in (at for at, status in seen if status == 429):
        minute = math.floor(at / 60) * 60
        before = bisect.bisect_left(admitted, at) - bisect.bisect_left(admitted, minute)
        if before >= 5000:
            per_minute[int(minute)] += 1
        else:
            per_second[int(at)] += 1
    return max(per_second.values(), default=0), max(per_minute.values(), default=0)


def paced(tmp: Path, name: str, headers: str, rate: str) -> list[list[str]]:
    """Scenarios 1 and 2: admitted calls in the three whole minutes after the start."""
    count = int(BINDING * 60 * MINUTES * 1.04)
    with simulator(
        "--devices", str(count + 10), "--quota", WINDOWS, "--quota-headers", headers
    ) as (url, _):
        job = write_targets(tmp / name, count, "{concurrency: 16}", name=name)
        start = wait_for_boundary(60.0)
        code, summary = run_worker(
            job, url, tmp / name / "run", "--no-progress", "--rate", rate, ok=(0, 4)
        )
        stats = sim_json(url, "/_sim/stats")
    seen = attempts(tmp / name / "run")
    admitted = sum(1 for at, s in seen if s != 429 and start <= at < start + 60 * MINUTES)
    worst_second, worst_minute = refusals_per_window(seen)
    allowed = int(BINDING * 60 * MINUTES)
    return [
        [
            name,
            f"--rate {rate}",
            f"{admitted:,} of {allowed:,}",
            f"{admitted / allowed:.3f}",
            f"{stats['quota_refused']}",
            f"{worst_second} / {worst_minute}",
            f"{summary['outcomes']['failed']}",
            str(code),
        ],
    ]


def day_quota(tmp: Path) -> list[list[str]]:
    """Scenario 3: a day spent mid-run (exit 4, nothing failed), resumed once it turns."""
    length, day, count = 120.0, 3000, 4000
    quota = f"{WINDOWS},day={day}/{length:g}"
    with simulator("--devices", str(count + 10), "--quota", quota) as (url, _):
        job = write_targets(tmp / "day", count, "{concurrency: 16}", name="day")
        run_dir = tmp / "day" / "run"
        wait_for_boundary(length)
        began = time.time()
        first, summary = run_worker(job, url, run_dir, "--no-progress", "--rate", "400", ok=(0, 4))
        stopped = time.time() - began
        turned = wait_for_boundary(length, within=length)
        second, resumed = run_worker(
            job, url, run_dir, "--no-progress", "--resume", str(run_dir), ok=(0, 4)
        )
        stats = sim_json(url, "/_sim/stats")
    lines = (run_dir / "results.jsonl").read_bytes().splitlines()
    outcomes = Counter(orjson.loads(line)["outcome"] for line in lines)
    return [
        [
            "first segment",
            f"exit {first}, {summary['outcomes']['failed']} failed, "
            f"{count - summary['not_attempted']:,} done in {stopped:.0f} s; stopped: "
            f"{summary.get('stop_message', '')[:160]}",
            "exit 4, 0 failed",
        ],
        [
            "resume (after the simulator's day turned at "
            f"{datetime.fromtimestamp(turned).strftime('%H:%M:%S')})",
            f"exit {second}, {resumed['outcomes']['failed']} failed",
            "exit 0, 0 failed",
        ],
        ["all targets", f"{len(lines):,} results: {dict(outcomes)}", f"{count:,}, none failed"],
        ["quota refusals at the simulator", str(stats["quota_refused"]), ""],
    ]


def main() -> None:
    chosen = set(sys.argv[1:]) or {"headers", "no-headers", "day"}
    print(f"Machine: {machine()}.\n")
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        rows: list[list[str]] = []
        if "headers" in chosen:
            rows += paced(tmp, "headers", "x-ratelimit", "400")
        if "no-headers" in chosen:
            rows += paced(tmp, "no-headers", "none", "auto")
        if "ietf" in chosen:  # not in the default set: the IETF headers alone
            rows += paced(tmp, "ietf", "ietf", "400")
        if rows:
            print(
                table(
                    f"{WINDOWS} (binding {BINDING:.1f}/s), {MINUTES} whole UTC minutes",
                    [
                        "budget headers",
                        "rate",
                        "admitted in the minutes",
                        "of the budget",
                        "429s (simulator)",
                        "most 429s from one second / minute window",
                        "failed",
                        "exit",
                    ],
                    rows,
                )
            )
        if "day" in chosen:
            print(
                table(
                    "A day quota (3,000 calls, a 120-s 'day') spent mid-run, then resumed",
                    ["step", "result", "goal"],
                    day_quota(tmp),
                )
            )


if __name__ == "__main__":
    main()
