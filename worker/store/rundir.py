"""The run directory: its file names, the lock, the manifest, the done set, the admission mark.

::

    run.json        the manifest (job and target hashes, limits, segments), replaced atomically
    run.lock        flock'ed by the worker running the directory (released by the kernel)
    results.jsonl   the journal: one final line per target (worker.store.journal)
    audit.jsonl     every attempt, hash-chained (worker.store.audit)
    admitted        the admission high-water mark: every target at or below it may have been sent
    summary.json    the whole run's summary, replaced atomically
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from worker.errors import UsageError
from worker.model import Outcome, gc_paused, key_digest
from worker.store.appendlog import SyncedFile
from worker.store.journal import RESULTS_FILE, JournalCursor, read_journal, record_key
from worker.store.state import Manifest, Summary

MANIFEST_FILE = "run.json"
LOCK_FILE = "run.lock"
ADMITTED_FILE = "admitted"
SUMMARY_FILE = "summary.json"
_MARK_WIDTH = 20


def write_atomically(path: Path, data: bytes) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old or the new file,
    never half of one: write beside it, fsync, rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def read_manifest(run_dir: Path) -> Manifest:
    """The run's manifest (run.json); UsageError if the directory holds no readable one."""
    try:
        return Manifest.from_json(orjson.loads((run_dir / MANIFEST_FILE).read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{run_dir} is not a run directory (no readable run.json)") from None


def write_manifest(run_dir: Path, manifest: Manifest) -> None:
    """Replace run.json atomically."""
    data = orjson.dumps(manifest.to_json(), option=orjson.OPT_INDENT_2)
    write_atomically(run_dir / MANIFEST_FILE, data)


VERIFY_COUNTS_FILE = "verify.json"  # the last verify sweep's counts (worker.app.sweep)


def read_verify_counts(run_dir: Path) -> dict[str, Any]:
    """verify.json's counts ({} before any sweep)."""
    path = run_dir / VERIFY_COUNTS_FILE
    if not path.exists():
        return {}
    loaded: dict[str, Any] = orjson.loads(path.read_bytes())
    return loaded


def write_summary(run_dir: Path, summary: Summary) -> None:
    """Replace summary.json atomically."""
    data = orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2)
    write_atomically(run_dir / SUMMARY_FILE, data)


@contextmanager
def run_dir_lock(run_dir: Path) -> Iterator[None]:
    """Hold the run directory for this process: two workers appending to one journal would
    break the one-line-per-target rule. The kernel drops the lock if the process dies."""
    fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise UsageError(
            f"{run_dir} is in use by another worker (pid {holder}); wait for it to end, or stop "
            "it (Ctrl-C / SIGTERM) and resume"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


@dataclass
class Finished:
    """What the journal says before a segment starts."""

    done: set[int] = field(default_factory=set)  # digests of targets final (and not retried)
    retried_maybe_applied: set[int] = field(default_factory=set)  # --retry-failed, effect unknown

    def take(self, digest: int, flags: int, *, retry_failed: bool) -> None:
        """One journal line, in journal order (its `line_flags`): final, or to run again."""
        if retry_failed and flags & FAILED:
            self.done.discard(digest)
            if flags & MAYBE_APPLIED:
                self.retried_maybe_applied.add(digest)
            return
        self.done.add(digest)


FAILED, MAYBE_APPLIED = 1, 2  # a journal line's flags: failed; and its effect may be there


def line_flags(record: dict[str, Any]) -> int:
    """What the done set needs of a journal line beside its digest: failed, and whether that
    failure may have taken effect (a lost answer, a 5xx)."""
    if record.get("outcome") != Outcome.FAILED:
        return 0
    maybe = record.get("effect_unknown") or record.get("code") in (None, 99500)
    return FAILED | (MAYBE_APPLIED if maybe else 0)


def finished_targets(
    run_dir: Path,
    *,
    retry_failed: bool,
    cursor: JournalCursor | None = None,
    visit: Callable[[dict[str, Any], int, int], None] | None = None,
    found: Finished | None = None,
) -> Finished:
    """Digests of the targets already final in the journal (failed ones too, unless retried).

    A failed target that is retried and whose failure may have taken effect (a lost answer,
    a 5xx) is remembered: if its retry finds nothing, that is `effect_unknown`. `visit` sees
    every record too (with its digest and flags), and `cursor` ends past the last one (the
    summary's counts ride along). `found`: what a checkpoint gave for the lines before it.
    """
    found = found or Finished()
    with gc_paused():
        for record in read_journal(run_dir / RESULTS_FILE, cursor):
            digest, flags = key_digest(record_key(record)), line_flags(record)
            if visit is not None:
                visit(record, digest, flags)
            found.take(digest, flags, retry_failed=retry_failed)
    return found


class AdmissionMark(SyncedFile):
    """The crash-truth high-water mark: the highest ordinal that may have been sent.

    Targets are admitted in order from one iterator, so one number marks every target that
    may have been in flight (or waiting for a retry) when a segment ended or died. It is
    written ahead, `ahead` ordinals at a time (one small ``pwrite`` per `ahead` targets), before
    any of them is sent; it only ever grows. A target at or below the mark of an earlier
    segment that has no result may have been cancelled by a call whose answer was never read.
    """

    def __init__(self, run_dir: Path, *, ahead: int, earlier_segments: bool) -> None:
        path = run_dir / ADMITTED_FILE
        existed = path.exists()
        super().__init__(path, os.O_RDWR)
        self._ahead = max(1, ahead)
        self.earlier = self._read() if existed else (sys.maxsize if earlier_segments else -1)
        self._written = self.earlier

    def _read(self) -> int:
        raw = os.pread(self._fd, _MARK_WIDTH + 1, 0)
        if not raw:
            return -1  # created, but nothing was admitted (the run stopped before a target)
        try:
            return int(raw)
        except ValueError:
            return sys.maxsize  # unreadable: assume every target may have been sent

    def sent_before(self, ordinal: int) -> bool:
        """Whether an earlier segment may have sent target `ordinal`."""
        return ordinal <= self.earlier

    def admit(self, ordinal: int) -> None:
        """Target `ordinal` is about to be sent: make sure the mark covers it."""
        if ordinal > self._written:
            self._written = ordinal + self._ahead - 1
            os.pwrite(self._fd, b"%0*d\n" % (_MARK_WIDTH, self._written), 0)
            self.unsynced += 1
