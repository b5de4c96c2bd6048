"""What the summary and the report count over a run's journal, as one declared fold.

:class:`Counts` holds every count: outcomes, errors, attempts, latencies, commands, outcomes by
org and product, the latency histogram, the failed and effect-unknown targets. Each field
declares how it is written into a checkpoint (its codec), so the checkpoint saves and restores
the fold whole: a counter added here is carried across a resume by construction, and a changed
structure changes :data:`LAYOUT`, which makes an older checkpoint ignored (the resume then
reads the journal).

:class:`JournalFold` is the fold in motion: a resume starts it while reading its done set (or
from the last checkpoint), the end of the segment finishes it with the lines it added.
"""

from __future__ import annotations

import base64
import hashlib
from array import array
from bisect import bisect_right
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from worker.model import JsonObject, Outcome, gc_paused, key_digest
from worker.store.done import done_record, line_flags
from worker.store.journal import JournalCursor, read_journal, record_key
from worker.store.layout import RunDir
from worker.store.records import FailedRow, ResultRecord

LISTED = 1000  # effect-unknown targets listed in full (failed ones are all kept: failed.csv)
LATENCY_EDGES_MS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
BY_ASSET = "(by asset id)"  # the product-key column of targets named by asset id


@dataclass(frozen=True)
class Codec:
    """How one field of :class:`Counts` goes into a checkpoint (JSON) and comes back."""

    name: str
    save: Callable[[Any], Any]
    load: Callable[[Any, Any], None]  # (the field's empty value, what was saved): fills it


def _fill_counter(empty: Counter[Any], saved: dict[str, int]) -> None:
    empty.update(saved)


def _fill_groups(empty: Counter[tuple[str, ...]], saved: list[list[Any]]) -> None:
    empty.update({tuple(item[:-1]): item[-1] for item in saved})


def _fill_array(empty: array[float], saved: str) -> None:
    empty.frombytes(base64.b64decode(saved))


def _fill_rows(empty: dict[int, FailedRow], saved: dict[str, FailedRow]) -> None:
    empty.update({int(digest, 16): row for digest, row in saved.items()})


def _fill_list(empty: list[Any], saved: list[Any]) -> None:
    empty[:] = saved


def _fill_dict(empty: JsonObject, saved: JsonObject) -> None:
    empty.update(saved)


COUNTER = Codec("counter", dict, _fill_counter)
GROUPS = Codec("groups", lambda c: [[*key, n] for key, n in c.items()], _fill_groups)
DOUBLES = Codec("doubles", lambda a: base64.b64encode(a.tobytes()).decode(), _fill_array)
ROWS = Codec("rows", lambda rows: {f"{d:032x}": row for d, row in rows.items()}, _fill_rows)
LIST = Codec("list", list, _fill_list)
DICT = Codec("dict", dict, _fill_dict)
NUMBER = Codec("number", int, lambda _empty, _saved: None)  # set directly, see Counts.restore


@dataclass
class Counts:
    """Everything counted over the journal; one line at a time through :meth:`add`."""

    outcomes: Counter[str] = field(default_factory=Counter, metadata={"codec": COUNTER})
    # failed targets by EnOS code, http_NNN or "transport"
    errors: Counter[str] = field(default_factory=Counter, metadata={"codec": COUNTER})
    attempts: int = field(default=0, metadata={"codec": NUMBER})
    effect_unknown: int = field(default=0, metadata={"codec": NUMBER})
    # each target's last latency, 8 bytes each: a million of them is 8 MB, not 32
    latencies: array[float] = field(default_factory=lambda: array("d"), metadata={"codec": DOUBLES})
    # cancelled command ids, and a selective run's matched, missed, kept
    commands: Counter[str] = field(default_factory=Counter, metadata={"codec": COUNTER})
    # identity key -> error label of a failed line: a --retry-failed line supersedes it
    failed_earlier: dict[str, str] = field(default_factory=dict, metadata={"codec": DICT})
    # (org, product key, outcome) -> targets
    groups: Counter[tuple[str, str, str]] = field(
        default_factory=Counter, metadata={"codec": GROUPS}
    )
    latency_histogram: list[int] = field(
        default_factory=lambda: [0] * (len(LATENCY_EDGES_MS) + 1), metadata={"codec": LIST}
    )
    # digest -> row of every failed target (failed.csv lists them all)
    failed: dict[int, FailedRow] = field(default_factory=dict, metadata={"codec": ROWS})
    # the first LISTED effect-unknown targets, and how many in all
    unknown: list[FailedRow] = field(default_factory=list, metadata={"codec": LIST})
    unknown_total: int = field(default=0, metadata={"codec": NUMBER})

    @property
    def finished(self) -> int:
        """Targets with a final result."""
        return sum(self.outcomes.values())

    @property
    def by_org(self) -> dict[str, Counter[str]]:
        """Outcomes by org."""
        return self._by(0)

    @property
    def by_product(self) -> dict[str, Counter[str]]:
        """Outcomes by product key (BY_ASSET for targets named by asset id)."""
        return self._by(1)

    def _by(self, part: int) -> dict[str, Counter[str]]:
        grouped: dict[str, Counter[str]] = {}
        for key, count in self.groups.items():
            if count:
                grouped.setdefault(key[part], Counter())[key[2]] += count
        return grouped

    def save(self) -> JsonObject:
        """The whole fold as JSON, for a checkpoint."""
        return {f.name: f.metadata["codec"].save(getattr(self, f.name)) for f in fields(self)}

    @classmethod
    def restore(cls, saved: JsonObject) -> Counts:
        """The fold a checkpoint saved (KeyError/ValueError/TypeError when it does not fit)."""
        counts = cls()
        for item in fields(cls):
            value = saved[item.name]
            if item.metadata["codec"] is NUMBER:
                setattr(counts, item.name, int(value))
            else:
                item.metadata["codec"].load(getattr(counts, item.name), value)
        return counts

    def add(self, record: ResultRecord) -> None:
        """Count one journal line (in journal order); a --retry-failed line supersedes the
        failed line of its target."""
        outcome = record["outcome"]
        failed = outcome == Outcome.FAILED
        key = record_key(record) if failed or self.failed_earlier else ""
        superseded = self.failed_earlier.pop(key, None) if self.failed_earlier else None
        if superseded is not None:
            _decrement(self.outcomes, Outcome.FAILED.value)
            _decrement(self.errors, superseded)
        self.outcomes[outcome] += 1
        self.attempts += record.get("attempts") or 0
        unknown = bool(record.get("effect_unknown"))
        self.effect_unknown += unknown
        self._add_commands(record)
        if failed:
            label = error_label(record)
            self.errors[label] += 1
            self.failed_earlier[key] = label
        latency = record.get("latency_ms")
        if type(latency) is float or type(latency) is int:  # not bool, not text
            self.latencies.append(float(latency))
            self.latency_histogram[bisect_right(LATENCY_EDGES_MS, latency)] += 1
        self._add_rows(record, failed=failed, unknown=unknown)

    def _add_commands(self, record: ResultRecord) -> None:
        cancelled = record.get("cancelled_command_ids")
        if cancelled:
            self.commands["cancelled"] += len(cancelled)
        if "matched_command_ids" in record:
            commands = self.commands
            commands["matched"] += len(record["matched_command_ids"])
            commands["missed"] += len(record.get("missed_command_ids") or ())
            commands["kept"] += record.get("kept") or 0

    def _add_rows(self, record: ResultRecord, *, failed: bool, unknown: bool) -> None:
        """The report's rows: digests are made only for the few lines that need them."""
        if self.failed or failed:  # a --retry-failed line may supersede a failed one
            digest = key_digest(record_key(record))
            earlier = self.failed.pop(digest, None)
            if earlier is not None:
                _decrement(self.groups, (earlier["org_id"], _product(earlier), "failed"))
            if failed:
                self.failed[digest] = failed_row(record)
        product = record["target"].get("product_key") or BY_ASSET
        self.groups[record.get("org_id") or "", product, record["outcome"]] += 1
        if unknown:
            self.unknown_total += 1
            if len(self.unknown) < LISTED:
                self.unknown.append(failed_row(record))


def _decrement(counter: Counter[Any], key: Any) -> None:
    """One less; a count that reaches zero is removed (counts compare as they were written)."""
    counter[key] -= 1
    if not counter[key]:
        del counter[key]


def _product(row: FailedRow) -> str:
    return row["product_key"] or BY_ASSET


def error_label(record: ResultRecord) -> str:
    """How a failed line is counted: its EnOS code, else http_NNN, else 'transport'."""
    if record.get("code") not in (None, 0):
        return str(record["code"])
    if record.get("http_status") not in (None, 200):
        return f"http_{record['http_status']}"
    return "transport"


def failed_row(record: ResultRecord) -> FailedRow:
    """A result line as the report lists a failed (or effect-unknown) target."""
    target = record["target"]
    code = record.get("code")
    return {
        "asset_id": target.get("asset_id") or "",
        "product_key": target.get("product_key") or "",
        "device_key": target.get("device_key") or "",
        "command_id": record.get("command_id") or "",
        "org_id": record.get("org_id") or "",
        "code": code if code not in (None, 0) else record.get("http_status"),
        "msg": (record.get("msg") or record.get("error") or "")[:200],
        "attempts": record.get("attempts"),
        "outcome": record.get("outcome") or "",
        "error": (record.get("error") or "")[:200],
    }


def _layout() -> str:
    """The fold's structure, for the checkpoint: another structure, another layout."""
    shape = ",".join(f"{f.name}:{f.metadata['codec'].name}" for f in fields(Counts))
    return hashlib.sha256(shape.encode()).hexdigest()[:16]


LAYOUT = _layout()


class JournalFold:
    """The fold over a journal, the cursor past the last line it read, and the done set's
    records (done.bin: a record per line read)."""

    def __init__(self, counts: Counts | None = None, cursor: JournalCursor | None = None) -> None:
        self.counts = counts or Counts()
        self.cursor = cursor or JournalCursor()
        self.done = bytearray()

    def add(
        self, record: ResultRecord, digest: int | None = None, flags: int | None = None
    ) -> None:
        """Count one journal record (in journal order) and keep its done.bin record."""
        self.counts.add(record)
        if digest is None:
            digest = key_digest(record_key(record))
        flags = line_flags(record) if flags is None else flags
        self.done += done_record(digest, flags)

    def read_rest(self, run: RunDir) -> Counts:
        """Count the lines after the cursor; the counts of the whole journal."""
        with gc_paused():
            for record in read_journal(run.results, self.cursor):
                self.add(record)
        return self.counts


def count_journal(run: RunDir) -> Counts:
    """The whole journal counted from its first line, trusting no checkpoint (audit verify)."""
    counts = Counts()
    with gc_paused():
        for record in read_journal(run.results):
            counts.add(record)
    return counts
