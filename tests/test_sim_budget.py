"""The simulator's gateway-budget behaviours, over real HTTP on 127.0.0.1: quota windows on an
injected clock with their headers and Retry-After, a 504 after the effect, a lagging search,
and a token refresh that revokes the earlier token."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.enos.signing import request_signature, token_encryption
from worker.errors import RetryableError
from worker.model import Credentials, Target
from worker.sim.faults import Faults
from worker.sim.quota import Rule, parse_quota, window_bounds
from worker.sim.simulator import Simulator, serve

pytestmark = pytest.mark.anyio
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC: a whole minute, hour and day


class Clock:
    """The simulator's wall clock, moved by the test."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """Starts 0.25 s into a UTC minute."""
    return Clock(T0 + 0.25)


@pytest.fixture
async def timed(clock: Clock) -> AsyncIterator[tuple[Simulator, str]]:
    """A simulator on the test's clock, served; yields (simulator, URL)."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=50, commands=3, seed=7, clock=clock)
    async with serve(sim) as url:
        yield sim, url


async def call(
    url: str, token: str, query: list[tuple[str, str]], method: str = "POST", body: bytes = b""
) -> tuple[int, Mapping[str, str], dict[str, Any]]:
    """One hand-signed business call: (status, headers, JSON answer)."""
    stamp = str(int(time.time() * 1000))
    headers = {
        p.HEADER_TOKEN: token,
        p.HEADER_TIMESTAMP: stamp,
        p.HEADER_SIGNATURE: request_signature(token, query, body, stamp, APP_SECRET),
    }
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, url + p.COMMANDS_PATH, params=query, data=body or None, headers=headers
        ) as resp,
    ):
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


async def token_of(url: str, path: str = p.TOKEN_GET_PATH, previous: str | None = None) -> str:
    """A token from the simulator's token service (get, or refresh of `previous`)."""
    stamp = str(time.time_ns() // 1000)  # microseconds: never a replay within one test
    encryption = token_encryption(APP_KEY, stamp, APP_SECRET)
    body = {"appKey": APP_KEY, "timestamp": stamp, "encryption": encryption}
    if previous is not None:
        body["accessToken"] = previous
    async with aiohttp.ClientSession() as session, session.post(url + path, json=body) as resp:
        answer = await resp.json()
    assert answer["status"] == 0, answer
    token: str = answer["data"]["accessToken"]
    return token


CANCEL = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000001")]


def test_quota_specs_and_windows() -> None:
    """Specs name known periods with a limit (and an optional length); windows align to the UTC
    second/minute/hour/day, the calendar month and year, or the shortened length."""
    assert parse_quota("second=100, minute=5000,DAY=2000/120") == (
        Rule("second", 100),
        Rule("minute", 5000),
        Rule("day", 2000, 120.0),
    )
    assert parse_quota("") == ()
    for bad in ("week=3", "second=x", "second=1,second=2", "day=5/0", "minute=-1"):
        with pytest.raises(ValueError, match="quota"):
            parse_quota(bad)
    moment = T0 + 86_400 * 20 + 3_725.5  # 2027-02-04 09:02:05.5 UTC
    assert window_bounds(Rule("second", 1), moment) == (moment - 0.5, moment + 0.5)
    assert window_bounds(Rule("minute", 1), moment) == (moment - 5.5, moment + 54.5)
    assert window_bounds(Rule("hour", 1), moment) == (moment - 125.5, moment + 3474.5)
    assert window_bounds(Rule("day", 1, 120.0), moment)[1] % 120 == 0
    start, end = window_bounds(Rule("month", 1), moment)
    assert datetime.fromtimestamp(start, UTC) == datetime(2027, 2, 1, tzinfo=UTC)
    assert datetime.fromtimestamp(end, UTC) == datetime(2027, 3, 1, tzinfo=UTC)
    december = datetime(2027, 12, 31, 23, 0, tzinfo=UTC).timestamp()
    new_year = datetime(2028, 1, 1, tzinfo=UTC).timestamp()
    assert window_bounds(Rule("month", 1), december)[1] == new_year
    assert window_bounds(Rule("year", 1), december)[1] == new_year


async def test_quota_windows_count_on_the_clock_and_refusals_do_not_count(
    timed: tuple[Simulator, str], clock: Clock
) -> None:
    """second=2,minute=3: two calls pass, the third in that second is refused with the rest of
    the second; a refused call does not count; the minute's spent calls are refused with the
    rest of the minute until the next UTC minute; every answer states both windows."""
    sim, url = timed
    sim.faults = Faults(quota="second=2,minute=3")
    token = await token_of(url)
    seen = []
    for _ in range(3):
        status, headers, _ = await call(url, token, CANCEL)
        second, minute = (headers[f"X-RateLimit-Remaining-{w}"] for w in ("Second", "Minute"))
        seen.append((status, second, minute, headers.get("Retry-After")))
    assert seen == [(200, "1", "2", None), (200, "0", "1", None), (429, "0", "1", "1")]
    assert headers["X-RateLimit-Limit-Second"] == "2"
    assert headers["X-RateLimit-Limit-Minute"] == "3"
    clock.now += 1.0
    status, headers, _ = await call(url, token, CANCEL)
    assert (status, headers["X-RateLimit-Remaining-Minute"]) == (200, "0")
    clock.now += 1.0  # 2.25 s into the minute
    status, headers, answer = await call(url, token, CANCEL)
    assert (status, headers["Retry-After"]) == (429, "58")
    assert answer == {"message": "API rate limit exceeded"}
    clock.now = T0 + 60.0
    assert (await call(url, token, CANCEL))[0] == 200
    assert sim.stats_snapshot()["quota_refused"] == 2


@pytest.mark.parametrize(
    ("family", "expected"),
    [
        ("ietf", {"RateLimit-Limit": "5", "RateLimit-Remaining": "2", "RateLimit-Reset": "60"}),
        ("none", {}),
    ],
)
async def test_quota_header_families(
    timed: tuple[Simulator, str], clock: Clock, family: str, expected: dict[str, str]
) -> None:
    """ietf states the window with the fewest calls left (Reset: whole seconds to its end);
    none states nothing; neither sends the X-RateLimit family."""
    sim, url = timed
    clock.now = T0 + 0.5
    sim.faults = Faults(quota="second=10,minute=5", quota_headers=family)
    token = await token_of(url)
    for _ in range(3):
        _, headers, _ = await call(url, token, CANCEL)
    stated = {k: v for k, v in headers.items() if "ratelimit" in k.lower()}
    assert stated == expected


@pytest.mark.parametrize(
    ("mode", "retry_after"), [("exact", "3597"), ("absent", None), ("capped", "2")]
)
async def test_retry_after_modes(
    timed: tuple[Simulator, str], clock: Clock, mode: str, retry_after: str | None
) -> None:
    """exact: the rest of the spent window (an hour here), rounded up; absent: none; capped: at
    most retry_after_s."""
    sim, url = timed
    clock.now = T0 + 3.5
    sim.faults = Faults(quota="hour=1", quota_retry_after=mode, retry_after_s=2)
    token = await token_of(url)
    assert (await call(url, token, CANCEL))[0] == 200
    status, headers, _ = await call(url, token, CANCEL)
    assert (status, headers.get("Retry-After")) == (429, retry_after)


async def test_quota_is_set_over_http_and_checked(timed: tuple[Simulator, str]) -> None:
    """POST /_sim/faults sets the quota; a spec naming no window is refused (400) and the
    faults stay as they were."""
    sim, url = timed
    async with aiohttp.ClientSession() as session:
        async with session.post(url + "/_sim/faults", json={"quota": "minute=7"}) as resp:
            assert resp.status == 200
        assert sim.faults.quota == "minute=7"
        for bad in ({"quota": "fortnight=3"}, {"quota_headers": "x"}, {"quota": 5}):
            async with session.post(url + "/_sim/faults", json=bad) as resp:
                assert resp.status == 400
    assert sim.faults.quota == "minute=7"
    with pytest.raises(ValueError, match="quota"):
        Simulator(apps={}, faults=Faults(quota="second"))


async def test_a_504_after_the_effect(timed: tuple[Simulator, str]) -> None:
    """late_504_rate 1: the cancel takes effect, the answer is HTTP 504 (retryable, maybe
    applied); the next call finds nothing left to cancel."""
    sim, url = timed
    sim.faults = Faults(late_504_rate=1.0)
    async with EnOSClient(url, Credentials(APP_KEY, APP_SECRET), timeout=2.0) as client:
        with pytest.raises(RetryableError) as lost:
            await client.cancel(Target(org_id=ORG, asset_id="as000001"))
        assert (lost.value.http_status, lost.value.maybe_applied) == (504, True)
        device = sim.store.find(ORG, "as000001", None, None)
        assert device is not None
        assert device.pending(sim.store.now_ms()) == []
        sim.faults = Faults()
        reply = await client.cancel(Target(org_id=ORG, asset_id="as000001"))
    assert reply.commands == ()


async def test_search_lags_state_changes(timed: tuple[Simulator, str], clock: Clock) -> None:
    """search_lag_s 2: right after a cancel a search still shows the commands cached (state 1);
    2 s later it shows them cancelled; a command created within the lag is not shown yet."""
    sim, url = timed
    sim.faults = Faults(search_lag_s=2.0)
    target = Target(org_id=ORG, asset_id="as000002")
    async with EnOSClient(url, Credentials(APP_KEY, APP_SECRET), timeout=2.0) as client:
        before = await client.search_commands(target, p.PENDING_EXPRESSION)
        assert len(before) == 3
        cancelled = await client.cancel(target)
        assert len(cancelled.commands) == 3
        assert len(await client.search_commands(target, p.PENDING_EXPRESSION)) == 3
        clock.now += 1.0
        assert len(await client.search_commands(target, p.PENDING_EXPRESSION)) == 3
        clock.now += 1.0
        assert await client.search_commands(target, p.PENDING_EXPRESSION) == []
        states = {c.state for c in await client.search_commands(target, None)}
        assert states == {p.CommandState.CANCELED, p.CommandState.SUCCEEDED}
        token = await token_of(url)
        create = [("action", "invokeService"), ("orgId", ORG), ("assetId", "as000002")]
        create += [("serviceId", "restart"), ("pendingTtl", "600")]
        assert (await call(url, token, create, body=b"{}"))[2]["code"] == 0
        assert await client.search_commands(target, p.PENDING_EXPRESSION) == []
        clock.now += 2.0
        assert len(await client.search_commands(target, p.PENDING_EXPRESSION)) == 1


async def test_refresh_revokes_the_earlier_token(timed: tuple[Simulator, str]) -> None:
    """refresh_revokes: after one process refreshes, the token another process holds is
    refused (401); token/get gives the app's current token, and the other client, renewing
    once on the 401, goes on with it."""
    sim, url = timed
    sim.faults = Faults(refresh_revokes=True)
    async with EnOSClient(url, Credentials(APP_KEY, APP_SECRET), timeout=2.0) as other:
        await other.cancel(Target(org_id=ORG, asset_id="as000003"))
        first = await token_of(url)  # the same token: get returns the current valid one
        assert other._token is not None
        assert other._token.value == first
        renewed = await token_of(url, p.TOKEN_REFRESH_PATH, previous=first)
        assert renewed != first
        assert (await call(url, first, CANCEL))[0] == 401
        assert await token_of(url) == renewed
        rejected = sim.stats.rejected_auth
        await other.cancel(Target(org_id=ORG, asset_id="as000004"))
        assert other._token.value == renewed
    assert sim.stats.rejected_auth == rejected + 1
