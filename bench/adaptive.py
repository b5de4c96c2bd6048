"""(d) `rate: auto` against a gateway capped at 300 requests/s (HTTP 429 above it).

From the run's own audit log (every attempt with its time and HTTP status): the time until the
accepted rate first reaches 90 % of the cap (convergence), and after that the share of 429s and
the accepted rate as a share of the cap.

    python -m bench.adaptive            # cap 300/s, 10,000 targets
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson

from bench.common import machine, run_worker_timed, simulator, table, write_targets

CAP = 300
CONVERGED_SHARE = 0.9


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
    with (
        tempfile.TemporaryDirectory() as tmp,
        simulator("--devices", str(count + 10), "--rate-cap", str(CAP)) as (url, _),
    ):
        job = write_targets(Path(tmp), count, "{rate: auto, rate_floor: 10, concurrency: 64}")
        out = Path(tmp) / "run"
        _, _, summary = run_worker_timed(job, url, out)
        records = [orjson.loads(line) for line in (out / "audit.jsonl").read_bytes().splitlines()]
    start = datetime.fromisoformat(records[0]["at"]).timestamp()
    ok: Counter[int] = Counter()
    limited: Counter[int] = Counter()
    for record in records:
        if record["type"] != "attempt":
            continue
        second = int(datetime.fromisoformat(record["at"]).timestamp() - start)
        (limited if record["http_status"] == 429 else ok)[second] += 1
    converged = next(s for s in sorted(ok) if ok[s] >= CONVERGED_SHARE * CAP)
    after = [s for s in ok if s > converged]
    accepted = sum(ok[s] for s in after)
    throttled = sum(limited[s] for s in limited if s > converged)
    seconds = max(after) - converged if after else 1
    print(f"Machine: {machine()}.\n")
    print(
        table(
            f"rate: auto (floor 10/s) against a simulator capped at {CAP}/s, {count:,} targets",
            ["measure", "value", "goal"],
            [
                [f"time to reach {CONVERGED_SHARE:.0%} of the cap", f"{converged + 1} s", "< 10 s"],
                [
                    "429 share after convergence",
                    f"{throttled / max(1, accepted + throttled):.2%}",
                    "< 5 %",
                ],
                [
                    "accepted rate after convergence",
                    f"{accepted / seconds:.0f}/s ({accepted / seconds / CAP:.0%} of the cap)",
                    "",
                ],
                ["outcome", f"{summary['outcomes']}, exit {summary['exit_code']}", "exit 0"],
            ],
        )
    )


if __name__ == "__main__":
    main()
