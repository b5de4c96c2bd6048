"""The metrics endpoint stays bounded whatever its clients do: idle connections, a request
trickled a byte at a time, floods; and a real scrape is still answered at once."""

from __future__ import annotations

import gzip
import http.client
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

from worker.app.metrics import MAX_REQUEST_BYTES, MetricsAddress, RunMetrics
from worker.core.ratelimit import RateLimiter

LOOPBACK = MetricsAddress("127.0.0.1", 0)


@contextmanager
def served(timeout_s: float = 5.0, max_connections: int = 32) -> Iterator[RunMetrics]:
    """A real RunMetrics served on a free loopback port, closed afterwards."""
    metrics = RunMetrics(timeout_s=timeout_s, max_connections=max_connections)
    metrics.requests.labels("cancel", "200", "0").inc(3)
    assert metrics.serve(LOOPBACK, RateLimiter(25.0)) is None
    try:
        yield metrics
    finally:
        metrics.close()


def scrape(metrics: RunMetrics, **headers: str) -> tuple[str, bytes]:
    """A scrape that must succeed: (Content-Type, body as sent)."""
    connection = http.client.HTTPConnection("127.0.0.1", metrics.port or 0, timeout=2)
    try:
        connection.request("GET", "/metrics", headers=headers)
        response = connection.getresponse()
        assert response.status == 200
        return response.headers["Content-Type"], response.read()
    finally:
        connection.close()


def idle(metrics: RunMetrics, count: int, stack: ExitStack) -> list[socket.socket]:
    """`count` connections that send nothing."""
    sockets = []
    for _ in range(count):
        sock = stack.enter_context(socket.create_connection(("127.0.0.1", metrics.port or 0)))
        sockets.append(sock)
    return sockets


def server_threads() -> int:
    return sum(thread.name == "worker-metrics" for thread in threading.enumerate())


def closed_by_server(sock: socket.socket, within_s: float) -> bool:
    """Whether the server closes `sock` within `within_s` (EOF or reset)."""
    sock.settimeout(within_s)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def raw(metrics: RunMetrics, request: bytes) -> bytes:
    """Send `request` bytes as they are, read the whole answer."""
    with socket.create_connection(("127.0.0.1", metrics.port or 0), timeout=2) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer


def test_a_scrape_gets_prometheus_exposition_plain_gzipped_or_openmetrics() -> None:
    with served() as metrics:
        content_type, body = scrape(metrics)
        assert content_type.startswith("text/plain; version=0.0.4")
        text = body.decode()
        assert 'worker_requests_total{action="cancel",code="0",http_status="200"} 3.0' in text
        assert "worker_rate_allowed 25.0" in text
        _, zipped = scrape(metrics, **{"Accept-Encoding": "gzip"})
        assert gzip.decompress(zipped).decode() == text
        content_type, body = scrape(metrics, Accept="application/openmetrics-text")
        assert content_type.startswith("application/openmetrics-text")
        assert body.decode().endswith("# EOF\n")


def test_other_methods_paths_and_bad_requests_get_a_plain_refusal() -> None:
    with served() as metrics:
        head = raw(metrics, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert head.endswith(b"\r\n\r\n")  # the headers only
        assert b"Content-Length: 0\r\n" not in head
        post = raw(metrics, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
        assert post.startswith(b"HTTP/1.1 405 ")
        assert b"Allow: GET, HEAD" in post
        assert raw(metrics, b"GET /admin HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 404 ")
        assert raw(metrics, b"nonsense\r\n\r\n").startswith(b"HTTP/1.1 400 ")
        huge = b"GET /metrics HTTP/1.1\r\nX: " + b"a" * MAX_REQUEST_BYTES
        assert raw(metrics, huge).startswith(b"HTTP/1.1 431 ")


def test_idle_connections_hold_no_thread_and_are_closed_after_the_timeout() -> None:
    """200 connections that send nothing: the thread count does not move, a scrape beside
    them is answered at once, and every one of them is closed once its time is up."""
    threads = threading.active_count()
    with served(timeout_s=0.5, max_connections=256) as metrics, ExitStack() as stack:
        assert server_threads() == 1
        sockets = idle(metrics, 200, stack)
        began = time.monotonic()
        _, body = scrape(metrics)
        assert time.monotonic() - began < 0.4  # not queued behind the idle ones
        assert b"worker_rate_allowed" in body
        assert threading.active_count() <= threads + 1  # the server's one thread, no more
        assert all(closed_by_server(sock, within_s=2.0) for sock in sockets)
        assert time.monotonic() - began >= 0.4  # closed by the timeout, not at once
        scrape(metrics)  # and the endpoint still answers
    assert server_threads() == 0  # close() ended the thread


def test_a_request_trickled_a_byte_at_a_time_is_cut_at_the_deadline() -> None:
    """Slow loris: bytes keep coming, but the deadline counts from the accept, not from the
    last byte read."""
    with served(timeout_s=0.5) as metrics, ExitStack() as stack:
        (sock,) = idle(metrics, 1, stack)
        began = time.monotonic()
        for byte in b"GET /metrics HTTP/1.1\r\nX-Slow: " + b"a" * 100:  # 5 s of trickle
            sock.send(bytes([byte]))
            if closed_by_server(sock, within_s=0.05):
                break
        cut = time.monotonic() - began
        assert 0.4 <= cut < 2.0


def test_past_the_connection_cap_the_oldest_are_closed_and_a_scrape_still_gets_in() -> None:
    with served(timeout_s=30.0, max_connections=4) as metrics, ExitStack() as stack:
        sockets = idle(metrics, 10, stack)
        _, body = scrape(metrics)  # the newest: it closes the oldest idle one
        assert b"worker_requests_total" in body
        assert all(closed_by_server(sock, within_s=1.0) for sock in sockets[:7])
        assert not any(closed_by_server(sock, within_s=0.05) for sock in sockets[7:])


def test_close_frees_the_port_and_a_taken_port_is_a_message() -> None:
    with served() as metrics:
        port = metrics.port
        assert port is not None
        other = RunMetrics()
        problem = other.serve(MetricsAddress("127.0.0.1", port), RateLimiter(1.0))
        assert problem == f"--metrics-port 127.0.0.1:{port}: Address already in use"
        other.close()
    assert metrics.port is None
    metrics.close()  # twice is harmless
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))  # free again
