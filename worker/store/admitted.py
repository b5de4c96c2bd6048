"""The admission mark (``admitted``): the crash truth of which targets may have been sent."""

from __future__ import annotations

import os
import sys

from worker.store.appendlog import SyncedFile, WriteGuard, os_cause
from worker.store.layout import RunDir

_MARK_WIDTH = 20


class AdmissionMark(SyncedFile):
    """The crash-truth high-water mark: the highest ordinal that may have been sent.

    Targets are admitted in order from one iterator, so one number marks every target that
    may have been in flight (or waiting for a retry) when a segment ended or died. It is
    written ahead, `ahead` ordinals at a time (one small ``pwrite`` per `ahead` targets), before
    any of them is sent; it only ever grows. A target at or below the mark of an earlier
    segment that has no result may have been cancelled by a call whose answer was never read.
    """

    def __init__(
        self,
        run: RunDir,
        *,
        ahead: int,
        earlier_segments: bool,
        guard: WriteGuard | None = None,
    ) -> None:
        path = run.admitted
        existed = path.exists()
        super().__init__(path, os.O_RDWR, guard)
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
        """Target `ordinal` is about to be sent: make sure the mark covers it (StoreError when
        it cannot be written: then the target must not be sent)."""
        if ordinal > self._written:
            self.guard.check()
            mark = b"%0*d\n" % (_MARK_WIDTH, ordinal + self._ahead - 1)
            try:
                written = os.pwrite(self._fd, mark, 0)
            except OSError as exc:
                raise self.guard.fail(self.path, os_cause(exc)) from None
            if written != len(mark):
                raise self.guard.fail(self.path, "the admission mark was written short")
            self._written = ordinal + self._ahead - 1
            self.unsynced += 1
