"""The client against the simulator over real HTTP: every row of the error table, tokens, logs."""

from __future__ import annotations

import time

import aiohttp
import anyio
import pytest
import structlog

from tests.conftest import APP_KEY, APP_SECRET, ORG
from worker.enos import protocol as p
from worker.enos.answers import parse_retry_after
from worker.enos.client import EnOSClient
from worker.enos.signing import request_signature
from worker.errors import (
    AuthError,
    FatalError,
    InvalidTargetError,
    PermissionDeniedError,
    RateLimitedError,
    RetryableError,
    TargetError,
)
from worker.model import Credentials, Target
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.sim.state import PRODUCT_KEYS, generated_command_id

pytestmark = pytest.mark.anyio


def asset(index: int, command_id: str | None = None) -> Target:
    """Generated device `index` addressed by asset id."""
    return Target(org_id=ORG, asset_id=f"as{index:06d}", command_id=command_id)


def pending_device(sim: Simulator, start: int = 1) -> int:
    """The first generated device from `start` that was seeded with cached commands."""
    return next(i for i in range(start, 200) if not sim.store.is_pending_free(i))


async def test_cancel_all_returns_the_cancelled_commands(
    sim: Simulator, client: EnOSClient
) -> None:
    """code 0 with data: the ids of the device's state-1 commands, which become state 2."""
    index = pending_device(sim)
    reply = await client.cancel(asset(index))
    assert [c.command_id for c in reply.commands] == [
        generated_command_id(index, k) for k in range(3)
    ]
    assert reply.request_id
    device = sim.store.find(ORG, f"as{index:06d}", None, None)
    assert device is not None
    assert [c.state for c in device.commands.values()] == [2, 2, 2, 5]


async def test_cancel_one_by_product_and_device_key(sim: Simulator, client: EnOSClient) -> None:
    """With a commandId only that command is cancelled."""
    index = pending_device(sim)
    wanted = generated_command_id(index, 1)
    target = Target(
        org_id=ORG,
        product_key=PRODUCT_KEYS[index % len(PRODUCT_KEYS)],
        device_key=f"dev_{index:06d}",
        command_id=wanted,
    )
    reply = await client.cancel(target)
    assert [c.command_id for c in reply.commands] == [wanted]
    assert (await client.get_command(target, wanted)).state == p.CommandState.CANCELED
    assert (await client.get_command(target, generated_command_id(index, 0))).state == 1


async def test_nothing_to_cancel_is_an_empty_success(sim: Simulator, client: EnOSClient) -> None:
    """code 0 with empty data, e.g. cancelling twice."""
    index = pending_device(sim)
    await client.cancel(asset(index))
    reply = await client.cancel(asset(index))
    assert reply.code == 0
    assert reply.commands == ()


async def test_search_pages_through_all_results(sim: Simulator, client: EnOSClient) -> None:
    """Search follows pageNo until totalSize, and honours the expression."""
    index = pending_device(sim)
    target = asset(index)
    found = await client.search_commands(target, "state = 1", page_size=2)
    assert sorted(c.command_id for c in found) == [generated_command_id(index, k) for k in range(3)]
    every = await client.search_commands(target, page_size=3)
    assert len(every) == 4
    assert (
        await client.search_commands(target, "state = 1 and createTime < '2000-01-01 00:00:00'")
        == []
    )


async def test_unknown_device_is_final_for_the_target(client: EnOSClient) -> None:
    """99404: a TargetError (no retry, failed for that target only)."""
    with pytest.raises(TargetError) as caught:
        await client.cancel(Target(org_id=ORG, asset_id="nosuch01"))
    assert caught.value.code == p.CODE_NOT_FOUND


async def test_unknown_org_is_a_bad_parameter(client: EnOSClient) -> None:
    """99400: a TargetError."""
    with pytest.raises(TargetError) as caught:
        await client.cancel(Target(org_id="o0000000000000", asset_id="as000001"))
    assert caught.value.code == p.CODE_INVALID_PARAM


async def test_denied_org_is_fatal(sim: Simulator, client: EnOSClient) -> None:
    """99403: PermissionDeniedError, which stops a run."""
    sim.faults = Faults(denied_orgs=frozenset({ORG}))
    with pytest.raises(PermissionDeniedError) as caught:
        await client.cancel(asset(1))
    assert caught.value.code == p.CODE_NO_PERMISSION
    assert isinstance(caught.value, FatalError)


async def test_rate_limited_carries_retry_after(sim: Simulator, client: EnOSClient) -> None:
    """HTTP 429: RateLimitedError with the Retry-After seconds; the call had no effect."""
    sim.faults = Faults(rate_cap=1, retry_after_s=3)
    await client.cancel(asset(1))
    with pytest.raises(RateLimitedError) as caught:
        await client.cancel(asset(2))
    assert caught.value.retry_after == 3.0
    assert caught.value.maybe_applied is False


@pytest.mark.parametrize("fault", ["error_rate", "drop_rate", "malformed_rate"])
async def test_transient_faults_are_retryable(
    sim: Simulator, client: EnOSClient, fault: str
) -> None:
    """5xx, a dropped connection, a garbled or cut body: RetryableError."""
    setattr(sim.faults, fault, 1.0)
    for index in range(1, 5):
        with pytest.raises(RetryableError) as caught:
            await client.cancel(asset(index))
        assert not isinstance(caught.value, RateLimitedError)


async def test_timeout_is_retryable_and_maybe_applied(sim: Simulator, gateway: str) -> None:
    """No answer within the attempt timeout: RetryableError that may have taken effect."""
    sim.faults = Faults(latency_ms=500)
    async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET), timeout=0.1) as client:
        with pytest.raises(RetryableError) as caught:
            await client.cancel(asset(1))
    assert caught.value.maybe_applied is True


async def test_connection_refused_is_retryable_not_applied() -> None:
    """Nobody listening: RetryableError that cannot have taken effect."""
    with anyio.fail_after(5):
        async with EnOSClient("http://127.0.0.1:9", Credentials(APP_KEY, APP_SECRET)) as client:
            with pytest.raises(RetryableError) as caught:
                await client.cancel(asset(1))
    assert caught.value.maybe_applied is False


async def test_wrong_secret_is_an_auth_error(sim: Simulator, gateway: str) -> None:
    """A wrong app secret fails the token's encryption check (1003): AuthError, nothing sent."""
    async with EnOSClient(gateway, Credentials(APP_KEY, "wrong")) as client:
        with pytest.raises(AuthError):
            await client.cancel(asset(1))
    assert sim.stats.business_calls == 0


async def test_unknown_app_is_an_auth_error(gateway: str) -> None:
    """An unknown app key (1002): AuthError."""
    async with EnOSClient(gateway, Credentials("nobody", APP_SECRET)) as client:
        with pytest.raises(AuthError):
            await client.cancel(asset(1))


@pytest.mark.parametrize("answer", ["401", "1203"])
async def test_expired_token_is_renewed_once(sim: Simulator, gateway: str, answer: str) -> None:
    """A token that expired at the gateway (HTTP 401 or code 1203) is replaced and the call
    succeeds; the gateway saw exactly one rejected call."""
    clock = [time.time()]
    sim.faults = Faults(expired_token_answer=answer, token_ttl_s=7200)
    async with EnOSClient(
        gateway, Credentials(APP_KEY, APP_SECRET), clock=lambda: clock[0]
    ) as client:
        await client.cancel(asset(1))
        for issued in sim._tokens.values():  # the gateway expires it early
            issued.expires_at = time.time() - 1
        reply = await client.cancel(asset(2))
    assert reply.code == 0
    assert sim.stats.token_requests == 2


async def test_token_renewed_before_expiry(sim: Simulator, gateway: str) -> None:
    """With less than min(300 s, 10 %) of its life left, the token is refreshed before use."""
    clock = [1_000_000.0]
    sim.faults = Faults(token_ttl_s=1000)
    async with EnOSClient(
        gateway, Credentials(APP_KEY, APP_SECRET), clock=lambda: clock[0]
    ) as client:
        await client.cancel(asset(1))
        clock[0] += 850  # 150 s left; the margin is min(300, 10 % of 1000) = 100 s: keep it
        await client.cancel(asset(2))
        assert client.token_requests == 1
        clock[0] += 60  # 90 s left: renew
        await client.cancel(asset(3))
        assert client.token_requests == 2


async def test_rejected_token_after_renewal_is_fatal(sim: Simulator, gateway: str) -> None:
    """If even a fresh token is refused, the client gives up with AuthError."""
    sim.faults = Faults(token_ttl_s=0)  # every token is born expired
    async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET)) as client:
        with pytest.raises(AuthError):
            await client.cancel(asset(1))


async def test_concurrent_callers_share_one_token_request(sim: Simulator, gateway: str) -> None:
    """50 callers at once make one token request; after an expiry, one renewal again."""
    async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET), concurrency=50) as client:
        async with anyio.create_task_group() as group:
            for index in range(50):
                group.start_soon(client.cancel, asset(index))
        assert sim.stats.token_requests == 1
        for issued in sim._tokens.values():
            issued.expires_at = time.time() - 1
        async with anyio.create_task_group() as group:
            for index in range(50, 100):
                group.start_soon(client.cancel, asset(index))
        assert sim.stats.token_requests == 2


async def test_gateway_404_is_fatal(sim: Simulator, gateway: str) -> None:
    """A base URL that is not the API gateway: stop instead of failing every target."""
    async with EnOSClient(gateway + "/wrong", Credentials(APP_KEY, APP_SECRET)) as client:
        with pytest.raises(FatalError):
            await client.cancel(asset(1))


@pytest.mark.parametrize(
    "target",
    [
        Target(org_id=ORG),
        Target(org_id=ORG, product_key="bXuuAiku"),
        Target(org_id=ORG, device_key="dev_000001"),
        Target(org_id=ORG, asset_id="as000001", product_key="p", device_key="d"),
        Target(org_id="", asset_id="as000001"),
    ],
)
async def test_invalid_targets_are_refused_before_sending(
    sim: Simulator, client: EnOSClient, target: Target
) -> None:
    """Neither selector, half a pair, both, or no org: InvalidTargetError, nothing sent."""
    with pytest.raises(InvalidTargetError):
        await client.cancel(target)
    assert sim.stats.business_calls == 0


async def test_legacy_wire_variants_are_read(sim: Simulator, client: EnOSClient) -> None:
    """createTime as a number, createLocalTime spelling: a search reads the same values (a
    cancel reads only the ids, which is all its result needs)."""
    sim.faults = Faults(legacy_wire=True)
    index = pending_device(sim)
    found = await client.search_commands(asset(index), "state = 1")
    assert len(found) == 3
    assert all(isinstance(c.create_time_ms, int) for c in found)
    assert all(c.command_type in (1, 2) and c.tsl_identifier for c in found)
    reply = await client.cancel(asset(index))
    assert {c.command_id for c in reply.commands} == {c.command_id for c in found}


async def test_no_secret_token_or_signature_in_logs(sim: Simulator, gateway: str) -> None:
    """Everything the client logs, through renewals and failures, is free of secrets."""
    with structlog.testing.capture_logs() as logs:
        async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET)) as client:
            await client.cancel(asset(1))
            for issued in sim._tokens.values():
                issued.expires_at = time.time() - 1
            await client.cancel(asset(2))
            sim.faults = Faults(error_rate=1.0)
            with pytest.raises(RetryableError):
                await client.cancel(asset(3))
    assert logs, "the client should log token events"
    text = repr(logs)
    assert APP_SECRET not in text
    for token in sim._tokens:
        assert token not in text
    assert "signature" not in text.lower()


async def test_tampered_signature_is_rejected_by_the_gateway(sim: Simulator, gateway: str) -> None:
    """A request signed right is accepted; one byte changed in the query or signature: 401."""
    async with EnOSClient(gateway, Credentials(APP_KEY, APP_SECRET)) as client:
        await client.cancel(asset(1))
    token = next(iter(sim._tokens))
    timestamp = str(int(time.time() * 1000))
    query = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000002")]
    good = request_signature(token, query, b"", timestamp, APP_SECRET)
    bad_secret = request_signature(token, query, b"", timestamp, "wrong")
    url = f"{gateway}{p.COMMANDS_PATH}"
    async with aiohttp.ClientSession() as session:
        statuses = []
        for signature, params in [
            (good, query),
            (good, [*query[:2], ("assetId", "as000003")]),
            (good[:-1] + ("0" if good[-1] != "0" else "1"), query),
            (bad_secret, query),
        ]:
            headers = {
                p.HEADER_TOKEN: token,
                p.HEADER_TIMESTAMP: timestamp,
                p.HEADER_SIGNATURE: signature,
            }
            async with session.post(url, params=params, headers=headers) as resp:
                statuses.append(resp.status)
    assert statuses == [200, 401, 401, 401]


def test_retry_after_forms() -> None:
    """Retry-After as seconds or an HTTP date; garbage is ignored."""
    assert parse_retry_after("2") == 2.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


async def test_ids_with_reserved_characters_sign_and_match(
    sim: Simulator, client: EnOSClient
) -> None:
    """Ids with '+', spaces, '/', '&', '=' and non-ASCII travel encoded and sign decoded."""
    odd = Target(org_id=ORG, product_key="p+q", device_key="dev 1/é&x=%", command_id="7+7")
    sim.store.seed_targets([odd])
    reply = await client.cancel(odd)
    assert [c.command_id for c in reply.commands] == ["7+7"]
    assert sim.stats.rejected_auth == 0
