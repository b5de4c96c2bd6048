"""A resume's shortcut through a long journal: what the end of a segment already counted.

At each segment's end the summary pass has read (and hashed) the whole journal; it leaves
``checkpoint.json`` (the byte offset it read to, the sha256 of the journal up to there, the fold
of :mod:`worker.store.tally` saved whole) and ``done.bin`` (per journal line, in order: the
target's 16-byte digest and a flags byte). A resume that finds the journal's first bytes
unchanged (one sha256 pass, far cheaper than parsing a million JSON lines) starts from there and
parses only the lines after the offset; the done set is replayed from ``done.bin`` with exactly
the journal's rules (:mod:`worker.store.done`). Anything that does not match (a missing or
damaged file, an edited journal, another version's fold) is ignored: the journal is read as
before. The checkpoint is a cache of the journal, never a record of its own.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import orjson
import structlog

from worker.store.done import RECORD
from worker.store.journal import JournalCursor
from worker.store.layout import RunDir, write_atomically
from worker.store.tally import LAYOUT, Counts, JournalFold

log = structlog.get_logger("worker.checkpoint")


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


def write(run: RunDir, fold: JournalFold) -> None:
    """Leave the checkpoint for the journal up to the fold's cursor, whose hash it kept while
    reading (done.bin first: the checkpoint names its size and hash, so a crash between the two
    leaves a checkpoint that does not match)."""
    done = bytes(fold.done)
    write_atomically(run.done, done)
    cursor = fold.cursor
    record = {
        "layout": LAYOUT,
        "offset": cursor.offset,
        "journal_sha256": cursor.sha256.hexdigest(),
        "done_size": len(done),
        "done_sha256": hashlib.sha256(done).hexdigest(),
        "counts": fold.counts.save(),
    }
    write_atomically(run.checkpoint, orjson.dumps(record))


def load(run: RunDir) -> JournalFold | None:
    """The fold as the checkpoint left it (its cursor past what it covers, with the hash so far;
    its done records) when it matches the journal, else None."""
    try:
        record = orjson.loads(run.checkpoint.read_bytes())
        done = run.done.read_bytes()
        cursor = JournalCursor()
        cursor.offset = int(record["offset"])
        prefix = _prefix_hash(run.results, cursor.offset)
        valid = (
            record.get("layout") == LAYOUT
            and len(done) == record["done_size"]
            and len(done) % RECORD.size == 0
            and hashlib.sha256(done).hexdigest() == record["done_sha256"]
            and prefix is not None
            and prefix.hexdigest() == record["journal_sha256"]
        )
        counts = Counts.restore(record["counts"]) if valid else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if counts is None:
        log.info("worker.checkpoint_ignored", run_dir=str(run), why="it does not match")
        return None
    cursor.sha256 = prefix
    fold = JournalFold(counts, cursor)
    fold.done += done
    return fold
