"""A faithful local EnOS gateway for ``worker simulate``, ``worker demo``, the tests and the
benchmarks: the gateway (tokens, signatures, faults: ``simulator``, ``faults``), the command
service behind it (``service``, ``expression``) and its devices (``state``).

A test and demo tool, not part of the client: may import the shared ground and
``worker.enos.protocol``/``signing``; nothing in the worker imports it but the CLI.
"""
