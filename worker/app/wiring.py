"""The composition root: the one place a client, a limiter, an engine and the gateway proof are
built. A run, a dry run, the verify sweep and the spool watcher all come through here, so a
setting (a timeout, a CA bundle, the retry policy) means the same thing in every command.
"""

from __future__ import annotations

import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import structlog

from worker.app.metrics import MetricsAddress
from worker.core.engine import Engine
from worker.core.ports import Admissions, EngineSettings, RateChange, Recorder
from worker.core.ratelimit import RateLimiter
from worker.core.retry import Retrying, RetryPolicy, Verdict
from worker.enos.client import EnOSClient
from worker.errors import EnOSError
from worker.model import AbortRule, Credentials, Limits, Target
from worker.store.layout import RunDir

log = structlog.get_logger("worker.run")
SETTLE_S = 2.0  # EnOS applies a cancel within about 2 s; searching sooner may see it pending


@dataclass(frozen=True)
class RunOptions:
    """Everything a command that talks to the gateway needs besides the job: where, how fast,
    with which credentials."""

    gateway: str
    credentials: Credentials
    limits: Limits
    run: RunDir
    resume: bool = False
    progress: bool = True
    seed: int | None = None
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 30.0
    batch_settle_s: float = 2.0  # after a trial list's answer, before its assets are searched
    metrics: MetricsAddress | None = None  # --metrics-port: serve Prometheus metrics there
    verify_settle_s: float = SETTLE_S  # before a verify sweep searches
    ca_bundle: Path | None = None
    # A targets_query: run what was found when the query stays incomplete (else: stop, exit 3);
    # and, once it is resolved, the operator's confirmation of the count (None: go on; else
    # why not). None: no confirmation asked (a script's --yes, the spool watcher).
    accept_incomplete: bool = False
    confirm: Callable[[int], str | None] | None = None
    # UTC now, for signing and for the gateway's budget windows (a test moves it to a known hour)
    wall: Callable[[], float] = time.time
    force: bool = False  # a resume with --force: a changed job, or a failed stage gate looked at

    def policy(self) -> RetryPolicy:
        """The retry policy of this run."""
        return RetryPolicy(
            attempts=self.limits.attempts,
            max_throttles=self.limits.max_throttles,
            base_s=self.backoff_base_s,
            cap_s=self.backoff_cap_s,
        )

    def rng(self) -> random.Random:
        """The run's randomness (jitter), seeded when the options say so."""
        return random.Random(self.seed)


def client_for(options: RunOptions) -> EnOSClient:
    """The client for the options' gateway, credentials and limits."""
    limits = options.limits
    return EnOSClient(
        options.gateway,
        options.credentials,
        concurrency=limits.concurrency,
        timeout=limits.timeout,
        max_retry_after=limits.max_retry_after,
        ca_bundle=options.ca_bundle,
        clock=options.wall,
    )


@asynccontextmanager
async def proven(client: EnOSClient, options: RunOptions) -> AsyncIterator[str | None]:
    """The client, open, with the gateway proven (an access token obtained before the first
    call); yields why the gateway cannot be used (None when it can)."""
    async with client:
        yield await prove_gateway(client, options.policy(), options.rng())


def limiter_for(limits: Limits, wall: Callable[[], float] = time.time) -> RateLimiter:
    """A shared limiter for the limits; every rate decision is logged with its cause."""
    return RateLimiter(
        limits.rate,
        adaptive=limits.adaptive,
        ceiling=limits.rate_max,
        floor=min(limits.rate_floor, limits.rate or limits.rate_floor),
        on_change=RateLog(adaptive=limits.adaptive),
        wall=wall,
    )


class RateLog:
    """The limiter's decisions in the log. A fixed rate above what the gateway takes is cut
    and ramps back again and again: that is said once, as a warning with what to do, and its
    repeats are only counted (the segment's end says how many), not logged every 2.5 s."""

    def __init__(self, *, adaptive: bool) -> None:
        self.adaptive = adaptive
        self.throttle_cycles = 0

    def __call__(self, change: RateChange) -> None:
        """One change of the limiter's rate or cause."""
        cycling = not self.adaptive and change.cause == "throttled"
        if cycling:
            self.throttle_cycles += 1
        if self.throttle_cycles > 1 and (cycling or change.detail == "recovered from the 429"):
            return  # a repeat: counted, not logged
        lowered = change.cause in ("quota", "budget") or (
            change.after is not None and (change.before is None or change.after < change.before)
        )
        fix = (
            "the gateway refuses this rate: pass --rate auto, or a lower --rate"
            if cycling
            else None
        )
        (log.warning if lowered else log.info)(
            "worker.rate_changed",
            cause=change.cause,
            from_per_s=_rounded(change.before),
            to_per_s=_rounded(change.after),
            why=change.detail,
            **({"fix": fix} if fix else {}),
        )


def _rounded(rate: float | None) -> float | str:
    return "unlimited" if rate is None else round(rate, 1)


def build_engine(
    client: EnOSClient,
    recorder: Recorder,
    options: RunOptions,
    *,
    limiter: RateLimiter | None = None,
    abort: AbortRule | None = None,
    dry_run: bool = False,
    admissions: Admissions | None = None,
    sent_before: Callable[[int, Target], bool] | None = None,
) -> Engine:
    """An engine for the options: its limiter (a shared one, or its own), settings from the
    limits; a dry run (a sweep, a sample) searches and never cancels."""
    limits = options.limits
    settings = EngineSettings(
        concurrency=limits.concurrency,
        policy=options.policy(),
        abort=abort or AbortRule(),
        deadline_at=time.time() + limits.deadline if limits.deadline and not dry_run else None,
        attempt_timeout=limits.timeout,
        dry_run=dry_run,
        assets_per_call=limits.assets_per_call,
        batch_settle_s=options.batch_settle_s,
    )
    return Engine(
        client,
        recorder,
        limiter or limiter_for(limits, options.wall),
        settings,
        admissions=admissions,
        sent_before=sent_before,
        rng=options.rng(),
    )


async def prove_gateway(
    client: EnOSClient,
    policy: RetryPolicy,
    rng: random.Random,
    sleep: Callable[[float], Any] = anyio.sleep,
) -> str | None:
    """Get the access token before the first target: a wrong gateway or rejected credentials
    stop the run at once (exit 3) instead of failing every target one by one. Retried like any
    call (the same decisions); returns why the gateway cannot be used, or None."""
    retrying = Retrying(policy)
    while True:
        try:
            await client.authenticate()
        except EnOSError as exc:
            decision = retrying.failed(exc, rng)
            if decision.verdict is Verdict.FATAL:
                return str(exc)
            if decision.verdict is Verdict.FAILED:
                return f"the gateway did not answer: {exc}"
            log.warning("worker.gateway_unreachable", attempt=retrying.failures, error=str(exc))
            await sleep(decision.wait_s if decision.wait_s is not None else 1.0)
        else:
            return None
