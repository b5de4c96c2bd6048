"""The grammar of ``worker simulate``: the gateway simulator's own flags (its data, its
credentials, the faults it injects). Kept apart from :mod:`worker.cli.grammar` for size."""

from __future__ import annotations

import argparse
from pathlib import Path

from worker.cli.help import SIM_APP_KEY, SIM_APP_SECRET


def simulate_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on; 0 picks one")
    parser.add_argument(
        "--app-key", help=f"the accepted app key (default: ENOS_APP_KEY, else {SIM_APP_KEY})"
    )
    parser.add_argument(
        "--app-secret-file",
        type=Path,
        metavar="FILE",
        help=f"a chmod-600 file holding its secret (default: ENOS_APP_SECRET, else "
        f"{SIM_APP_SECRET}); never on the command line, where ps shows it",
    )
    parser.add_argument(
        "--job",
        type=Path,
        metavar="JOB.yaml",
        help="make every target of this job exist, with cached commands",
    )
    parser.add_argument(
        "--devices", type=int, default=1000, help="generated devices (as000000, as000001, ...)"
    )
    parser.add_argument(
        "--commands",
        type=int,
        default=3,
        help="cached commands per device (names cycle setPoint42, restart, "
        "firmwareCheck, setPoint7)",
    )
    parser.add_argument(
        "--products",
        type=int,
        default=4,
        help="products the generated devices belong to, in turn (4: bXuuAiku, pQ7sLk2d, "
        "Zt9wN4ha, mK3vR8ce; else simP0000, simP0001, ...)",
    )
    parser.add_argument("--seed", type=int, default=7, help="seed of the data and the faults")
    faults = parser.add_argument_group(
        "faults (more over POST /_sim/faults; see docs/simulator.md)"
    )
    faults.add_argument("--latency-ms", type=float, default=0.0, help="added to every call")
    faults.add_argument(
        "--error-rate", type=float, default=0.0, help="share of calls answered HTTP 500/502/503"
    )
    faults.add_argument(
        "--rate-cap",
        type=float,
        metavar="N",
        help="calls per second above which to answer 429 (default: none)",
    )
    faults.add_argument(
        "--drop-rate",
        type=float,
        default=0.0,
        help="share of connections closed after the call took effect",
    )
    faults.add_argument(
        "--malformed-rate", type=float, default=0.0, help="share of answers garbled or cut short"
    )
    faults.add_argument("--token-ttl", type=int, default=7200, help="token lifetime in seconds")
    faults.add_argument(
        "--deny-org", action="append", metavar="ORG", help="answer 99403 for this org (repeatable)"
    )
    faults.add_argument(
        "--expired-token-answer",
        choices=("401", "1203"),
        default="401",
        help="how an expired token is refused",
    )
    faults.add_argument(
        "--require-command-id",
        action="store_true",
        help="refuse a cancel without commandId, as the 2.3.0 docs say",
    )
    faults.add_argument(
        "--multi-asset",
        choices=("off", "strict", "lenient", "first"),
        default="off",
        help="what a cancel with assetId=a1,a2,... does: off = the text is one (unknown) id, "
        "99404; strict = an unknown id fails the whole call (99404, no effect); lenient = "
        "unknown ids are ignored; first = only the first id is acted on, silently (to test "
        "the worker's self-verification)",
    )
    faults.add_argument(
        "--max-assets",
        type=int,
        default=100,
        metavar="N",
        help="with --multi-asset: a list of more asset ids is refused with 99400",
    )
    faults.add_argument(
        "--legacy-wire",
        action="store_true",
        help="2019 wire variants (numeric createTime, createLocalTime)",
    )
    faults.add_argument(
        "--quota",
        default="",
        metavar="SPEC",
        help="the gateway's quota: windows aligned to the UTC second/minute/hour/day/month/year, "
        "e.g. second=100,minute=5000,day=100000 (day=2000/120: a 120-s 'day'); 429 once one is "
        "spent, refused calls do not count",
    )
    faults.add_argument(
        "--quota-headers",
        choices=("x-ratelimit", "ietf", "both", "none"),
        default="x-ratelimit",
        help="how every business answer states the quota: X-RateLimit-Limit/Remaining-<Period>, "
        "the IETF draft's RateLimit-Limit/Remaining/Reset (the window with the fewest left), "
        "both, or none",
    )
    faults.add_argument(
        "--quota-retry-after",
        choices=("exact", "absent", "capped"),
        default="exact",
        help="Retry-After on the quota's 429: the rest of the window, none, or at most 1 s",
    )
    faults.add_argument(
        "--late-504-rate",
        type=float,
        default=0.0,
        help="share of calls answered HTTP 504 after they took effect",
    )
    faults.add_argument(
        "--search-lag",
        type=float,
        default=0.0,
        metavar="S",
        help="Search Command shows each command as it was S seconds ago (EnOS: about 2)",
    )
    faults.add_argument(
        "--refresh-revokes", action="store_true", help="token/refresh revokes earlier tokens"
    )
    faults.add_argument(
        "--device-page-max",
        type=int,
        default=1000,
        metavar="N",
        help="Search Device: a larger pageSize is refused with 99400",
    )
    faults.add_argument(
        "--reshuffle-every",
        type=int,
        default=0,
        metavar="K",
        help="Search Device: reshuffle the order of the devices every K calls (seeded; 0: a "
        "stable order)",
    )
    faults.add_argument(
        "--drift-every",
        type=int,
        default=0,
        metavar="K",
        help="Search Device: every K calls a matching device disappears and a new one appears",
    )
    faults.add_argument(
        "--leak-secrets",
        action="store_true",
        help="Search Device: send each device's secret whatever the projection asks",
    )
