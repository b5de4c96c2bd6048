"""The stories of the commands, wired in one place: ``wiring`` (the composition root: client,
limiter, engine, the gateway proof), ``prepare`` (new and resumed segments), ``run`` (a
segment's life), the verify sweep, the dry run, the spool watcher, metrics and the settings
read from the command line and the environment.

May import every layer below (report, core, sim, jobs, enos, store, shared ground); only
``worker.cli`` imports it.
"""
