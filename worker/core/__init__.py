"""The heart of a run, sans-IO where it decides: the per-target and per-list state machines
(``decide``, ``batching``), the actions they answer and the one retry ladder (``actions``,
``retry``), the shared rate limiter, the run-wide stop rules, and the engine that carries the
machines' answers out through its ports (``ports``: a canceller, a recorder, admissions).

May import the shared ground, ``worker.jobs`` and ``worker.enos.protocol`` (the API's facts).
Never aiohttp, YAML or files: the app wires real ports, tests pass fakes.
"""
