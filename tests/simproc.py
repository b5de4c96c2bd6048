"""`worker simulate` as a real subprocess on 127.0.0.1, for tests that run `worker` as a process."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.request import Request, urlopen

import orjson

from tests.conftest import APP_KEY, APP_SECRET


@contextmanager
def simulator_process(*extra: str) -> Iterator[str]:
    """Start `worker simulate --port 0 ...`, yield its URL, stop it."""
    command = [
        sys.executable,
        "-m",
        "worker",
        "simulate",
        "--port",
        "0",
        "--app-key",
        APP_KEY,
        *extra,
    ]
    env = {**os.environ, "ENOS_APP_SECRET": APP_SECRET}  # a secret never goes on argv
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert "serving" in line, f"the simulator did not start: {line!r}"
        yield line.split()[-1]
    finally:
        process.terminate()
        process.wait(timeout=10)
        if process.stdout is not None:
            process.stdout.close()


def sim_get(url: str, path: str) -> Any:
    """GET a simulator inspection endpoint."""
    with urlopen(Request(url + path), timeout=5) as response:  # noqa: S310 (loopback only)
        return orjson.loads(response.read())


def sim_post(url: str, path: str, payload: object) -> Any:
    """POST JSON to a simulator control endpoint."""
    request = Request(url + path, data=orjson.dumps(payload), method="POST")  # noqa: S310
    with urlopen(request, timeout=5) as response:  # noqa: S310 (loopback only)
        return orjson.loads(response.read())


def worker_env(**extra: str) -> dict[str, str]:
    """The environment for a `worker` subprocess, with the test credentials."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENOS_")}
    env.update({"ENOS_APP_KEY": APP_KEY, "ENOS_APP_SECRET": APP_SECRET, **extra})
    return env


def run_worker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run `python -m worker ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env=env or worker_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
