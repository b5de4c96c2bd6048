"""Speed when the gateway misbehaves: the rate under random 5xx, after one 429, and rate: auto.

Each scenario runs the real `worker run` against a real `worker simulate` process (pinned to
separate cores) and measures from the run's own audit log (every attempt with its time):

- random 5xx at 10 % and 20 %, at 100 and 400 requests/s: achieved / asked over the time new
  targets were still being admitted (the tail, where only retries are left, is not the rate);
- one 429 at 200/s (the simulator's ``throttle_next``): seconds from the 429 until a full
  one-second window is back at >= 95 % of the asked rate;
- rate: auto against a simulator capped at 300/s with 10 % random 5xx: seconds until the
  answered rate first reaches 90 % of the cap, and the 429 share after that.

    python -m bench.faults
"""

from __future__ import annotations

import bisect
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import orjson

from bench.common import (
    CLIENT_CORE,
    machine,
    pinned,
    run_worker_timed,
    sim_json,
    simulator,
    table,
    worker_env,
    write_targets,
)

SECONDS = 8  # of admission per run
RECOVERED = 0.95
CAP, CONVERGED = 300, 0.9


def attempts(run_dir: Path) -> list[dict[str, Any]]:
    """The attempt records of a run, each with `t`: seconds since the first one."""
    records = [orjson.loads(line) for line in (run_dir / "audit.jsonl").read_bytes().splitlines()]
    found = [r for r in records if r["type"] == "attempt"]
    start = datetime.fromisoformat(found[0]["at"]).timestamp()
    for record in found:
        record["t"] = datetime.fromisoformat(record["at"]).timestamp() - start
    return found


def admission_rate(run_dir: Path) -> float:
    """Requests per second while new targets were still admitted (first to last first try)."""
    found = attempts(run_dir)
    end: float = max(r["t"] for r in found if r["attempt"] == 1)
    return sum(1 for r in found if r["t"] <= end) / end


def random_5xx(error_rate: float, rate: int) -> list[str]:
    """One run at `rate` against a simulator failing `error_rate` of the calls at random."""
    count = rate * SECONDS
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(count + 10), "--error-rate", str(error_rate)) as (url, _),
    ):
        job = write_targets(Path(tmp), count, f"{{rate: {rate}, concurrency: 32, attempts: 10}}")
        _, _, summary = run_worker_timed(job, url, Path(tmp) / "run")
        achieved = admission_rate(Path(tmp) / "run")
    failed = summary["outcomes"]["failed"]
    return [
        f"{error_rate:.0%}",
        f"{rate}/s",
        f"{achieved:.1f}/s",
        f"**{achieved / rate:.3f}**",
        ">= 0.9",
        f"{failed}",
    ]


def one_429(rate: int = 200) -> list[str]:
    """A run at `rate`; once it is under way, the simulator answers exactly one call with 429."""
    count = rate * 14
    with tempfile.TemporaryDirectory() as tmp, simulator("--devices", str(count + 10)) as (url, _):
        job = write_targets(Path(tmp), count, f"{{rate: {rate}, concurrency: 32}}")
        run_dir = Path(tmp) / "run"
        argv = [
            sys.executable,
            "-m",
            "worker",
            "run",
            str(job),
            "--gateway",
            url,
            "--out",
            str(run_dir),
            "--yes",
        ]
        command = pinned(CLIENT_CORE, argv)
        process = subprocess.Popen(
            command, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        _wait_for_results(run_dir, rate * 4, process)
        _post_faults(url, {"throttle_next": 1})
        process.wait(timeout=120)
        found = attempts(run_dir)
    throttled_at = next(r["t"] for r in found if r["http_status"] == 429)
    times = sorted(r["t"] for r in found if r["http_status"] != 429)
    recovered = _first_full_window(times, throttled_at, rate * RECOVERED)
    shown = f"{recovered:.1f} s" if recovered is not None else "never"
    return [f"{rate}/s", "1", f"**{shown}**", "<= 5 s"]


def _first_full_window(times: list[float], after: float, needed: float) -> float | None:
    """Seconds from `after` to the end of the first 1-s window holding >= `needed` requests."""
    start = after
    while start + 1.0 <= times[-1]:
        inside = bisect.bisect_left(times, start + 1.0) - bisect.bisect_left(times, start)
        if inside >= needed:
            return start + 1.0 - after
        start += 0.05
    return None


def auto_against_cap(error_rate: float = 0.1, count: int = 9000) -> list[list[str]]:
    """rate: auto (floor 10/s) against a 300/s cap with random 5xx."""
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator(
            "--devices", str(count + 10), "--rate-cap", str(CAP), "--error-rate", str(error_rate)
        ) as (url, _),
    ):
        job = write_targets(
            Path(tmp), count, "{rate: auto, rate_floor: 10, concurrency: 64, attempts: 10}"
        )
        _, _, summary = run_worker_timed(job, url, Path(tmp) / "run")
        found = attempts(Path(tmp) / "run")
    per_second: dict[int, list[int]] = {}
    for record in found:
        counts = per_second.setdefault(int(record["t"]), [0, 0])
        counts[record["http_status"] == 429] += 1
    converged = next(s for s in sorted(per_second) if per_second[s][0] >= CONVERGED * CAP)
    after = [s for s in per_second if s > converged and s < max(per_second)]
    answered = sum(per_second[s][0] for s in after)
    limited = sum(per_second[s][1] for s in after)
    return [
        [f"time to {CONVERGED:.0%} of the cap", f"**{converged + 1} s**", "<= 10 s"],
        ["429 share after that", f"**{limited / max(1, answered + limited):.2%}**", "< 5 %"],
        [
            "answered rate after that",
            f"{answered / max(1, len(after)):.0f}/s "
            f"({answered / max(1, len(after)) / CAP:.0%} of the cap)",
            "",
        ],
        ["outcome", f"{summary['outcomes']}, exit {summary['exit_code']}", "exit 0"],
    ]


def _wait_for_results(run_dir: Path, lines: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    path = run_dir / "results.jsonl"
    while not path.exists() or path.read_bytes().count(b"\n") < lines:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the run ended or stalled before the 429 could be sent")
        time.sleep(0.05)


def _post_faults(url: str, changes: dict[str, object]) -> None:
    request = Request(url + "/_sim/faults", data=orjson.dumps(changes), method="POST")  # noqa: S310
    with urlopen(request, timeout=10):  # noqa: S310 (loopback only)
        pass
    assert sim_json(url, "/_sim/stats") is not None


def main() -> None:
    print(f"Machine: {machine()}.\n")
    rows = [random_5xx(error, rate) for error in (0.1, 0.2) for rate in (100, 400)]
    header = ["5xx share", "asked", "achieved", "ratio", "goal", "failed targets"]
    print(
        table(
            "Random 5xx: achieved / asked while targets are admitted (concurrency 32)", header, rows
        )
    )
    print(
        table(
            "One 429 at 200/s: back to >= 95 % of the asked rate",
            ["asked", "429s", "recovered after", "goal"],
            [one_429()],
        )
    )
    print(
        table(
            f"rate: auto against a {CAP}/s cap with 10 % random 5xx",
            ["measure", "value", "goal"],
            auto_against_cap(),
        )
    )


if __name__ == "__main__":
    main()
