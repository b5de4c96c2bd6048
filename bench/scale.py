"""(c) 1,000,000 streamed targets: time to the first request, peak RSS, validate time.

Runs `worker validate` and `worker run` (unlimited rate) on a 1,000,000-row CSV against the
simulator, then `--resume` on the finished run (a done-set of 1,000,000 digests). Peak RSS is
the kernel's (`/usr/bin/time -v`); the first request is the simulator's first arrival, on the
same monotonic clock as the start of the `worker` process.

    python -m bench.scale              # 1,000,000 targets (about 4 minutes)
    python -m bench.scale 100000       # a smaller fleet
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    CLIENT_CORE,
    machine,
    pinned,
    sim_json,
    simulator,
    table,
    worker_env,
    write_targets,
)


def timed(*args: str) -> tuple[float, int, float, subprocess.CompletedProcess[str]]:
    """Run `worker ARGS` under /usr/bin/time -v: (start, peak RSS MB, wall s, process)."""
    command = ["/usr/bin/time", "-v", *pinned(CLIENT_CORE, [sys.executable, "-m", "worker", *args])]
    started = time.monotonic()
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, check=False)
    wall = time.monotonic() - started
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    rss_mb = int(match.group(1)) // 1024 if match else -1
    return started, rss_mb, wall, done


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 1_000_000
    with tempfile.TemporaryDirectory() as tmp:
        job = write_targets(Path(tmp), count, "{rate: unlimited, concurrency: 64}")
        _, validate_rss, validate_s, done = timed("validate", str(job))
        assert done.returncode == 0, done.stderr
        with simulator("--devices", str(count + 10)) as (url, _):
            out = Path(tmp) / "run"
            started, run_rss, run_s, done = timed(
                "run", str(job), "--gateway", url, "--out", str(out), "--yes"
            )
            assert done.returncode == 0, done.stderr[-2000:]
            first = min(sim_json(url, "/_sim/arrivals")[:1000])
            _, resume_rss, resume_s, done = timed("run", str(job), "--resume", str(out), "--yes")
            assert done.returncode == 0, done.stderr[-2000:]
    print(f"Machine: {machine()}.\n")
    print(
        table(
            f"{count:,} targets from a CSV targets file",
            ["measure", "value", "goal"],
            [
                ["worker validate: wall time", f"{validate_s:.2f} s", "< 10 s"],
                ["worker validate: peak RSS", f"{validate_rss} MB", "< 300 MB"],
                ["worker run: first request after start", f"{first - started:.2f} s", "< 2 s"],
                ["worker run: peak RSS, whole run", f"{run_rss} MB", "< 300 MB"],
                ["worker run: wall time (unlimited rate)", f"{run_s:.0f} s", ""],
                ["--resume of the finished run: peak RSS", f"{resume_rss} MB", "< 300 MB"],
                ["--resume of the finished run: wall time", f"{resume_s:.1f} s", ""],
            ],
        )
    )


if __name__ == "__main__":
    main()
