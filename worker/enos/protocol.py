"""The EnOS API's facts in one place, shared by the client and the simulator.

Everything here comes from EnOS's public API documentation (the Connection Service and APIM
token pages); when a fact changes, it changes here only.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Final

TOKEN_GET_PATH: Final = "/apim-token-service/v2.0/token/get"
TOKEN_REFRESH_PATH: Final = "/apim-token-service/v2.0/token/refresh"
COMMANDS_PATH: Final = "/connect-service/v2.1/commands"
DEVICES_PATH: Final = "/connect-service/v2.1/devices"  # Search Device (enos-api.md §2.3a)

ACTION_CANCEL: Final = "cancel"
ACTION_GET: Final = "get"
ACTION_SEARCH: Final = "search"
ACTION_INVOKE_SERVICE: Final = "invokeService"
ACTION_SET_MEASUREPOINT: Final = "setMeasurepoint"

HEADER_TOKEN: Final = "apim-accesstoken"
HEADER_SIGNATURE: Final = "apim-signature"
HEADER_TIMESTAMP: Final = "apim-timestamp"
JSON_CONTENT_TYPE: Final = "application/json;charset=UTF-8"

# Business envelope `code` values (enos-api.md §5.1, §2.3).
CODE_OK: Final = 0
CODE_INVALID_PARAM: Final = 99400
CODE_NO_PERMISSION: Final = 99403
CODE_NOT_FOUND: Final = 99404
CODE_INTERNAL: Final = 99500
CODE_CACHE_FULL: Final = 11902

# Token service `status` values (enos-api.md §3.2).
TOKEN_OK: Final = 0
TOKEN_REPLAYED: Final = 1001
TOKEN_UNKNOWN_APP: Final = 1002
TOKEN_BAD_ENCRYPTION: Final = 1003
TOKEN_INVALID_PARAM: Final = 1004
TOKEN_INTERNAL: Final = 1005
TOKEN_EMPTY_PARAM: Final = 1202
TOKEN_EXPIRED: Final = 1203
TOKEN_REFRESH_FAILED: Final = 1204

# Search Command for a device's cached commands. A selective target's search is not narrowed by
# name: a device caches at most 50 commands (one page of 50 either way), and the full list tells
# the operator which commands were kept; the exact filter is Match.matches.
PENDING_EXPRESSION: Final = "state = 1"

# Search Device (targets_query:). Only these fields are asked for: never `deviceSecret`, the
# device's connection key, which the gateway returns unless a projection leaves it out. The
# order is random ("random pagination"); the default page size is 10, and no maximum is
# documented: a search starts with large pages and halves them while the gateway refuses
# (99400) or the answer outgrows the cap. A product holds at most 10,000 devices.
DEVICE_PROJECTION: Final = ("assetId", "orgId", "productKey", "status")
DEVICE_PAGE_SIZE_START: Final = 1000
DEVICE_PAGE_SIZE_MIN: Final = 10
MAX_DEVICES_PER_PRODUCT: Final = 10_000

TOKEN_LIFETIME_S: Final = 7200
MAX_CACHED_COMMANDS: Final = 50
MAX_PENDING_TTL_S: Final = 172_800
SEARCH_PAGE_SIZE: Final = 50
# The commands one device's search reads at the most: three pages of 50. A device caches at most
# MAX_CACHED_COMMANDS, so its `state = 1` commands fit one page; two more are the margin for
# commands cached while the pages are read. An answer that asks for more is an error on that
# target (answers.search_page), not a loop.
MAX_SEARCH_COMMANDS: Final = 3 * SEARCH_PAGE_SIZE

CODE_MEANINGS: Final = {
    "99400": "invalid parameter (a malformed id, an unknown org)",
    "99403": "no permission (the application lacks Asset Control on the org)",
    "99404": "not found (no such device, or no such command)",
    "99500": "internal error of the service",
    "11902": "the device's command cache is full",
    "http_404": "no such API: --gateway is not the API gateway's base URL",
    "http_429": "rate limited",
    "transport": "no answer (timeouts, dropped connections, garbled bodies)",
}

GATEWAY_MESSAGES: Final = {
    401: "Invalid authentication credentials",
    403: "Your IP address is not allowed",
    429: "API rate limit exceeded",
    500: "An unexpected error occurred",
    502: "An invalid response was received from the upstream server",
    503: "Service unavailable",
    504: "The upstream server is timing out",  # the same gateway's stock text
}


class CommandState(IntEnum):
    """Command states 1..7; only CREATED (cached, not yet sent) can be cancelled."""

    CREATED = 1
    CANCELED = 2
    EXPIRED = 3
    RELEASED = 4
    SUCCEEDED = 5
    FAILED = 6
    TIMED_OUT = 7
