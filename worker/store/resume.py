"""Reading a run directory for a resume: what is final (the done set) and what the journal
counts so far, from the last checkpoint when it matches the journal (then only the lines after
it are parsed), else from the whole journal."""

from __future__ import annotations

from collections.abc import Callable

from worker.model import gc_paused, key_digest
from worker.store import checkpoint
from worker.store.done import Finished, line_flags, replay
from worker.store.journal import JournalCursor, read_journal, record_key
from worker.store.layout import RunDir
from worker.store.records import ResultRecord
from worker.store.tally import Counts, JournalFold


def finished_targets(
    run: RunDir,
    *,
    retry_failed: bool,
    cursor: JournalCursor | None = None,
    visit: Callable[[ResultRecord, int, int], None] | None = None,
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
        for record in read_journal(run.results, cursor):
            digest, flags = key_digest(record_key(record)), line_flags(record)
            if visit is not None:
                visit(record, digest, flags)
            found.take(digest, flags, retry_failed=retry_failed)
    return found


def fold_from_checkpoint(run: RunDir) -> JournalFold:
    """The fold as the last checkpoint left it when it matches the journal, else empty."""
    return checkpoint.load(run) or JournalFold()


def read_for_resume(run: RunDir, *, retry_failed: bool) -> tuple[JournalFold, Finished]:
    """What is final, and the counts so far (the fold goes on at the segment's end)."""
    fold = fold_from_checkpoint(run)
    found = replay(bytes(fold.done), retry_failed=retry_failed)
    finished = finished_targets(
        run, retry_failed=retry_failed, cursor=fold.cursor, visit=fold.add, found=found
    )
    return fold, finished


def counts_of(run: RunDir) -> Counts:
    """The journal's counts: from the checkpoint when it matches, then the lines after it
    (`worker report` of a million-line run reads little)."""
    return fold_from_checkpoint(run).read_rest(run)
