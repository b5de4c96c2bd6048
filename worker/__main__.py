"""`python -m worker` is the same as the `worker` console script."""

from worker.cli import main

raise SystemExit(main())
