"""Resolving a ``targets_query:``: Search Device paged through until every device it selects is
found, or it is said that they were not.

Search Device's pagination is random: the pages of one pass may overlap or miss devices, and
the fleet may change while they are read. So each search (one per product key) is paged with
pages as large as the gateway takes (halved while it answers 99400 or an answer outgrows the
cap), every device is deduplicated by a 16-byte digest, and the distinct count is compared with
the ``totalSize`` the gateway says. A search is complete when one pass of it, whose pages all
said the same total T, saw T distinct devices by itself, or when every page of every pass said
the same T and the devices found add up to T. Otherwise it is paged again, at most MAX_PASSES
times and no longer once a pass finds nothing new. What was found is written as it arrives
(:class:`~worker.store.snapshot.SnapshotWriter`); whether it is complete is for the caller to
act on.

Every call takes a slot of the run's limiter and goes through the run's retry policy; each is
told to `on_call` (the run writes it to the audit as ``search_devices``).
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import structlog

from worker.core.calls import unreadable_text
from worker.core.ratelimit import RateLimiter
from worker.core.retry import Retrying, RetryPolicy, Verdict
from worker.core.stops import heard
from worker.enos import protocol as p
from worker.enos.devices import DevicePage, FoundDevice
from worker.errors import (
    EnOSError,
    OversizedAnswerError,
    TargetError,
)
from worker.model import Decided, Shard, identity_key, key_digest
from worker.store.appendlog import iso
from worker.store.records import AttemptRecord, QueryPart
from worker.store.snapshot import SnapshotWriter

log = structlog.get_logger("worker.query")
MAX_PASSES = 5


class DeviceSearch(Protocol):
    """What resolving needs of a client: one page of Search Device."""

    async def search_devices(
        self, org_id: str, expression: str, page: int, page_size: int
    ) -> DevicePage:
        """The devices of `org_id` matching `expression`, page `page` of `page_size`."""
        ...


class ResolveStopped(Exception):
    """The resolution cannot go on: a page could not be had (`fatal`: nothing will work, the
    run stops as for any fatal answer)."""

    def __init__(self, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class _Smaller(Exception):
    """The page size was halved: the pass starts again (its page boundaries moved)."""


@dataclass
class Resolution:
    """What a resolution found, and how."""

    parts: list[QueryPart] = field(default_factory=list)
    found: int = 0  # distinct devices
    kept: int = 0  # written (the shard's)
    calls: int = 0  # search calls sent, retries included
    page_size: int = p.DEVICE_PAGE_SIZE_START
    by_label: Counter[tuple[str, str]] = field(default_factory=Counter)  # (product, status)
    stopped: str | None = None  # why it ended before every search was done
    fatal: bool = False

    @property
    def total(self) -> int:
        """The devices the gateway counts: every search's last totalSize, added up."""
        return sum(part["total"] or 0 for part in self.parts)

    @property
    def pages(self) -> int:
        """Pages answered."""
        return sum(part["pages"] for part in self.parts)

    @property
    def passes(self) -> int:
        """The most passes a search needed."""
        return max((part["passes"] for part in self.parts), default=0)

    def complete(self, searches: int) -> bool:
        """Every one of the `searches` was paged through and found complete."""
        done = len(self.parts) == searches and all(part["complete"] for part in self.parts)
        return self.stopped is None and done

    def shortfall(self) -> str:
        """The sentence an incomplete resolution ends with."""
        words = f"found {self.found:,} of {self.total:,} devices after {self.passes} passes"
        short = [
            f"{part['expression']}: {part['found']:,} of {part['total'] or 0:,}"
            for part in self.parts
            if not part["complete"]
        ][:3]
        return words + (f" ({'; '.join(short)})" if short else "")


class Resolver:
    """Pages a query's searches into a snapshot; one per resolution."""

    def __init__(
        self,
        search: DeviceSearch,
        limiter: RateLimiter,
        policy: RetryPolicy,
        sink: SnapshotWriter,
        *,
        org_id: str,
        shard: Shard | None = None,
        command_id: str | None = None,
        on_call: Callable[[AttemptRecord], None] | None = None,
        rng: random.Random | None = None,
        max_passes: int = MAX_PASSES,
        page_size: int = p.DEVICE_PAGE_SIZE_START,
        stopping: Callable[[], bool] = lambda: False,
        heard: Callable[[EnOSError], EnOSError] | None = None,
    ) -> None:
        self._search = search
        self._limiter = limiter
        self._policy = policy
        self._sink = sink
        self._org = org_id
        self._shard = shard
        self._command = command_id
        self._on_call = on_call
        self._rng = rng or random.Random()
        self._max_passes = max_passes
        self._stopping = stopping  # the run stops (the watcher): no further call
        self._heard = heard or self._heard_alone  # as the run's engine hears its own calls
        self._seen: set[int] = set()  # every device found: 16-byte digests
        self.result = Resolution(page_size=page_size)

    async def resolve(self, expressions: list[str]) -> Resolution:
        """Page every search; the result says what was found and whether it is complete (a
        stop is recorded in it, not raised)."""
        result = self.result
        try:
            for expression in expressions:
                own = self._seen if len(expressions) == 1 else set()
                await self._search_all(expression, own)
        except ResolveStopped as stop:
            result.stopped, result.fatal = str(stop), stop.fatal
        finally:  # also when cut short: the digests (16 bytes a device) are not needed after
            result.found, self._seen = len(self._seen), set()
        return result

    async def _search_all(self, expression: str, found: set[int]) -> None:
        """One search, paged until complete, stuck, or out of passes (its part of the result
        is there from the start: a stop leaves what it had)."""
        part: QueryPart = {
            "expression": expression,
            "total": None,
            "totals": [],
            "found": 0,
            "passes": 0,
            "pages": 0,
            "complete": False,
        }
        self.result.parts.append(part)
        for _ in range(self._max_passes):
            part["passes"] += 1
            grew, seen, totals = await self._pass(expression, part, found)
            total = part["total"]
            if len(totals) == 1 and (
                seen == total or (len(part["totals"]) == 1 and len(found) == total)
            ):
                part["complete"] = True
                break
            if part["passes"] > 1 and not grew:
                break  # a pass found nothing new: more passes would not either
            part["found"] = len(found)
        part["found"] = len(found)
        log.info(
            "worker.query_searched",
            expression=expression,
            total=part["total"],
            found=part["found"],
            passes=part["passes"],
            complete=part["complete"],
        )

    async def _pass(
        self, expression: str, part: QueryPart, found: set[int]
    ) -> tuple[bool, int, set[int]]:
        """Every page once: (whether it found a new device, the distinct devices it saw, the
        totals its pages said). Starts again when the page size changes."""
        while True:
            try:
                return await self._pages(expression, part, found)
            except _Smaller:
                continue

    async def _pages(
        self, expression: str, part: QueryPart, found: set[int]
    ) -> tuple[bool, int, set[int]]:
        seen: set[int] = set()
        totals: set[int] = set()
        grew, page, size = False, 1, self.result.page_size
        while True:
            answer = await self._page(expression, page, size)
            part["pages"] += 1
            part["total"] = answer.total
            totals.add(answer.total)
            if answer.total not in part["totals"]:
                part["totals"].append(answer.total)
            for device in answer.devices:
                grew = self._take(device, seen, found) or grew
            self._sink.flush()  # the page's new devices, on disk as they came
            if page * size >= answer.total:
                return grew, len(seen), totals
            page += 1

    def _take(self, device: FoundDevice, seen: set[int], found: set[int]) -> bool:
        """Count a listed device; a new one is written (in the shard). True when it is new to
        this search."""
        digest = key_digest(identity_key(self._org, device.asset_id, None, None, None))
        seen.add(digest)
        if digest in found:
            return False
        found.add(digest)
        if found is not self._seen:
            if digest in self._seen:
                return True
            self._seen.add(digest)
        self.result.by_label[(device.product_key, device.status)] += 1
        if self._in_shard(device.asset_id, digest):
            self._sink.add(device.asset_id, self._org)
            self.result.kept += 1
        return True

    def _in_shard(self, asset_id: str, digest: int) -> bool:
        """Whether the device's target falls in this shard: the same hash as any target's
        (its identity, the job's command id included)."""
        if self._shard is None:
            return True
        if self._command is not None:
            digest = key_digest(identity_key(self._org, asset_id, None, None, self._command))
        return self._shard.holds(digest)

    async def _page(self, expression: str, page: int, size: int) -> DevicePage:
        """One page, through the limiter and the retry policy; raises _Smaller after halving
        the page size, ResolveStopped when the page cannot be had."""
        retrying = Retrying(self._policy)
        call = _Call(expression, page, size)
        while True:
            if self._stopping():
                raise ResolveStopped("the run is stopping")
            await self._limiter.acquire()
            self.result.calls += 1
            call.number += 1
            call.began = time.perf_counter()
            try:
                answer = await self._search.search_devices(self._org, expression, page, size)
            except EnOSError as error:
                wait_s = self._after_error(error, call, retrying)
                if self._stopping():  # e.g. a quota wait that does not fit the run
                    raise ResolveStopped("the run is stopping") from None
                await anyio.sleep(wait_s)
                continue
            except Exception as exc:  # the client failed on an answer: a bug, said, not hidden
                log.exception("worker.unreadable_answer", expression=expression)
                text = unreadable_text(exc)
                self._record(call, Decided.FAILED, text=text)
                raise ResolveStopped(f"page {page} of the search {expression!r}: {text}") from None
            self._limiter.accepted()
            if answer.budget is not None:
                self._limiter.budget(answer.budget)
            self._record(call, Decided.DONE, request=answer.request_id)
            return answer

    def _after_error(self, error: EnOSError, call: _Call, retrying: Retrying) -> float:
        """What a failed page call leads to: halve the pages (_Smaller), wait (the seconds
        returned), or stop (ResolveStopped). The limiter hears it as the engine's calls do."""
        size = call.size
        if _too_large(error, call.page) and size > p.DEVICE_PAGE_SIZE_MIN:
            self._limiter.accepted()
            self._record(call, Decided.RETRY, failure=error)
            self.result.page_size = max(p.DEVICE_PAGE_SIZE_MIN, size // 2)
            log.info("worker.query_page_size", from_size=size, to_size=self.result.page_size)
            raise _Smaller
        error = self._heard(error)
        decision = retrying.failed(error, self._rng)
        if decision.verdict in (Verdict.RETRY, Verdict.THROTTLED):
            throttled = decision.verdict is Verdict.THROTTLED
            word = Decided.THROTTLED if throttled else Decided.RETRY
            self._record(call, word, failure=error, wait=decision.wait_s)
            return decision.wait_s or 0.0
        fatal = decision.verdict is Verdict.FATAL
        self._record(call, Decided.FATAL if fatal else Decided.FAILED, failure=error)
        raise ResolveStopped(
            f"page {call.page} of the search {call.expression!r} could not be had: {error}",
            fatal=fatal,
        )

    def _heard_alone(self, error: EnOSError) -> EnOSError:
        """Without a run (worker resolve): the limiter hears the failed call, no quota watch."""
        heard(self._limiter, error)
        return error

    def _record(
        self,
        call: _Call,
        decision: Decided,
        *,
        failure: EnOSError | None = None,
        text: str | None = None,
        request: str | None = None,
        wait: float | None = None,
    ) -> None:
        """Tell `on_call` of one call, as an audit attempt record (action search_devices)."""
        if self._on_call is None:
            return
        answered = failure is None and text is None
        record: AttemptRecord = {
            "type": "attempt",
            "at": iso(time.time()),
            "action": "search_devices",
            "org_id": self._org,
            "command_id": None,
            "attempt": call.number,
            "http_status": 200 if answered else failure.http_status if failure else None,
            "code": 0 if answered else failure.code if failure else None,
            "request_id": request if answered else failure.request_id if failure else None,
            "latency_ms": round((time.perf_counter() - call.began) * 1000, 2),
            "decision": decision.value,
            "wait_s": wait,
            "error": str(failure) if failure is not None else text,
            "subject": f"page {call.page} of {call.size}",
            "expression": call.expression,
        }
        self._on_call(record)


@dataclass
class _Call:
    """One page asked for: its attempts so far, and when the last one began."""

    expression: str
    page: int
    size: int
    number: int = 0
    began: float = 0.0


def _too_large(error: EnOSError, page: int) -> bool:
    """The answer outgrew the cap, or the gateway refuses the first page (99400): the page
    size is what it refuses. A later page refused is not about its size (that size was taken):
    it stops the search like any refusal."""
    if isinstance(error, OversizedAnswerError):
        return True
    return page == 1 and isinstance(error, TargetError) and error.code == p.CODE_INVALID_PARAM
