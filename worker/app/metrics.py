"""Prometheus metrics of a run (``--metrics-port``): what a dashboard or an alert needs live.

Counters move with each audit record and journal line (the same events, so the metrics never
say more than the files); gauges are read from the engine when scraped. The server is
prometheus-client's own, in a daemon thread; it reads plain ints and floats the event loop
writes, which needs no lock. Nothing here holds a secret, a token or gateway text: labels are
the action, the HTTP status, the EnOS code and the decision.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from worker.core.ratelimit import RateLimiter
from worker.model import Attempt, TargetResult

log = structlog.get_logger("worker.metrics")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclass(frozen=True)
class MetricsAddress:
    """Where to serve: ``[HOST:]PORT`` (host 127.0.0.1 unless given; 0.0.0.0 in a pod)."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> MetricsAddress:
        """From ``9464``, ``0.0.0.0:9464`` or ``[::]:9464``; ValueError otherwise."""
        host, _, port = text.rpartition(":")
        if not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r:.40} is not [HOST:]PORT (e.g. 9464 or 0.0.0.0:9464)")
        return cls(host.strip("[]") or "127.0.0.1", int(port))


class RunMetrics:
    """The run's metrics in their own registry (tests and several runs in one process never
    share counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "worker_requests",
            "HTTP requests answered or failed, by action, HTTP status and "
            "EnOS code ('none' when no answer came)",
            ["action", "http_status", "code"],
            registry=registry,
        )
        self.retries = Counter(
            "worker_retries",
            "requests followed by another try, by why ('retry' after an "
            "error, 'throttled' after a 429)",
            ["decision"],
            registry=registry,
        )
        self.outcomes = Counter(
            "worker_targets_finished",
            "targets with a final result, by outcome",
            ["outcome"],
            registry=registry,
        )
        self.effect_unknown = Counter(
            "worker_targets_effect_unknown",
            "final results whose effect is unknown (a lost answer)",
            registry=registry,
        )
        self.latency = Histogram(
            "worker_request_latency_seconds",
            "latency of each HTTP request",
            buckets=LATENCY_BUCKETS_S,
            registry=registry,
        )
        self._server: Any = None

    def attempt(self, attempt: Attempt, action: str) -> None:
        """One audit record: one request."""
        status = str(attempt.http_status) if attempt.http_status is not None else "none"
        code = str(attempt.code) if attempt.code is not None else "none"
        self.requests.labels(action, status, code).inc()
        if attempt.decision in ("retry", "throttled"):
            self.retries.labels(attempt.decision).inc()
        if attempt.latency_ms is not None:
            self.latency.observe(attempt.latency_ms / 1000)

    def result(self, result: TargetResult) -> None:
        """One journal line: one target final."""
        self.outcomes.labels(result.outcome.value).inc()
        if result.effect_unknown:
            self.effect_unknown.inc()

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A value read from the run when scraped (in flight, the allowed rate, ...)."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def serve(self, address: MetricsAddress, limiter: RateLimiter) -> str | None:
        """Start serving, with the allowed rate of `limiter` as a gauge; what stops it (a port
        taken) as a message, or None."""
        self.gauge(
            "worker_rate_allowed",
            "requests per second allowed now (-1: unlimited)",
            lambda: -1.0 if limiter.rate is None else limiter.rate,
        )
        try:
            self._server, _ = start_http_server(address.port, address.host, self.registry)
        except OSError as exc:
            return f"--metrics-port {address.host}:{address.port}: {exc.strerror}"
        port = self._server.server_port
        log.info("worker.metrics_serving", url=f"http://{address.host}:{port}/metrics")
        return None

    def close(self) -> None:
        """Stop serving (the last scrape sees the final values)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
