"""The run directory: one value that names every file in it, and its small JSON files.

Nothing else in the code spells a run directory's file names: a new file is a new property here
(and a line in ``docs/architecture.md``). ::

    run.json          the manifest (job and target hashes, limits, segments), replaced atomically
    run.lock          flock'ed by the worker running the directory (released by the kernel)
    results.jsonl     the journal: one final line per target (store.journal)
    audit.jsonl       every attempt, hash-chained (store.audit)
    admitted          the admission high-water mark: every target at or below it may have been sent
    summary.json      the whole run's summary, replaced atomically
    checkpoint.json   a resume's shortcut through a long journal (store.checkpoint) ...
    done.bin          ... and its done set: a cache, never a record
    verify.jsonl      the last verify sweep, a line per searched target ...
    verify.json       ... and its counts
    targets.csv       the targets file copied in at the start (or targets.jsonl): what the run
                      and every resume read; for a targets_query, its snapshot
    targets.csv.partial  a targets_query's rows while it resolves (kept when it stays
                      incomplete, for a look; a resume resolves again)
    control/          requests from worker ctl, a file each, removed once carried out
    status.json       the live state of the running process, replaced every second
    gate-N-T.jsonl    a staged run's gate after stage N (at UTC time T): a line per search
    report.html       the report page (report.html)
    failed.csv        the failed targets as a targets file ...
    followup.yaml     ... and a job that runs them again
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import orjson

from worker.errors import StoreError, UsageError
from worker.store.appendlog import os_cause
from worker.store.records import VerifyCountsRecord
from worker.store.state import Manifest, Summary


@dataclass(frozen=True, slots=True)
class RunDir:
    """A run directory and the path of each of its files."""

    path: Path

    def __str__(self) -> str:
        return str(self.path)

    @property
    def manifest(self) -> Path:
        """run.json: what the run is, and its segments."""
        return self.path / "run.json"

    @property
    def lock(self) -> Path:
        """run.lock: held (flock) by the process running the directory."""
        return self.path / "run.lock"

    @property
    def results(self) -> Path:
        """results.jsonl: the journal, one final line per target."""
        return self.path / "results.jsonl"

    @property
    def audit(self) -> Path:
        """audit.jsonl: every HTTP attempt, hash-chained."""
        return self.path / "audit.jsonl"

    @property
    def admitted(self) -> Path:
        """admitted: the admission high-water mark (crash truth)."""
        return self.path / "admitted"

    @property
    def summary(self) -> Path:
        """summary.json: the whole run's counts."""
        return self.path / "summary.json"

    @property
    def checkpoint(self) -> Path:
        """checkpoint.json: where the last segment's end read the journal to, and its counts."""
        return self.path / "checkpoint.json"

    @property
    def done(self) -> Path:
        """done.bin: the checkpoint's done set, a record per journal line."""
        return self.path / "done.bin"

    @property
    def verify_lines(self) -> Path:
        """verify.jsonl: the last verify sweep, a line per searched target."""
        return self.path / "verify.jsonl"

    @property
    def verify_counts(self) -> Path:
        """verify.json: the last verify sweep's counts."""
        return self.path / "verify.json"

    @property
    def report(self) -> Path:
        """report.html: the report page."""
        return self.path / "report.html"

    @property
    def failed_csv(self) -> Path:
        """failed.csv: the failed targets, as a targets file."""
        return self.path / "failed.csv"

    @property
    def followup(self) -> Path:
        """followup.yaml: a job that runs the failed targets again."""
        return self.path / "followup.yaml"

    @property
    def control(self) -> Path:
        """control/: worker ctl's requests to the running process, one file each (written
        beside and renamed in), removed once carried out; its permissions are the access
        control."""
        return self.path / "control"

    @property
    def status(self) -> Path:
        """status.json: the running process's live state (counts, rate, pause, stage,
        window), replaced atomically every second; what worker ctl status and scripts read."""
        return self.path / "status.json"

    def gate_lines(self, stage: int, stamp: str) -> Path:
        """gate-N-<UTC time>.jsonl: the searches of one gate of stage N, a line per device
        (the evidence its audit record names by sha256; each gate its own file, never
        rewritten, so every gate record can be checked against its file)."""
        return self.path / f"gate-{stage}-{stamp}.jsonl"

    def targets(self, fmt: str) -> Path:
        """targets.csv / targets.jsonl: the targets file as the run planned it, copied in at its
        start; the run and every resume read only this copy."""
        return self.path / f"targets.{fmt}"

    @property
    def resolving(self) -> Path:
        """targets.csv.partial: a targets_query's snapshot while its pages arrive; renamed to
        targets.csv once complete (or accepted incomplete)."""
        return self.path / "targets.csv.partial"

    def holds_run(self) -> bool:
        """Whether the directory holds a run (its manifest exists)."""
        return self.manifest.exists()

    def unused(self) -> bool:
        """Missing, or empty but for a lone run.lock (a run that died before it wrote anything)."""
        if not self.path.exists():
            return True
        return self.path.is_dir() and all(p.name == self.lock.name for p in self.path.iterdir())


def write_atomically(path: Path, data: bytes, *, durable: bool = True, mode: int = 0o640) -> None:
    """Replace `path` with `data` so that a reader (or a crash) sees the old or the new file,
    never half of one; `durable`: fsynced first (a record; a live view need not be).
    StoreError when it cannot be written (the old file stays as it was)."""
    _replace(path, lambda fd: _write_all(fd, data), durable=durable, mode=mode)


def copy_in(source: BinaryIO, dest: Path, digest: hashlib._Hash) -> None:
    """Copy an open file into the run directory, feeding every byte to `digest` as it goes
    (so the hash is of what was copied). StoreError when it cannot be written."""

    def fill(fd: int) -> None:
        while chunk := source.read(1 << 20):
            digest.update(chunk)
            _write_all(fd, chunk)

    _replace(dest, fill)


def _replace(
    path: Path, fill: Callable[[int], None], *, durable: bool = True, mode: int = 0o640
) -> None:
    """Write a new `path` beside it (never through a planted link) with `fill`, fsync (when
    `durable`), rename; the half-written file is removed when anything fails."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(tmp, flags, mode)
        try:
            fill(fd)
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StoreError(path, os_cause(exc)) from None


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a regular file may take fewer at once)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def read_manifest(run: RunDir) -> Manifest:
    """The run's manifest (run.json); UsageError if the directory holds no readable one."""
    try:
        return Manifest.from_json(orjson.loads(run.manifest.read_bytes()))
    except (OSError, ValueError, KeyError, TypeError):
        raise UsageError(f"{run} is not a run directory (no readable run.json)") from None


def write_manifest(run: RunDir, manifest: Manifest) -> None:
    """Replace run.json atomically."""
    data = orjson.dumps(manifest.to_json(), option=orjson.OPT_INDENT_2)
    write_atomically(run.manifest, data)


def read_summary(run: RunDir) -> Summary | None:
    """summary.json as the last segment's end wrote it (None before there is one)."""
    if not run.summary.exists():
        return None
    return Summary.from_json(orjson.loads(run.summary.read_bytes()))


def write_summary(run: RunDir, summary: Summary) -> None:
    """Replace summary.json atomically."""
    data = orjson.dumps(summary.to_json(), option=orjson.OPT_INDENT_2)
    write_atomically(run.summary, data)


def read_verify_counts(run: RunDir) -> VerifyCountsRecord:
    """verify.json's counts ({} before any sweep)."""
    if not run.verify_counts.exists():
        return {}
    loaded: VerifyCountsRecord = orjson.loads(run.verify_counts.read_bytes())  # our own JSON
    return loaded


def write_verify_counts(run: RunDir, counts: VerifyCountsRecord) -> None:
    """Replace verify.json atomically."""
    write_atomically(run.verify_counts, orjson.dumps(counts))
