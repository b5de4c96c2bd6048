"""Shared pieces of the benchmarks: a pinned simulator process, job files, timing helpers.

Every benchmark runs the real `worker` program and the real simulator as separate processes on
127.0.0.1; the simulator is pinned to the last core and the client to the first, as in
the project's measurements (docs/performance.md), so they do not steal each other's CPU.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.request import Request, urlopen

import orjson

APP_KEY, APP_SECRET = "bench-app", "bench-secret-0123456789"
ORG = "o15541858646501"
CORES = os.cpu_count() or 1
CLIENT_CORE, SERVER_CORE = "0", str(CORES - 1)


def pinned(core: str, command: list[str]) -> list[str]:
    """Prefix a command with taskset when there is more than one core."""
    return ["taskset", "-c", core, *command] if CORES > 1 else command


@contextmanager
def simulator(*extra: str) -> Iterator[tuple[str, int]]:
    """A `worker simulate` process pinned to its own core; yields (url, pid)."""
    command = pinned(
        SERVER_CORE,
        [sys.executable, "-m", "worker", "simulate", "--port", "0", "--app-key", APP_KEY, *extra],
    )
    env = {**os.environ, "ENOS_APP_SECRET": APP_SECRET}  # a secret never goes on argv
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        yield line.split()[-1], process.pid
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def sim_json(url: str, path: str) -> Any:
    """GET a simulator inspection endpoint."""
    with urlopen(Request(url + path), timeout=30) as response:  # noqa: S310 (loopback)
        return orjson.loads(response.read())


def process_cpu_s(pid: int) -> float:
    """User+system CPU seconds used so far by a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def write_targets(
    directory: Path, count: int, limits: str, name: str = "bench", first: int = 0
) -> Path:
    """A job over generated devices as{first}.. (a CSV targets file) with the given limits."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"as{i:06d}\n" for i in range(first, first + count))
    (directory / f"{name}.csv").write_text("asset_id\n" + rows)
    job = directory / f"{name}.yaml"
    job.write_text(
        f"version: 1\nname: {name}\norg_id: {ORG}\nlimits: {limits}\ntargets_file: {name}.csv\n"
    )
    return job


def worker_env() -> dict[str, str]:
    """The environment for a `worker` process: the bench credentials, JSON logs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENOS_")}
    env.update({"ENOS_APP_KEY": APP_KEY, "ENOS_APP_SECRET": APP_SECRET})
    return env


def run_args(job: Path, url: str, out: Path, *flags: str) -> list[str]:
    """The arguments of `worker run` for a bench: the job against `url`, into `out`, unasked."""
    return ["run", str(job), "--gateway", url, "--out", str(out), "--yes", *flags]


def run_worker(
    job: Path, url: str, out: Path, *flags: str, ok: tuple[int, ...] = (0,)
) -> tuple[int, dict[str, Any]]:
    """`worker run` pinned to the client core; (exit code, summary.json). RuntimeError (with the
    end of its stderr) when it exits with a code not in `ok`."""
    arguments = run_args(job, url, out, *flags)
    command = pinned(CLIENT_CORE, [sys.executable, "-m", "worker", *arguments])
    done = subprocess.run(command, env=worker_env(), capture_output=True, text=True, check=False)
    if done.returncode not in ok:
        raise RuntimeError(f"worker exited {done.returncode}: {done.stderr[-2000:]}")
    return done.returncode, orjson.loads((out / "summary.json").read_bytes())


def run_worker_timed(
    job: Path, url: str, out: Path, *flags: str
) -> tuple[float, float, dict[str, Any]]:
    """Run `worker run` pinned to the client core; returns (wall s, CPU s, summary)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    _, summary = run_worker(job, url, out, *flags)
    wall = time.perf_counter() - began
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, summary


def table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table with a title line."""
    lines = [
        f"### {title}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def machine() -> str:
    """One line describing the machine the numbers come from."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{CORES} cores ({model}), Python {sys.version.split()[0]}"
