"""What the simulated gateway does wrong, and what it saw: switched on in process or over
``POST /_sim/faults``; every fault is drawn from the simulator's seeded RNG."""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from worker.enos import protocol as p


@dataclass
class Faults:
    """What goes wrong, and how often. All off by default."""

    latency_ms: float = 0.0  # added to every business call
    error_rate: float = 0.0  # HTTP 500/502/503 before the call is handled
    rate_cap: float | None = None  # business calls per second (1-s window); above: 429
    retry_after_s: int = 1  # the Retry-After sent with a 429
    throttle_next: int = 0  # answer this many next business calls with 429, whatever the rate
    slow_rate: float = 0.0  # answers held back `slow_ms` after the call took effect
    slow_ms: float = 0.0
    drop_before_rate: float = 0.0  # connection closed before the call is handled (no effect)
    oversize_rate: float = 0.0  # a 2 MiB answer after the call took effect
    redirect_rate: float = 0.0  # HTTP 307 to another host, before the call is handled
    down_until: float = 0.0  # CLOCK_MONOTONIC: until then every connection is closed unanswered
    burst_from: int = 0  # business calls burst_from .. burst_from + burst_calls - 1 get a 503
    burst_calls: int = 0
    drop_rate: float = 0.0  # connection closed without an answer, after the call took effect
    malformed_rate: float = 0.0  # answer garbled or cut short, after the call took effect
    token_ttl_s: int = p.TOKEN_LIFETIME_S
    denied_orgs: frozenset[str] = frozenset()  # answered with 99403
    expired_token_answer: str = "401"  # "401" or "1203": how an expired token is refused
    require_command_id: bool = False  # mimic the 2.3.0+ docs that call commandId mandatory
    cancel_echo_state: int = 1  # the state shown in a cancel answer (samples show 1)
    legacy_wire: bool = False  # createTime as number and createLocalTime (2019 samples)
    max_skew_s: float | None = None  # reject apim-timestamp further than this from now
    # assetId=a1,a2,... on cancel (the docs' uncertain claim): "off" looks the whole text up as
    # one id (a gateway without lists: 99404); "strict": an unknown id fails the whole call
    # with 99404 and no effect; "lenient": unknown ids are ignored; "first": only the first
    # id is acted on, code 0 (a gateway that drops the rest silently: what the worker's
    # self-verification must catch).
    multi_asset: str = "off"
    max_assets: int = 100  # a longer list is refused with 99400
    # The gateway's quota (worker.sim.quota): windows such as "second=100,minute=5000,day=100000"
    # (a period may be shortened: "day=2000/120" is a 120-s day), counted on the simulator's
    # clock; "" is none. The headers announcing it: x-ratelimit | ietf | both | none; Retry-After
    # on its 429: exact (the rest of the window) | absent | capped (at most retry_after_s).
    quota: str = ""
    quota_headers: str = "x-ratelimit"
    quota_retry_after: str = "exact"
    late_504_rate: float = 0.0  # HTTP 504 after the call took effect (lost after the fact)
    search_lag_s: float = 0.0  # Search Command sees each command as it was this long ago
    refresh_revokes: bool = False  # token/refresh revokes the app's earlier tokens
    # Search Device (sim/devices.py): the largest page it serves (above: 99400); every K calls
    # the order is reshuffled (0: stable); every K calls a matching device goes and a new one
    # comes (0: no drift); device secrets sent whatever the projection asks.
    device_page_max: int = 1000
    device_reshuffle_every: int = 0
    device_drift_every: int = 0
    leak_secrets: bool = False


@dataclass
class SimStats:
    """What the simulator saw; tests and benchmarks read it."""

    by_action: Counter[str] = field(default_factory=Counter)
    by_status: Counter[int] = field(default_factory=Counter)
    token_requests: int = 0
    rejected_auth: int = 0
    arrivals: deque[float] = field(default_factory=lambda: deque(maxlen=2_000_000))

    @property
    def business_calls(self) -> int:
        """Every call to the command API, whatever its answer."""
        return sum(self.by_action.values())
