"""`python -m worker` is the same as the `worker` console script."""

from worker.cli.main import main

raise SystemExit(main())
