"""What to do next, in words an operator can paste: the one place a resume command is made."""

from __future__ import annotations

from worker.store.layout import RunDir


def resume_command(job: str, run: RunDir, *, retry_failed: bool = False) -> str:
    """The command that continues the run in `run` (of the job file `job`)."""
    flag = " --retry-failed" if retry_failed else ""
    return f"worker run {job} --resume {run}{flag}"
