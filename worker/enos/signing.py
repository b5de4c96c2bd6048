"""Pure functions for EnOS APIM authentication (enos-api.md §3.2-3.4): no I/O, no clock.

The caller supplies the timestamp, so the functions are tested on the documentation's vectors
and the simulator verifies with exactly the code the client signs with.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def token_encryption(app_key: str, timestamp_ms: str, app_secret: str) -> str:
    """The `encryption` field of a token request: sha256(appKey + timestamp + appSecret)."""
    return hashlib.sha256(f"{app_key}{timestamp_ms}{app_secret}".encode()).hexdigest()


def canonical_params(params: Iterable[tuple[str, str]]) -> str:
    """Decoded query parameters sorted by key (byte order), each as key+value, no separators."""
    return "".join(key + value for key, value in sorted(params, key=lambda kv: kv[0]))


def request_signature(
    access_token: str,
    params: Iterable[tuple[str, str]],
    body: bytes,
    timestamp_ms: str,
    app_secret: str,
) -> str:
    """The `apim-signature` header: sha256(token + sorted params + raw body + timestamp + secret).

    `params` are all query parameters of the URL, `action` included, with decoded values;
    `body` is the request body byte for byte as sent (empty when there is none).
    """
    digest = hashlib.sha256()
    digest.update((access_token + canonical_params(params)).encode())
    digest.update(body)
    digest.update((timestamp_ms + app_secret).encode())
    return digest.hexdigest()
