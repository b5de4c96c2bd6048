"""A targets_query's snapshot: the devices it found, written as a targets file (CSV,
``asset_id,org_id``: what the targets reader reads, and what an operator can review and run as a
``targets_file:``) while the pages arrive, hashed as written.

Rows go to a partial file first; only a resolution that is complete (or accepted incomplete)
becomes the snapshot, by one fsync and one rename, so a crash or a stop mid-resolution never
leaves a file a resume could take for the real one.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from worker.errors import StoreError
from worker.store.appendlog import open_nofollow, os_cause

HEADER = b"asset_id,org_id\n"
_FLAGS = os.O_WRONLY | os.O_TRUNC


class SnapshotWriter:
    """Rows appended as they come (one write per page), the sha256 of every byte written."""

    def __init__(self, partial: Path, final: Path) -> None:
        self.partial = partial
        self.final = final
        self.rows = 0
        self._digest = hashlib.sha256()
        self._pending = bytearray()
        self._fd = open_nofollow(partial, _FLAGS)  # a previous try's rows are dropped
        self._pending += HEADER

    def add(self, asset_id: str, org_id: str) -> None:
        """One device, as a row (written at the next flush)."""
        self._pending += f"{asset_id},{_cell(org_id)}\n".encode()
        self.rows += 1

    def flush(self) -> None:
        """Write what was added (a page's new devices), whole, and hash it."""
        data = bytes(self._pending)
        self._pending.clear()
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            raise StoreError(self.partial, os_cause(exc)) from None
        self._digest.update(data)

    def finish(self) -> str:
        """Make the rows the snapshot: flushed, fsynced, renamed to the final name; returns the
        file's sha256 (as ``sha256sum`` prints it)."""
        self.flush()
        try:
            os.fsync(self._fd)
            self._close()
            os.replace(self.partial, self.final)
        except OSError as exc:
            raise StoreError(self.final, os_cause(exc)) from None
        return self._digest.hexdigest()

    def abandon(self) -> None:
        """Keep the rows found as the partial file (for a look), never as the snapshot."""
        try:
            self.flush()
        finally:
            self._close()

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _cell(text: str) -> str:
    """A CSV cell: quoted only when it must be (an org id is the job's own text)."""
    if any(char in text for char in ',"\r\n'):
        return '"' + text.replace('"', '""') + '"'
    return text
