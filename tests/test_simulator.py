"""The simulator as a gateway: token rules, validation, command creation, search, seeding."""

from __future__ import annotations

import time
from typing import Any

import aiohttp
import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET, ORG
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.enos.signing import request_signature, token_encryption
from worker.model import Target
from worker.sim.expression import ExpressionError, parse_expression
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator
from worker.sim.state import SimCommand

pytestmark = pytest.mark.anyio


async def token_call(gateway: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """POST a token request, return the JSON answer."""
    async with aiohttp.ClientSession() as session, session.post(gateway + path, json=body) as resp:
        result: dict[str, Any] = await resp.json()
        return result


def token_body(timestamp: int, secret: str = APP_SECRET, key: str = APP_KEY) -> dict[str, Any]:
    """A token request body signed with `secret`."""
    stamp = str(timestamp)
    return {"appKey": key, "encryption": token_encryption(key, stamp, secret), "timestamp": stamp}


async def test_token_rules(gateway: str) -> None:
    """1202 empty, 1002 unknown app, 1003 bad encryption, 1001 replay, same token while valid,
    refresh issues a new one, 1204 for an unknown token."""
    now = int(time.time() * 1000)
    assert (await token_call(gateway, p.TOKEN_GET_PATH, {"appKey": APP_KEY}))["status"] == 1202
    assert (await token_call(gateway, p.TOKEN_GET_PATH, token_body(now, key="x")))["status"] == 1002
    bad = token_body(now, secret="wrong")
    assert (await token_call(gateway, p.TOKEN_GET_PATH, bad))["status"] == 1003
    first = await token_call(gateway, p.TOKEN_GET_PATH, token_body(now))
    assert (first["status"], first["data"]["expire"]) == (0, 7200)
    assert (await token_call(gateway, p.TOKEN_GET_PATH, token_body(now)))["status"] == 1001
    again = await token_call(gateway, p.TOKEN_GET_PATH, token_body(now + 1))
    assert again["data"]["accessToken"] == first["data"]["accessToken"]
    refresh = {**token_body(now + 2), "accessToken": first["data"]["accessToken"]}
    renewed = await token_call(gateway, p.TOKEN_REFRESH_PATH, refresh)
    assert renewed["data"]["accessToken"] != first["data"]["accessToken"]
    unknown = {**token_body(now + 3), "accessToken": "nope"}
    assert (await token_call(gateway, p.TOKEN_REFRESH_PATH, unknown))["status"] == 1204


async def signed(
    client: EnOSClient, gateway: str, method: str, query: list[tuple[str, str]], body: bytes = b""
) -> tuple[int, dict[str, Any]]:
    """A hand-signed business call with the client's token."""
    await client.authenticate()
    assert client._token is not None
    token = client._token.value
    stamp = str(int(time.time() * 1000))
    signature = request_signature(token, query, body, stamp, APP_SECRET)
    headers = {p.HEADER_TOKEN: token, p.HEADER_TIMESTAMP: stamp, p.HEADER_SIGNATURE: signature}
    async with (
        aiohttp.ClientSession() as session,
        session.request(
            method, gateway + p.COMMANDS_PATH, params=query, data=body or None, headers=headers
        ) as resp,
    ):
        return resp.status, orjson.loads(await resp.read())


async def test_validation_codes(sim: Simulator, client: EnOSClient, gateway: str) -> None:
    """Missing action or org, no selector, unknown org, unknown command: 99400/99404."""
    cases = [
        ([("orgId", ORG), ("assetId", "as000001")], 99400),
        ([("action", "cancel"), ("assetId", "as000001")], 99400),
        ([("action", "cancel"), ("orgId", ORG)], 99400),
        ([("action", "cancel"), ("orgId", "o1"), ("assetId", "as000001")], 99400),
        ([("action", "cancel"), ("orgId", ORG), ("assetId", "zz")], 99404),
        ([("action", "nope"), ("orgId", ORG), ("assetId", "as000001")], 99400),
    ]
    for query, code in cases:
        status, answer = await signed(client, gateway, "POST", query)
        assert (status, answer["code"], answer["data"]) == (200, code, None), query
    get = [("action", "get"), ("orgId", ORG), ("assetId", "as000001"), ("commandId", "1")]
    assert (await signed(client, gateway, "GET", get))[1]["code"] == 99404
    sim.faults = Faults(require_command_id=True)
    cancel_all = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000001")]
    assert (await signed(client, gateway, "POST", cancel_all))[1]["code"] == 99400


async def test_asset_lists_in_each_mode(sim: Simulator, client: EnOSClient, gateway: str) -> None:
    """off: the list is one unknown id; strict: an unknown id fails all, no effect; lenient:
    ignored; first: only the first acted on; lists only for cancel, by asset, up to max."""
    listed = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000001,as000002,zz")]

    async def cancel(query: list[tuple[str, str]], method: str = "POST") -> dict[str, Any]:
        return (await signed(client, gateway, method, query))[1]

    assert (await cancel(listed))["code"] == 99404  # off, the default
    sim.faults = Faults(multi_asset="strict")
    assert (await cancel(listed))["code"] == 99404
    assert sim.store.find(ORG, "as000001", None, None).cancel_calls == 0  # type: ignore[union-attr]
    sim.faults = Faults(multi_asset="lenient")
    answer = await cancel(listed)
    assert answer["code"] == 0
    assert {c["assetId"] for c in answer["data"]} == {"as000001", "as000002"}
    sim.faults = Faults(multi_asset="first", max_assets=2)
    assert (await cancel(listed))["code"] == 99400  # three ids, two allowed
    two = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000005,as000004")]
    assert {c["assetId"] for c in (await cancel(two))["data"]} == {"as000005"}
    ignored = sim.store.find(ORG, "as000004", None, None)
    assert ignored is not None
    assert any(c.state == 1 for c in ignored.commands.values())
    search = [("action", "search"), ("orgId", ORG), ("assetId", "as000003,as000004")]
    assert (await cancel(search))["code"] == 99400
    one = [*two, ("commandId", "1")]
    assert (await cancel(one))["code"] == 99400


async def test_command_creation_and_cache_limit(client: EnOSClient, gateway: str) -> None:
    """invokeService caches commands up to 50 per device, then 11902; an instant one fails."""
    device = [("orgId", ORG), ("assetId", "as000002")]
    body = orjson.dumps({"inputData": {"speed": 3}})
    created = 0
    for _ in range(60):
        query = [
            ("action", "invokeService"),
            *device,
            ("serviceId", "restart"),
            ("pendingTtl", "600"),
        ]
        _, answer = await signed(client, gateway, "POST", query, body)
        if answer["code"] != 0:
            assert answer["code"] == p.CODE_CACHE_FULL
            break
        created += 1
    pending = await client.search_commands(Target(org_id=ORG, asset_id="as000002"), "state = 1")
    assert len(pending) == 50
    assert created == 50 - 3  # the device was seeded with 3
    instant = [("action", "invokeService"), *device, ("serviceId", "x"), ("pendingTtl", "0")]
    assert (await signed(client, gateway, "POST", instant, body))[1]["code"] == 11900
    bad_ttl = [("action", "setMeasurepoint"), *device, ("pendingTtl", "172801")]
    assert (await signed(client, gateway, "POST", bad_ttl, body))[1]["code"] == 99400


async def test_rate_cap_answers_429_with_retry_after(
    sim: Simulator, client: EnOSClient, gateway: str
) -> None:
    """Above the cap within one second: HTTP 429."""
    sim.faults = Faults(rate_cap=2, retry_after_s=2)
    query = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000003")]
    statuses = [(await signed(client, gateway, "POST", query))[0] for _ in range(3)]
    assert statuses[-1] == 429


async def test_throttle_next_answers_exactly_that_many_429s(
    sim: Simulator, client: EnOSClient, gateway: str
) -> None:
    """throttle_next N: the next N business calls get 429, the ones after are served."""
    sim.faults = Faults(throttle_next=2)
    query = [("action", "cancel"), ("orgId", ORG), ("assetId", "as000003")]
    statuses = [(await signed(client, gateway, "POST", query))[0] for _ in range(4)]
    assert statuses == [429, 429, 200, 200]


def command(state: int, name: str = "restart", created: str = "2020-01-01 00:00:00") -> SimCommand:
    """A command for expression tests."""
    stamp = int(time.mktime(time.strptime(created, "%Y-%m-%d %H:%M:%S")) - time.timezone) * 1000
    return SimCommand("1", state, stamp, identifier=name)


@pytest.mark.parametrize(
    ("expression", "matches"),
    [
        ("state = 1", [True, False, False]),
        ("state != 1", [False, True, True]),
        ("state in (1, 5)", [True, False, True]),
        ("state = 2 or state = 5", [False, True, True]),
        ("commandName.en_US like 'rest' and state = 1", [True, False, False]),
        ("commandName.zh_CN like '中文-REST'", [True, False, False]),
        ("commandName.fr_FR like 'rest'", [False, False, False]),
        ("createTime < '2021-01-01 00:00:00'", [True, True, False]),
        ("createTime >= '2021-01-01 00:00:00' AND state = 5", [False, False, True]),
    ],
)
def test_search_expressions(expression: str, matches: list[bool]) -> None:
    """The documented expression grammar: =, !=, in, like, createTime comparisons, and/or."""
    commands = [command(1), command(2, "stop"), command(5, "stop", "2022-06-01 10:00:00")]
    predicate = parse_expression(expression)
    assert [predicate(c) for c in commands] == matches


@pytest.mark.parametrize(
    "expression", ["state", "state = 1 and", "colour = 'red'", "createTime < 'yesterday'"]
)
def test_bad_expressions_are_refused(expression: str) -> None:
    """An expression the service cannot read is a 99400, not a crash."""
    with pytest.raises(ExpressionError):
        parse_expression(expression)


def test_seeding_from_targets() -> None:
    """Every target of a job exists afterwards, with its command id cached."""
    sim = Simulator(apps={APP_KEY: APP_SECRET}, devices=0, commands=2)
    targets = [
        Target(org_id="o9", asset_id="A1", command_id="42"),
        Target(org_id="o9", product_key="pk", device_key="dk"),
    ]
    assert sim.store.seed_targets(targets) == 2
    first = sim.store.find("o9", "A1", None, None)
    second = sim.store.find("o9", None, "pk", "dk")
    assert first is not None
    assert second is not None
    assert first.commands["42"].state == 1
    assert len(second.pending(sim.store.now_ms())) == 2
