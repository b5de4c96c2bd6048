"""Prometheus metrics of a run (``--metrics-port``): what a dashboard or an alert needs live.

Counters move with each audit record and journal line (the same events, so the metrics never
say more than the files); gauges are read from the engine when scraped. Nothing here holds a
secret, a token or gateway text: labels are the action, the HTTP status, the EnOS code and the
decision.

The endpoint is served by `MetricsServer`, not by prometheus-client's ``start_http_server``:
that one starts a thread per connection and reads without a timeout, so idle connections
(1,057 threads in 24 s in a test) exhaust the process that is cancelling commands. Ours is
one thread and a selector, with a bounded number of connections, each of which must send its
request within a deadline; the exposition itself is still prometheus-client's. It reads
plain ints and floats the event loop writes, which needs no lock.
"""

from __future__ import annotations

import contextlib
import gzip
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder, gzip_accepted

from worker.core.ratelimit import RateLimiter
from worker.model import Attempt, TargetResult

log = structlog.get_logger("worker.metrics")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

READ_TIMEOUT_S = 5.0  # a connection's whole life: request in, answer out (a scrape takes ms)
MAX_CONNECTIONS = 32  # open at once; a new one closes the oldest (scrapers reconnect)
MAX_REQUEST_BYTES = 8192  # a request head past this is refused (431)
METRICS_PATHS = frozenset({"/metrics", "/"})
ACCEPT_PAUSE_S = 0.5  # after an accept that failed (out of file descriptors)


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

    def __init__(
        self, *, timeout_s: float = READ_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS
    ) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.requests = Counter(
            "worker_requests",
            "HTTP requests answered or failed, by action, HTTP status and EnOS code ('none' "
            "when no answer came)",
            ["action", "http_status", "code"],
            registry=registry,
        )
        self.retries = Counter(
            "worker_retries",
            "requests followed by another try, by why ('retry' after an error, 'throttled' "
            "after a 429)",
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
        self._limits = (timeout_s, max_connections)
        self._server: MetricsServer | None = None

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
        timeout_s, max_connections = self._limits
        try:
            self._server = MetricsServer(
                self.registry, address, timeout_s=timeout_s, max_connections=max_connections
            )
        except OSError as exc:
            return f"--metrics-port {address.host}:{address.port}: {exc.strerror or exc}"
        host = f"[{address.host}]" if ":" in address.host else address.host
        url = f"http://{host}:{self._server.port}/metrics"
        log.info("worker.metrics_serving", url=url)
        return None

    @property
    def port(self) -> int | None:
        """The port served (the one the system chose for port 0), None when not serving."""
        return None if self._server is None else self._server.port

    def close(self) -> None:
        """Stop serving (the last scrape sees the final values)."""
        if self._server is not None:
            self._server.close()
            self._server = None


# -- the endpoint --------------------------------------------------------------------------


@dataclass(eq=False)
class _Connection:
    """One scrape connection: the request as it arrives, then the answer as it leaves."""

    sock: socket.socket
    deadline: float  # monotonic; the connection is closed then, whatever its state
    received: bytearray = field(default_factory=bytearray)
    answer: memoryview | None = None  # set once the request is read


class MetricsServer:
    """`/metrics` over HTTP/1.1 from one daemon thread, whatever the clients do.

    Why not a thread per connection: a client that opens connections and sends nothing would
    hold a thread (and its stack) each, without end. Here every connection lives at most
    `timeout_s` from its accept, whether it is idle, trickles its request a byte at a time
    (slow loris) or does not read the answer; at most `max_connections` are open (a new one
    closes the oldest, so a flood cannot lock a scraper out, nor take the file descriptors
    the run needs for its gateway connections and journal); a request head is at most 8 KiB.
    One connection per request (``Connection: close``): a scrape every few seconds does not
    need keep-alive, and it keeps the state one request deep.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        address: MetricsAddress,
        *,
        timeout_s: float = READ_TIMEOUT_S,
        max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self._registry = registry
        self._timeout_s = timeout_s
        self._max_connections = max(1, max_connections)
        self._listener = _listen(address)
        self._selector = selectors.DefaultSelector()
        self._wake_read, self._wake_write = socket.socketpair()
        self._wake_read.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "accept")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._open: dict[socket.socket, _Connection] = {}  # in accept order: oldest first
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="worker-metrics", daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        """The port bound (the one asked, or the one the system chose for port 0)."""
        port: int = self._listener.getsockname()[1]
        return port

    def close(self) -> None:
        """Stop the thread and close every socket; waits for a scrape being answered."""
        if self._stopping:
            return
        self._stopping = True
        with contextlib.suppress(OSError):  # the loop is gone already; it closed what it held
            self._wake_write.send(b"x")
        self._thread.join(timeout=self._timeout_s + 1.0)
        self._wake_write.close()

    def _loop(self) -> None:
        """Wait for sockets until closed; no error of one connection ends the loop."""
        try:
            while not self._stopping:
                ready = [key.data for key, _ in self._selector.select(self._wait_s())]
                # Open connections first, then new ones: a scrape accepted in the last round
                # is read before a flood of newer connections can push it out.
                for data in sorted(ready, key=lambda data: isinstance(data, str)):
                    self._dispatch(data)
                self._expire(time.monotonic())
        except Exception:  # a bug: say so, rather than stop answering without a word
            log.exception("worker.metrics_server_failed")
        finally:
            for connection in list(self._open.values()):
                self._drop(connection)
            self._selector.close()
            self._listener.close()
            self._wake_read.close()

    def _wait_s(self) -> float | None:
        """Until the oldest connection's deadline (None: nothing open, wait for a socket)."""
        oldest = next(iter(self._open.values()), None)
        return None if oldest is None else max(0.0, oldest.deadline - time.monotonic())

    def _dispatch(self, data: _Connection | str) -> None:
        if data == "accept":
            self._accept()
        elif data == "wake":
            with contextlib.suppress(BlockingIOError):
                self._wake_read.recv(64)
        elif isinstance(data, _Connection) and data.sock in self._open:  # not dropped yet
            self._serve(data)

    def _accept(self) -> None:
        """Take the connections waiting (at most the cap a round, so a flood of them does not
        starve the reads); past the cap the oldest open one is closed."""
        for _ in range(self._max_connections):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # out of descriptors: the listener stays readable, so
                # pause rather than spin (a scrape waits; the run's sockets matter more)
                log.warning("worker.metrics_accept_failed", error=exc.strerror or str(exc))
                time.sleep(ACCEPT_PAUSE_S)
                return
            sock.setblocking(False)
            if len(self._open) >= self._max_connections:
                self._drop(next(iter(self._open.values())))
            connection = _Connection(sock, time.monotonic() + self._timeout_s)
            self._open[sock] = connection
            self._selector.register(sock, selectors.EVENT_READ, connection)

    def _serve(self, connection: _Connection) -> None:
        """Move one connection on (read, or write); close it on any error."""
        try:
            if connection.answer is None:
                self._read(connection)
            else:
                self._write(connection)
        except (BlockingIOError, InterruptedError):
            return  # not ready after all: the selector says when
        except OSError:
            self._drop(connection)  # reset by the client, or the like: nothing to say
        except Exception:
            log.exception("worker.metrics_connection_failed")
            self._drop(connection)

    def _read(self, connection: _Connection) -> None:
        chunk = connection.sock.recv(4096)
        if not chunk:
            self._drop(connection)
            return
        connection.received += chunk
        if b"\r\n\r\n" in connection.received:
            self._answer(connection, self._respond(bytes(connection.received)))
        elif len(connection.received) > MAX_REQUEST_BYTES:
            self._answer(connection, _plain(431, "Request Header Fields Too Large"))

    def _answer(self, connection: _Connection, answer: bytes) -> None:
        connection.answer = memoryview(answer)
        self._selector.modify(connection.sock, selectors.EVENT_WRITE, connection)
        self._write(connection)  # most answers fit the socket's buffer at once

    def _write(self, connection: _Connection) -> None:
        answer = connection.answer
        assert answer is not None
        sent = connection.sock.send(answer)
        connection.answer = answer[sent:]
        if not connection.answer:
            connection.sock.shutdown(socket.SHUT_WR)
            self._drop(connection)

    def _respond(self, head: bytes) -> bytes:
        """The answer to one request head (everything before the blank line)."""
        request_line, *header_lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        parts = request_line.decode("latin-1").split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return _plain(400, "Bad Request")
        method, target, _ = parts
        if method not in ("GET", "HEAD"):
            return _plain(405, "Method Not Allowed", extra=[("Allow", "GET, HEAD")])
        if target.split("?", 1)[0] not in METRICS_PATHS:
            return _plain(404, "Not Found")
        headers = _headers(header_lines)
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self._registry)
        extra = [("Content-Type", content_type)]
        if gzip_accepted(headers.get("accept-encoding", "")):
            body = gzip.compress(body)
            extra.append(("Content-Encoding", "gzip"))
        return _response(200, "OK", extra, body, with_body=method == "GET")

    def _expire(self, now: float) -> None:
        """Close every connection past its deadline: the oldest are first in `_open`."""
        for connection in list(self._open.values()):
            if connection.deadline > now:
                return
            self._drop(connection)

    def _drop(self, connection: _Connection) -> None:
        if self._open.pop(connection.sock, None) is None:
            return
        with contextlib.suppress(KeyError, ValueError):  # the selector is closing too
            self._selector.unregister(connection.sock)
        connection.sock.close()


def _listen(address: MetricsAddress) -> socket.socket:
    """A non-blocking listening socket on `address` (IPv4 or IPv6 as the host says)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(socket.SOMAXCONN)  # a burst waits in the kernel, not in a SYN retry
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _headers(lines: list[bytes]) -> dict[str, str]:
    """Header names lower-cased; a line without a colon is skipped."""
    headers: dict[str, str] = {}
    for line in lines:
        name, colon, value = line.decode("latin-1").partition(":")
        if colon:
            headers[name.strip().lower()] = value.strip()
    return headers


def _plain(status: int, reason: str, extra: list[tuple[str, str]] | None = None) -> bytes:
    body = f"{status} {reason}\n".encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), *(extra or [])]
    return _response(status, reason, headers, body)


def _response(
    status: int,
    reason: str,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    with_body: bool = True,
) -> bytes:
    """Status line, headers (with the length and ``Connection: close``), then the body."""
    lines = [f"HTTP/1.1 {status} {reason}", *(f"{k}: {v}" for k, v in headers)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    return "\r\n".join(lines).encode("latin-1") + (body if with_body else b"")
