"""A resume's shortcut through a long journal: what the end of a segment already counted.

At each segment's end the summary pass has read (and hashed) the whole journal; it leaves
``checkpoint.json`` (the byte offset it read to, the sha256 of the journal up to there, the
summary's and the report's counts) and ``done.bin`` (per journal line, in order: the target's
16-byte digest and a flags byte). A resume that finds the journal's first bytes unchanged (one
sha256 pass, far cheaper than parsing a million JSON lines) starts from there and parses only the
lines after the offset; the done set is replayed from ``done.bin`` with exactly the rules of
:func:`worker.store.rundir.finished_targets`. Anything that does not match (a missing or damaged
file, an edited journal, another version's layout) is ignored: the journal is read as before. The
checkpoint is a cache of the journal, never a record of its own.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path
from typing import Any

import orjson
import structlog

from worker.store.journal import RESULTS_FILE, JournalCursor
from worker.store.rundir import Finished, write_atomically

CHECKPOINT_FILE = "checkpoint.json"
DONE_FILE = "done.bin"
LAYOUT = 1
RECORD = struct.Struct(">16sB")  # the digest, big-endian; flags
FAILED, MAYBE_APPLIED = 1, 2
log = structlog.get_logger("worker.checkpoint")


def done_record(digest: int, flags: int) -> bytes:
    """One done.bin record."""
    return RECORD.pack(digest.to_bytes(16, "big"), flags)


def replay(done: bytes, *, retry_failed: bool) -> Finished:
    """The done set as :func:`worker.store.rundir.finished_targets` builds it, from done.bin."""
    found = Finished()
    for raw, flags in RECORD.iter_unpack(done):
        found.take(int.from_bytes(raw, "big"), flags, retry_failed=retry_failed)
    return found


def _prefix_hash(path: Path, size: int) -> Any:
    """A sha256 of the file's first `size` bytes, to go on hashing what follows (None when the
    file is shorter)."""
    digest = hashlib.sha256()
    left = size
    with path.open("rb") as stream:
        while left:
            chunk = stream.read(min(left, 1 << 20))
            if not chunk:
                return None
            digest.update(chunk)
            left -= len(chunk)
    return digest


def write(run_dir: Path, cursor: JournalCursor, state: dict[str, Any], done: bytes) -> None:
    """Leave the checkpoint for the journal up to `cursor`, whose hash it kept while reading
    (done.bin first: the checkpoint names its size and hash, so a crash between the two leaves
    a checkpoint that does not match)."""
    write_atomically(run_dir / DONE_FILE, done)
    record = {"layout": LAYOUT, "offset": cursor.offset,
              "journal_sha256": cursor.sha256.hexdigest(), "done_size": len(done),
              "done_sha256": hashlib.sha256(done).hexdigest(), "state": state}  # fmt: skip
    write_atomically(run_dir / CHECKPOINT_FILE, orjson.dumps(record))


def load(run_dir: Path) -> tuple[JournalCursor, dict[str, Any], bytes] | None:
    """(a cursor past what it covers, with the hash so far; the counts state; done.bin) when
    the checkpoint matches the journal, else None."""
    try:
        record = orjson.loads((run_dir / CHECKPOINT_FILE).read_bytes())
        done = (run_dir / DONE_FILE).read_bytes()
        cursor = JournalCursor()
        cursor.offset = int(record["offset"])
        prefix = _prefix_hash(run_dir / RESULTS_FILE, cursor.offset)
        valid = (
            record.get("layout") == LAYOUT
            and len(done) == record["done_size"]
            and len(done) % RECORD.size == 0
            and hashlib.sha256(done).hexdigest() == record["done_sha256"]
            and prefix is not None
            and prefix.hexdigest() == record["journal_sha256"]
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not valid:
        log.info("worker.checkpoint_ignored", run_dir=str(run_dir), why="it does not match")
        return None
    cursor.sha256 = prefix
    return cursor, record["state"], done
