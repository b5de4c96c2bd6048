"""Flag groups several commands share (run, validate, verify, watch, resolve): one text for
each, so that every command's --help says it alike."""

from __future__ import annotations

import argparse
from pathlib import Path


def accept_incomplete_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--accept-incomplete",
        action="store_true",
        help="a targets_query whose devices were not all found (the count falls short of the "
        "gateway's totalSize): go on with those found, recording the shortfall (default: stop, "
        "exit 3, nothing cancelled)",
    )


def connection_flags(parser: argparse.ArgumentParser) -> None:
    """How a command that talks to the gateway authenticates and trusts it (run, verify,
    watch: one text for the three)."""
    parser.add_argument(
        "--credentials",
        type=Path,
        metavar="FILE",
        help="a chmod-600 file with ENOS_APP_KEY=... and ENOS_APP_SECRET=... lines "
        "(default: the environment)",
    )
    parser.add_argument(
        "--ca-bundle",
        type=Path,
        metavar="FILE",
        help="PEM file of CA certificates to verify the gateway with (default: the "
        "system store, which honours SSL_CERT_FILE)",
    )
    parser.add_argument(
        "--insecure", action="store_true", help="allow plain http to a host that is not loopback"
    )


def limit_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rate",
        metavar="N|auto|unlimited",
        help="requests per second for the whole run; 'auto' finds the "
        "gateway's limit (default: the job's limits.rate, else 10)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        metavar="N",
        help="requests in flight (default: the job's, else 16)",
    )
    parser.add_argument(
        "--shard",
        metavar="K/N",
        help="only shard K of N (K from 0, as JOB_COMPLETION_INDEX): a stable split by a hash "
        "of each target, so N processes cover every target exactly once",
    )
    parser.add_argument(
        "--assets-per-call",
        type=int,
        metavar="N",
        help="cancel up to N assets (by asset_id, all their commands) in one call as "
        "assetId=a1,a2,...; opt-in, verified on the gateway, falls back to 1 (default: the "
        "job's limits.assets_per_call, else 1; at most 100)",
    )
    parser.add_argument(
        "--deadline",
        metavar="DURATION",
        help="stop cleanly after this long, e.g. 90s, 45m, 2h, 1h30m (default: "
        "the job's, else none)",
    )
