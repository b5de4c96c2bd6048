"""Bounds against a hostile or broken gateway, and the transport and credentials rules: capped
bodies and Retry-After, gateway text scrubbed of secrets, TLS certificates, private secrets."""

from __future__ import annotations

import io
import ssl
import time
from pathlib import Path

import anyio
import orjson
import pytest
import structlog
import trustme
from aiohttp import web

from tests.conftest import APP_KEY, APP_SECRET, ORG
from tests.gateways import gateway, served
from tests.runs import results, run_job, summary, write_job
from tests.simproc import run_worker
from worker import logs
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.errors import RateLimitedError, RetryableError
from worker.model import Credentials, Target
from worker.sim.simulator import Simulator, serve

pytestmark = pytest.mark.anyio
TARGET = Target(org_id=ORG, asset_id="as000001")
CREDENTIALS = Credentials(APP_KEY, APP_SECRET)


async def big_body(_: web.Request) -> web.Response:
    """Two megabytes of JSON, announced with a Content-Length."""
    return web.Response(body=b'{"code":0,"data":[],"msg":"' + b"x" * (2 << 20) + b'"}')


async def endless_body(request: web.Request) -> web.StreamResponse:
    """A chunked answer that never ends (until the client hangs up)."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    await response.prepare(request)
    chunk = b" " * 65536
    for _ in range(100_000):  # bounded: 6.5 GB at most, far past any cap
        await response.write(chunk)
    return response


@pytest.mark.parametrize("handler", [big_body, endless_body])
async def test_a_body_past_the_cap_is_not_read(handler: object) -> None:
    """Over 1 MiB, announced or streamed: a retryable error (it may have taken effect), read
    no further than the cap."""
    began = time.monotonic()
    async with (
        served(gateway(handler)) as url,  # type: ignore[arg-type]
        EnOSClient(url, CREDENTIALS, max_body=1 << 20) as client,
    ):
        with pytest.raises(RetryableError, match="larger than 1,048,576 bytes") as caught:
            await client.cancel(TARGET)
    assert caught.value.maybe_applied is True
    assert time.monotonic() - began < 10


@pytest.mark.parametrize(
    ("header", "expected"), [("999999", 300.0), ("inf", 300.0), ("nan", None), ("7", 7.0)]
)
async def test_retry_after_is_capped_and_said(header: str, expected: float | None) -> None:
    """A Retry-After past the cap (300 s) pauses for the cap, with a warning event."""

    async def limited(_: web.Request) -> web.Response:
        return web.json_response(
            {"message": "slow down"}, status=429, headers={"Retry-After": header}
        )

    with structlog.testing.capture_logs() as events:
        async with served(gateway(limited)) as url, EnOSClient(url, CREDENTIALS) as client:
            with pytest.raises(RateLimitedError) as caught:
                await client.cancel(TARGET)
    assert caught.value.retry_after == expected
    capped = [e for e in events if e["event"] == "worker.retry_after_capped"]
    assert bool(capped) == (expected == 300.0)


def echoing(code: int) -> web.Application:
    """A gateway whose answers echo the request's headers (token and signature) everywhere."""

    async def echo(request: web.Request) -> web.Response:
        headers = {str(k): v for k, v in request.headers.items()}
        token, signature = headers.get(p.HEADER_TOKEN), headers.get(p.HEADER_SIGNATURE)
        data = None if code else [{"commandId": "c1", "commandName": token}]
        text = orjson.dumps(headers).decode()
        body = orjson.dumps({"code": code, "msg": text, "requestId": signature, "data": data})
        return web.Response(body=body, content_type="application/json")

    return gateway(echo)


@pytest.mark.parametrize("code", [0, 99404])
async def test_gateway_echo_of_secrets_never_reaches_a_file(tmp_path: Path, code: int) -> None:
    """A gateway echoing the token and signature into msg, requestId and command fields: the
    journal, the audit log and the summary hold neither (nor the secret)."""
    job = write_job(tmp_path, "targets:\n" + "".join(f"  - asset_id: a{i}\n" for i in range(5)))
    async with served(echoing(code)) as url:
        exit_code, report = await run_job(job, url, tmp_path / "run")
    assert exit_code == (0 if code == 0 else 1)
    written = b"".join(
        (tmp_path / "run" / name).read_bytes()
        for name in ("results.jsonl", "audit.jsonl", "summary.json")
    )
    assert b"tok-1234567890" not in written
    assert APP_SECRET.encode() not in written
    assert b"[redacted]" in written  # the echo was there, and was masked
    for line in results(tmp_path / "run"):
        assert line["request_id"] == "[redacted]"  # the echoed signature
    assert "tok-1234567890" not in report


def test_credentials_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    """A credentials file of mode 644 is refused (exit 2) with the chmod that fixes it."""
    secret_file = tmp_path / "creds.env"
    secret_file.write_text(f"ENOS_APP_KEY={APP_KEY}\nENOS_APP_SECRET={APP_SECRET}\n")
    secret_file.chmod(0o644)
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nname: t\norg_id: {ORG}\ntargets: [{{asset_id: a}}]\n")
    done = run_worker(
        "run", str(job), "--gateway", "http://127.0.0.1:9", "--credentials", str(secret_file)
    )
    assert done.returncode == 2
    assert f"chmod 600 {secret_file}" in done.stderr
    assert APP_SECRET not in done.stdout + done.stderr


def test_json_logs_carry_the_traceback_scrubbed() -> None:
    """JSON logs include the traceback as text, with registered secrets masked in it."""
    stream = io.StringIO()
    logs.register_secret("a-secret-in-an-error")
    try:
        logs.configure(json=True, stream=stream)
        try:
            raise ValueError("failed near a-secret-in-an-error")
        except ValueError:
            structlog.get_logger("t").exception("worker.internal_error")
    finally:
        structlog.reset_defaults()
    event = orjson.loads(stream.getvalue())
    assert "Traceback" in event["exception"]
    assert "ValueError" in event["exception"]
    assert "a-secret-in-an-error" not in stream.getvalue()


@pytest.fixture
def tls_authority() -> trustme.CA:
    """A throw-away CA that signs a certificate for 127.0.0.1."""
    return trustme.CA()


async def test_untrusted_certificate_stops_at_once_and_ca_bundle_fixes_it(
    tmp_path: Path, tls_authority: trustme.CA
) -> None:
    """A gateway whose certificate the system does not trust: the run stops (exit 3) after one
    token try, not `attempts` of them, and says how to fix it; --ca-bundle with its CA works."""
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_authority.issue_cert("127.0.0.1").configure_cert(server)
    bundle = tmp_path / "ca.pem"
    tls_authority.cert_pem.write_to_path(str(bundle))
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=10, seed=7)
    job = write_job(tmp_path, "limits: {attempts: 5}\ntargets:\n  - asset_id: as000001\n")
    async with serve(sim, tls=server) as url:
        assert url.startswith("https://")
        with anyio.fail_after(20):
            code, _ = await run_job(job, url, tmp_path / "refused")
        assert code == 3
        stopped = summary(tmp_path / "refused")
        assert "--ca-bundle" in stopped["stop_message"]
        assert sim.stats.token_requests == 0
        code, _ = await run_job(job, url, tmp_path / "trusted", ca_bundle=bundle)
        assert code == 0
    assert results(tmp_path / "trusted")[0]["outcome"] == "cancelled"


def test_a_missing_ca_bundle_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    """--ca-bundle naming no PEM file: exit 2 with the fix, nothing sent."""
    job = tmp_path / "job.yaml"
    job.write_text(f"version: 1\nname: t\norg_id: {ORG}\ntargets: [{{asset_id: a}}]\n")
    (tmp_path / "empty.pem").write_text("not a certificate\n")
    cases = ((tmp_path / "nope.pem", "no such file"), (tmp_path / "empty.pem", "no PEM"))
    for bundle, words in cases:
        done = run_worker(
            "run",
            str(job),
            "--gateway",
            "https://127.0.0.1:9",
            "--ca-bundle",
            str(bundle),
            "--out",
            str(tmp_path / "run"),
        )
        assert done.returncode == 2, done.stderr
        assert words in done.stderr
        assert not (tmp_path / "run").exists(), "refused before the run directory is made"
