"""The signing functions reproduce the documented and recomputed vectors (enos-api.md §3.4)."""

from __future__ import annotations

import pytest

from worker.enos.signing import canonical_params, request_signature, token_encryption

TOKEN = "xxxxaaaxxxx"
SECRET = "xxxappSecretxxx"
TS = "1572574909697"
ORG = "o15541858646501"


def _doc_body(desc: str) -> bytes:
    return ('{\n  "count": 20,\n  "page": 1,\n  "desc": "' + desc + '"\n}').encode()


@pytest.mark.parametrize(
    ("desc", "digest"),
    [
        ("描述", "59828328f6c1f9771015dc74e4929ae30f518a35a3d2353972c2ea46556fc981"),
        ("description", "ad6dc6fc97f4290f3724e94eab38168d8613c41c3a4569b4b8b0efbce96a816c"),
        ("Description", "01585cdfb5f355f29eb74c7285c6ba457f45783c39bc496062823341d50a03c7"),
    ],
)
def test_documentation_example(desc: str, digest: str) -> None:
    """The doc's example (query in any order, indented JSON body) signs to the doc's digest."""
    params = [("k3", "v3"), ("k1", "v1"), ("k2", "v2")]
    assert request_signature(TOKEN, params, _doc_body(desc), TS, SECRET) == digest


def test_cancel_one_vector() -> None:
    """Cancel with a commandId: `action` is signed with the other params, sorted by key."""
    params = [
        ("action", "cancel"),
        ("orgId", ORG),
        ("productKey", "bXuuAiku"),
        ("deviceKey", "mqtt_01"),
        ("commandId", "2278935391225618432"),
    ]
    assert canonical_params(params) == (
        "actioncancelcommandId2278935391225618432deviceKeymqtt_01orgIdo15541858646501"
        "productKeybXuuAiku"
    )
    assert request_signature(TOKEN, params, b"", TS, SECRET) == (
        "86dd6a48914e8cbfabbedd26854f11354a3e9ea85be135e32b17f9b0ea1bb069"
    )


def test_cancel_all_vector() -> None:
    """Cancel without a commandId."""
    params = [
        ("action", "cancel"),
        ("orgId", ORG),
        ("productKey", "bXuuAiku"),
        ("deviceKey", "mqtt_01"),
    ]
    assert request_signature(TOKEN, params, b"", TS, SECRET) == (
        "29e26d2a5f7ae361ad547d7c69ed2b2edca0a2246d6bb50c7ac2f4c0072da749"
    )


def test_search_vector() -> None:
    """Search: the compact JSON body is appended byte for byte."""
    params = [("action", "search"), ("orgId", ORG), ("assetId", "sxH2DD6f")]
    body = b'{"expression":"state = 1","pagination":{"pageNo":1,"pageSize":50}}'
    assert request_signature(TOKEN, params, body, TS, SECRET) == (
        "cc9d813166f54513fb9eb6368e82ec4b7891a10070499f7ac99978e88a551446"
    )


def test_token_encryption_vector() -> None:
    """The token request's encryption is sha256(appKey + timestamp + appSecret)."""
    assert token_encryption("5acb82e7-a11e-4300-9164-c8b20b638e8b", TS, SECRET) == (
        "83e2f674e53f1a71943b6c5fc9bd0eb27864c83075af8b4bf528f3faa8c7ca38"
    )


def test_uppercase_keys_sort_first() -> None:
    """Byte order: uppercase letters sort before lowercase ones."""
    assert canonical_params([("b", "1"), ("B", "2"), ("a", "3")]) == "B2a3b1"
