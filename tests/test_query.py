"""targets_query: the job file's key (in words, as sent, every refusal with file:line, field and
fix), and Search Device answers read on the wire (odd shapes unreadable, the secret never read)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import APP_KEY, APP_SECRET
from worker.enos import protocol as p
from worker.enos.client import EnOSClient
from worker.enos.devices import device_page
from worker.errors import JobFileError, TargetError
from worker.jobs.parse import load_job
from worker.jobs.query import describe, expressions
from worker.model import Credentials
from worker.sim.devices import device_secret
from worker.sim.faults import Faults
from worker.sim.simulator import Simulator, serve
from worker.sim.state import DEFAULT_ORG

HEAD = "version: 1\nname: q\norg_id: o1\n"


def write(tmp_path: Path, text: str) -> Path:
    """A job file in tmp_path."""
    path = tmp_path / "job.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_query_reads_in_words_and_as_sent(tmp_path: Path) -> None:
    """Every criterion becomes one condition, joined by and; one search per product key."""
    job = load_job(
        write(
            tmp_path,
            HEAD
            + "targets_query:\n"
            + "  product_key: [P1, P2]\n"
            + "  asset_id: [a1, a2]\n"
            + "  status: offline\n"
            + "  product_type: Device\n"
            + "  device_name: Turbine 7\n"
            + "  device_name_locale: en_US\n"
            + "command_id: '2278935391225618432'\n",
        )
    )
    query = job.query
    assert query is not None
    assert query.org_id == "o1"
    assert expressions(query) == [
        f"productKey = '{key}' and assetId in ('a1', 'a2') and status = 'offline' and "
        "productType = 'Device' and deviceName.en_US like 'Turbine 7'"
        for key in ("P1", "P2")
    ]
    words = describe(query)
    assert "of product P1 or P2" in words
    assert "whose status is offline" in words
    assert "as the gateway judges" in words
    assert job.command_id == "2278935391225618432"
    assert job.inline_targets == ()
    assert job.targets_file is None


def test_a_query_may_name_its_own_org_and_one_product(tmp_path: Path) -> None:
    """The query's org_id wins over the job's; a single product key is a list of one."""
    job = load_job(
        write(tmp_path, HEAD + "targets_query:\n  org_id: o2\n  product_key: P\n  status: online\n")
    )
    assert job.query is not None
    assert job.query.org_id == "o2"
    assert expressions(job.query) == ["productKey = 'P' and status = 'online'"]


@pytest.mark.parametrize(
    ("body", "where", "words"),
    [
        (
            'targets_query:\n  product_key: "bX\'uu"\n',
            "job.yaml:5: targets_query.product_key",
            "no way to escape",
        ),
        (
            "targets_query:\n  product_key: [ok, 'a\\b']\n",
            "job.yaml:5: targets_query.product_key",
            "no way to escape",
        ),
        (
            'targets_query:\n  device_name: "tab\\there"\n',
            "job.yaml:5: targets_query.device_name",
            "invisible character",
        ),
        ('targets_query:\n  device_name: "say \\"hi\\""\n', "device_name", "no way to escape"),
        ("targets_query:\n  status: sleeping\n", "job.yaml:5: targets_query.status", "online"),
        ("targets_query:\n  product_type: Sensor\n", "targets_query.product_type", "Gateway"),
        ("targets_query:\n  asset_id: a1\n", "targets_query.asset_id", "non-empty list"),
        ("targets_query:\n  asset_id: ['a,b']\n", "targets_query.asset_id", "comma"),
        ("targets_query:\n  product_key: [P, P]\n", "targets_query.product_key", "listed twice"),
        ("targets_query:\n  device_name_locale: en_US\n", "device_name_locale", "without"),
        (
            "targets_query:\n  device_name: x\n  device_name_locale: english\n",
            "device_name_locale",
            "not a locale",
        ),
        ("targets_query: {}\n", "job.yaml:4: targets_query", "names no criterion"),
        ("targets_query:\n  org_id: o2\n", "targets_query", "names no criterion"),
        ("targets_query:\n  bogus: 1\n", "targets_query.bogus", "unknown key"),
        (
            "targets_query: {product_key: P}\ntargets: [{asset_id: a}]\n",
            "job.yaml:4: targets_query",
            "given with targets or targets_file",
        ),
        (
            "targets_query: {product_key: P}\ntargets_file: t.csv\n",
            "targets_query",
            "keep the query, or the list",
        ),
        ("targets_query: [P]\n", "targets_query", "must be a mapping"),
    ],
)
def test_query_refusals_name_file_line_field(
    tmp_path: Path, body: str, where: str, words: str
) -> None:
    """Each bad query is refused before anything is sent, saying where, what and the fix; a
    quoted value is refused, never escaped on a guess."""
    (tmp_path / "t.csv").write_text("asset_id\na\n")
    with pytest.raises(JobFileError) as caught:
        load_job(write(tmp_path, HEAD + body))
    message = str(caught.value)
    assert where in message
    assert words in message


def test_a_query_needs_an_org(tmp_path: Path) -> None:
    """Without the job's org or its own, the query is refused."""
    with pytest.raises(JobFileError, match=r"targets_query: has no org_id"):
        load_job(write(tmp_path, "version: 1\ntargets_query: {status: online}\n"))


def _answer(data: Any, total: Any = 1) -> dict[str, Any]:
    return {"code": 0, "msg": "OK", "requestId": "r1", "data": data, "pagination": total}


GOOD = {"assetId": "as000001", "orgId": "o1", "productKey": "P", "status": "online"}


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        (_answer(None, {"totalSize": 0}), "'data' is not a list"),
        (_answer({"assetId": "a"}, {"totalSize": 1}), "'data' is not a list"),
        (_answer([GOOD, GOOD, GOOD], {"totalSize": 3}), "3 devices on a page of 2"),
        (_answer(["as000001"], {"totalSize": 1}), "a device is a str"),
        (_answer([{**GOOD, "assetId": None}], {"totalSize": 1}), "no assetId"),
        (_answer([{**GOOD, "assetId": "a,b"}], {"totalSize": 1}), "no assetId"),
        (_answer([{**GOOD, "assetId": "a\u202eb"}], {"totalSize": 1}), "no assetId"),
        (_answer([{**GOOD, "assetId": "x" * 200}], {"totalSize": 1}), "no assetId"),
        (_answer([{**GOOD, "orgId": "o2"}], {"totalSize": 1}), "another org"),
        (_answer([GOOD], None), "totalSize"),
        (_answer([GOOD], {"totalSize": "1"}), "totalSize"),
        (_answer([GOOD], {"totalSize": True}), "totalSize"),
        (_answer([GOOD], {"totalSize": -1}), "totalSize"),
        (_answer([GOOD], {"totalSize": 10**12}), "totalSize"),
    ],
)
def test_a_device_page_of_an_odd_shape_is_unreadable(payload: dict[str, Any], words: str) -> None:
    """Only the documented shape is read: anything else is an unreadable answer, never a
    shorter list of devices (which would make the count a lie)."""
    with pytest.raises(TargetError) as caught:
        device_page(payload, 2, "o1")
    assert words in str(caught.value)
    assert caught.value.request_id == "r1"


def test_a_device_page_reads_three_fields_and_never_the_secret() -> None:
    """The asset id, product key and status are kept (labels bounded); the device secret and
    everything else is not even read."""
    secret = "DSsecret-0123456789"
    item = {**GOOD, "deviceSecret": secret, "productKey": "P" * 500, "deviceName": {"x": 1}}
    page = device_page(_answer([item], {"totalSize": 7}), 10, "o1")
    assert page.total == 7
    (device,) = page.devices
    assert device.asset_id == "as000001"
    assert len(device.product_key) == 64
    assert secret not in repr(page)


@pytest.mark.anyio
async def test_search_devices_is_signed_and_asks_only_for_what_it_uses() -> None:
    """The call goes to .../devices?action=search&orgId=..., signed like every call (the
    simulator checks), with a projection that leaves the secret out; a secret the gateway
    sends anyway (leak_secrets) is dropped on reading."""
    sim = Simulator(
        apps={APP_KEY: APP_SECRET}, devices=40, seed=3, faults=Faults(leak_secrets=True)
    )
    seen: list[bytes] = []
    sent_back: list[Any] = []
    original = sim.devices.dispatch

    def spy(method: str, query: Any, body: bytes) -> Any:
        seen.append(body)
        sent_back.append(original(method, query, body))
        return sent_back[-1]

    sim.devices.dispatch = spy  # type: ignore[method-assign]
    async with (
        serve(sim) as url,
        EnOSClient(url, Credentials(APP_KEY, APP_SECRET)) as client,
    ):
        page = await client.search_devices(DEFAULT_ORG, "productKey = 'bXuuAiku'", 1, 4)
    assert sim.stats.rejected_auth == 0
    assert sim.stats.by_action == {"search_devices": 1}
    sent = orjson.loads(seen[0])
    assert sent == {
        "expression": "productKey = 'bXuuAiku'",
        "pagination": {"pageNo": 1, "pageSize": 4},
        "projection": list(p.DEVICE_PROJECTION),
    }
    assert [d.asset_id for d in page.devices] == ["as000000", "as000004", "as000008", "as000012"]
    assert page.total == 10
    assert sent_back[0][0][0]["deviceSecret"] == device_secret(3, 0)  # sent, whatever asked
    assert device_secret(3, 0) not in repr(page)
