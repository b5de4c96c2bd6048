"""A spooled job's window (``window:``), as the watcher sees it: a job is claimed, or resumed,
only while its window is open, so that a job waiting for its window holds no job slot; a job
whose window has ended for good is claimed and refused (exit 2) with why; a run stopped at its
window's close waits in running/ for the next opening, which its summary names.

A job file in incoming/ is read here before its claim (a link refused, as after a claim) only
to learn its window, once per version of the file. One that cannot be read is claimed at once,
so that the watcher's usual checks refuse it with their own message.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from worker.app.spoolcheck import check_job_file
from worker.core.ports import StopReason
from worker.errors import UsageError, WorkerError
from worker.jobparts import Window
from worker.jobs.parse import load_job
from worker.jobs.window import describe, next_open, opens_next, utc_text
from worker.model import Job
from worker.store.layout import RunDir, read_summary

Version = tuple[int, int, int]  # inode, mtime (ns), size: a new version of a job file


class Waiting:
    """The windows of the job files waiting in incoming/."""

    def __init__(self) -> None:
        self._read: dict[str, tuple[Version, Window | None]] = {}

    def opens_at(self, job_file: Path, now: float) -> float | None:
        """When the job file's window opens next (epoch s; `now` when it is open, when the job
        has none, or when the file cannot be read); None when it never opens again."""
        try:
            seen = job_file.lstat()
        except OSError:
            return now  # gone: the claim finds out
        version = (seen.st_ino, seen.st_mtime_ns, seen.st_size)
        known = self._read.get(job_file.name)
        if known is None or known[0] != version:
            known = self._read[job_file.name] = (version, _window_of(job_file))
        return opens_next(known[1], now)

    def claimable(self, incoming: Path, names: list[str], now: float) -> list[str]:
        """Of the job files `names` waiting in `incoming`, those that may be claimed now: open,
        no window, or a window ended for good (refused once claimed)."""
        found = []
        for name in names:
            opens = self.opens_at(incoming / name, now)
            if opens is None or opens <= now:
                found.append(name)
        return found

    def keep_only(self, names: list[str]) -> None:
        """Drop what is known of files no longer waiting (claimed, or taken away)."""
        for gone in set(self._read) - set(names):
            del self._read[gone]


def _window_of(job_file: Path) -> Window | None:
    try:
        check_job_file(job_file)
        return load_job(job_file).window
    except (WorkerError, OSError):
        return None  # claimed, then refused by the usual checks with their message


def check_window(job: Job, now: float) -> None:
    """Refuse (UsageError, exit 2, nothing sent) a job whose window never opens again."""
    if job.window is not None and next_open(job, now) is None:
        raise UsageError(
            f"{job.path}: its window has ended ({describe(job.window)}; it never opens again "
            f"after {utc_text(now)}); nothing was sent. Give it a window that is still to come"
        )


def closed(run: RunDir, now: float) -> bool:
    """Whether a run stopped at its window's close and the window has not opened again: its
    job waits in running/ until then."""
    opens = reopens_at(run)
    return opens is not None and now < opens


def reopens_at(run: RunDir) -> float | None:
    """When a run stopped at its window's close may go on (epoch s, from its summary's next
    opening); None when it did not stop there, or its window never opens again."""
    summary = read_summary(run) if run.summary.exists() else None
    if summary is None or summary.stopped != StopReason.WINDOW.value:
        return None
    opening = summary.window.get("opens_at")
    if not opening:
        return None
    return datetime.fromisoformat(opening.replace("Z", "+00:00")).timestamp()
