"""The job: the job file (YAML), targets files (CSV/JSONL), the plan (duplicates, shards, what a
resume still has to do) and the units operators write (rates, durations, shards).

Imports only the shared ground (``worker.errors``, ``worker.model``). Pure but for reading the
job's own files: no network, no run directory.
"""
