"""The command line: its grammar (every flag, default, example and exit code) and the commands,
which build frozen settings and hand them to ``worker.app``. The only layer that reads the
environment or prints for people outside a run's own output.
"""
