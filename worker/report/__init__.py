"""What people and scripts read after (and during) a run: the summary built from the journal's
counts, the terminal's summary table and progress line (``console``), the HTML page (``html``,
with its header ``facts`` and SVG ``charts``), the follow-up files, the hints (the resume
command) and ``worker audit verify``.

May import ``worker.store``, ``worker.core`` (live progress), ``worker.jobs`` and the shared
ground; never the app or the CLI.
"""
