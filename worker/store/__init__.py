"""The run directory: its file names (``layout.RunDir``), the lock, the manifest and summary
(``state``), the journal and the audit log (append-only, one write per record), the typed
records, the admission mark, the done set, the journal's counts (``tally``) with their
checkpoint, and reading it all back for a resume (``resume``).

May import only the shared ground. Every file of a run is opened here.
"""
