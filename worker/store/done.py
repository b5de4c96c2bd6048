"""The done set: which targets of a run are final (and which failed ones a --retry-failed
resume runs again), kept per journal line as a digest and a flags byte.

The same rules build it from the journal (:func:`worker.store.resume.finished_targets`) and
replay it from a checkpoint's done.bin (:func:`replay`): both go through :meth:`Finished.take`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from worker.model import Outcome
from worker.store.records import ResultRecord

FAILED, MAYBE_APPLIED = 1, 2  # a journal line's flags: failed; and its effect may be there


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


def line_flags(record: ResultRecord) -> int:
    """What the done set needs of a journal line beside its digest: failed, and whether that
    failure may have taken effect (a lost answer, a 5xx)."""
    if record.get("outcome") != Outcome.FAILED:
        return 0
    maybe = record.get("effect_unknown") or record.get("code") in (None, 99500)
    return FAILED | (MAYBE_APPLIED if maybe else 0)


RECORD = struct.Struct(">16sB")  # done.bin: the 16-byte digest, big-endian; the flags


def done_record(digest: int, flags: int) -> bytes:
    """One done.bin record."""
    return RECORD.pack(digest.to_bytes(16, "big"), flags)


def replay(done: bytes, *, retry_failed: bool) -> Finished:
    """The done set from done.bin, by the journal's rules."""
    found = Finished()
    for raw, flags in RECORD.iter_unpack(done):
        found.take(int.from_bytes(raw, "big"), flags, retry_failed=retry_failed)
    return found
