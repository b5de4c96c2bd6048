"""The spool's directories and what the watcher does to them: open, list, claim, settle.

Several users (and several watchers) may share a spool, so every operation here expects the
directory to change under it: a file listed may be gone by the time it is looked at (another
watcher claimed it), a name the watcher is about to write may already be a planted symbolic
link. Files are only ever renamed into place, never opened by a name someone else could have
made first.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

import anyio
import orjson
import structlog

from worker.errors import ExitCode, UsageError
from worker.store.appendlog import iso
from worker.store.layout import RunDir, read_manifest, read_summary

log = structlog.get_logger("worker.watch")
SPOOL_DIRS = ("incoming", "running", "runs", "done", "failed")
JOB_SUFFIXES = (".yaml", ".yml")
NOTE_MODE = 0o644  # exit records and error files: the spool's users read why their job failed


class JobRefused(UsageError):
    """A spooled job the watcher will not run. The message is made by the watcher from the
    field, the path and the problem only, never from a file's content, so it goes to the
    error file as it is."""


def open_spool(spool: Path, *, create: bool) -> None:
    """Check the spool and make its missing subfolders. A spool that does not exist is a
    mistyped path unless `create` says otherwise; a subfolder that is a symbolic link would
    send the watcher's writes elsewhere, so it is refused."""
    if not spool.exists():
        if not create:
            raise UsageError(
                f"the spool {spool} does not exist; check the path, or pass --create to make it"
            )
        try:
            spool.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot make the spool {spool}: {exc.strerror}") from None
    if not spool.is_dir():
        raise UsageError(f"the spool {spool} is not a directory")
    for name in SPOOL_DIRS:
        folder = spool / name
        try:
            folder.mkdir(exist_ok=True)
            is_dir = stat.S_ISDIR(folder.lstat().st_mode)
        except OSError as exc:
            raise UsageError(f"cannot make {folder}: {exc.strerror}") from None
        if not is_dir:
            raise UsageError(f"{folder} is not a directory (a symbolic link?); make it one")


def _job_entries(folder: Path) -> list[os.DirEntry[str]]:
    """The job files of a spool folder by name; symbolic links too (they are refused when
    run, not left to pile up). No stat: the directory's own record of each entry is used."""
    with os.scandir(folder) as listing:
        return [
            entry
            for entry in listing
            if entry.name.endswith(JOB_SUFFIXES)
            and not entry.name.startswith(".")
            and (entry.is_file(follow_symlinks=False) or entry.is_symlink())
        ]


def waiting(spool: Path, quiet_s: float = 0.0) -> list[str]:
    """Job files in incoming/, oldest first; with `quiet_s`, only those unchanged for that
    long (a producer that writes in place must not have half a job claimed: a cut-off YAML
    list can still parse, as a shorter job). A file gone before it is looked at (another
    watcher claimed it) is skipped."""
    now = time.time()
    found: list[tuple[float, str]] = []
    for entry in _job_entries(spool / "incoming"):
        try:
            changed = entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        if now - changed >= quiet_s:
            found.append((changed, entry.name))
    return [name for _, name in sorted(found)]


def claimed_files(spool: Path) -> Iterator[Path]:
    """Job files in running/ (some run by live watchers, some left by a dead one)."""
    for entry in sorted(_job_entries(spool / "running"), key=lambda e: e.name):
        yield Path(entry.path)


def claim(spool: Path, name: str) -> Path | None:
    """Move incoming/NAME to running/ under a unique name; None if another watcher took it."""
    stem = Path(name).stem
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    claimed = spool / "running" / f"{stem}.{stamp}-{secrets.token_hex(3)}{Path(name).suffix}"
    try:
        os.rename(spool / "incoming" / name, claimed)
    except FileNotFoundError:
        return None
    log.info("worker.job_claimed", job=name, as_=claimed.name)
    return claimed


def run_dir_of(job_file: Path) -> RunDir:
    """The run directory of a claimed job file: SPOOL/runs/<its name without the suffix>."""
    return RunDir(job_file.parent.parent / "runs" / job_file.stem)


def make_run_dir(job_file: Path) -> RunDir:
    """The job's run directory, made when missing. One that exists must be a real directory
    of this watcher's user: a symbolic link would put the run's files wherever it points, and
    a directory someone else made (before the claim, or in the moment after it) is theirs to
    fill with links. Watchers sharing a spool run as one user."""
    run = run_dir_of(job_file)
    where = f"runs/{run.path.name}"
    try:
        run.path.mkdir(exist_ok=True)
        info = run.path.lstat()
    except OSError as exc:
        raise JobRefused(
            f"{job_file}: cannot make its run directory {where}: {exc.strerror}"
        ) from None
    if not stat.S_ISDIR(info.st_mode):
        raise JobRefused(
            f"{job_file}: its run directory {where} is not a directory (a symbolic link?); "
            "nothing was written there. Remove it, then drop the job in again"
        )
    if info.st_uid != os.geteuid():
        raise JobRefused(
            f"{job_file}: its run directory {where} belongs to another user (uid "
            f"{info.st_uid}), not to this watcher; nothing was written there. Remove it, then "
            "drop the job in again"
        )
    return run


@dataclass(frozen=True)
class Settled:
    """Where a job went, and what its exit record says."""

    job: str  # the claimed name
    exit_code: int
    finished: bool  # every target reached a final outcome: done/; else failed/
    path: Path


def settle(job_file: Path, code: int, *, finished: bool, error: str | None = None) -> Settled:
    """Move a claimed job to done/ (finished) or failed/, its exit record (and error file)
    written beside it first: a crash in between leaves it in running/, where it is resumed.
    `error` must hold no file content (error files are read by the spool's other users)."""
    spool = job_file.parent.parent
    where = spool / ("done" if finished else "failed")
    record: dict[str, object] = {
        "exit_code": int(code),
        "finished": finished,
        "run_dir": str(run_dir_of(job_file)),
        "at": iso(time.time()),
    }
    if error is not None:
        record["error"] = error
        _place(where, f"{job_file.name}.error.txt", error.encode() + b"\n")
    _place(where, f"{job_file.name}.exit.json", orjson.dumps(record) + b"\n")
    os.rename(job_file, where / job_file.name)
    log.info("worker.job_settled", job=job_file.name, exit_code=int(code), to=where.name)
    return Settled(job_file.name, int(code), finished, where / job_file.name)


def _place(folder: Path, name: str, data: bytes) -> None:
    """Write a new file under a random name nobody can have planted (O_EXCL, no symlink
    followed), then rename it over `name`: a symbolic link planted there is replaced, never
    written through."""
    temporary = folder / f".{name}.{secrets.token_hex(4)}.tmp"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(temporary, flags, NOTE_MODE)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
        os.replace(temporary, folder / name)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


class Unfinished(NamedTuple):
    """Why a run did not finish: our own account of it, and the stop message it recorded
    (which may quote anything: a gateway's text, an exception)."""

    what: str
    message: str


def unfinished(run: RunDir, code: int) -> Unfinished | None:
    """Why the run in `run` did not finish; None when it did: its last segment ended because
    every target was done (exit 0 or 1) and its summary leaves none without an outcome."""
    try:
        segment = read_manifest(run).segments[-1]
        summary = read_summary(run)
    except (UsageError, OSError, ValueError, KeyError, TypeError, IndexError):
        return Unfinished(f"the records of {run} cannot be read", "")
    if summary is None:
        return Unfinished(f"{run} holds no summary", "")
    finished = code in (ExitCode.OK, ExitCode.FAILED) and segment.reason == "finished"
    if finished and summary.not_attempted == 0:
        return None
    what = (
        f"its segment ended ({segment.reason or 'no reason recorded'}, exit {code}) with "
        f"{summary.not_attempted} of {summary.targets} targets without a final outcome"
    )
    return Unfinished(what, segment.message)


class Slot:
    """A claimed job's place among the watcher's --jobs (a JobSlot): lent while its run waits
    for its window or a promotion, so that another job may run meanwhile."""

    def __init__(self, slots: anyio.Semaphore) -> None:
        self._slots = slots
        self.lent = False

    def lend(self) -> None:
        """The run waits: its place goes to another job."""
        self._slots.release()
        self.lent = True

    async def take_back(self) -> None:
        """The run goes on: wait for a place."""
        await self._slots.acquire()
        self.lent = False

    def give_up(self) -> None:
        """The job has ended: its place (unless lent when it ended) is free."""
        if not self.lent:
            self._slots.release()
