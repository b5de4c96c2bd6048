"""Job files: YAML (`version: 1`) plus an optional streamed CSV/JSONL targets file -> Job, Plan.

The YAML is composed into nodes rather than loaded, so every error names its line and an id
keeps its literal text: YAML 1.1 would read an unquoted ``0123`` as 83, ``on`` as true and
``12:30:00`` as 45000; here the id is the text the operator wrote. Target lists are never held
in memory: :func:`plan` streams them once to validate, count, hash and find duplicates before
anything is sent, and :func:`run_targets` streams them again for the run.
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import io
import operator
import re
import stat
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, NoReturn

import orjson
import yaml

from worker.errors import JobFileError, shown
from worker.jobs.units import (
    MAX_ASSETS_PER_CALL,
    assets_per_call,
    parse_duration,
    parse_rate,
    positive,
    with_rate,
)
from worker.model import (
    DEFAULT_RATE,
    AbortRule,
    Job,
    Limits,
    Match,
    Shard,
    Target,
    TargetsFile,
    gc_paused,
    identity_key,
    key_digest,
    selector_problem,
)

JOB_KEYS = (
    "version",
    "name",
    "gateway",
    "org_id",
    "command_id",
    "match",
    "targets",
    "targets_file",
    "limits",
    "abort",
)
TARGET_KEYS = ("asset_id", "product_key", "device_key", "command_id", "org_id")
MATCH_KEYS = (
    "command_name",
    "command_name_locale",
    "tsl_identifier",
    "command_type",
    "created_after",
    "created_before",
)
_BOTH = "has both a match and a command_id; remove one (a match finds the command ids itself)"
Row = tuple[str, str, str, str, str]  # TARGET_KEYS in order; "" where absent
LIMIT_KEYS = (
    "rate",
    "rate_floor",
    "rate_max",
    "concurrency",
    "attempts",
    "timeout",
    "deadline",
    "max_retry_after",
    "assets_per_call",
)
ABORT_KEYS = ("failure_ratio", "min_finished")
MAX_PROBLEMS = 20
JOB_FILE_MAX = 16 << 20  # bytes; a larger job file should move its targets to a targets_file
LINE_MAX = 1 << 16  # bytes of one targets-file line: five ids of 256 characters fit many times
_STR_TAG = "tag:yaml.org,2002:str"
_NULL_TAG = "tag:yaml.org,2002:null"
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _Problems:
    """Collects error sentences ("file:line: field: what is wrong; how to fix it")."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.items: list[str] = []

    def add(self, node: yaml.Node | int | None, field_name: str, problem: str, fix: str) -> None:
        line = node if isinstance(node, int) or node is None else node.start_mark.line + 1
        where = f"{self.path}:{line}" if line else str(self.path)
        if len(self.items) < MAX_PROBLEMS:
            self.items.append(f"{where}: {field_name}: {problem}; {fix}")

    def raise_if_any(self) -> None:
        if self.items:
            raise JobFileError(self.items)


# -- the YAML job file --------------------------------------------------------------------


def load_job(path: Path) -> Job:
    """Read and validate a job file; raise JobFileError naming every problem found."""
    raw = _read_bytes(path)
    problems = _Problems(path)
    root = _compose(path, raw)
    if not isinstance(root, yaml.MappingNode):
        raise JobFileError([f"{path}: the job file must be a YAML mapping (key: value lines)"])
    fields = _mapping(root, JOB_KEYS, "", problems)
    version = fields.get("version")
    if version is None or not _is_version_1(version):
        problems.add(version or root, "version", "missing or not 1", "write 'version: 1'")
    org_id = _id(fields.get("org_id"), "org_id", problems, allow_null=True)
    job_command = _id(fields.get("command_id"), "command_id", problems, allow_null=True)
    job_match = _match(fields.get("match"), "match", problems)
    if job_match is not None and job_command is not None:
        problems.add(fields["match"], "match", *_BOTH.split("; ", 1))
    inline = _inline_targets(fields.get("targets"), org_id, job_command, job_match, problems)
    targets_file = _targets_file(fields.get("targets_file"), path, problems)
    if not inline and targets_file is None and "targets" not in fields:
        problems.add(root, "targets", "no targets", "add 'targets:' and/or 'targets_file:'")
    job = Job(
        path=path,
        name=_name(fields.get("name"), path, problems),
        sha256=hashlib.sha256(raw).hexdigest(),
        gateway=_gateway(fields.get("gateway"), problems),
        org_id=org_id,
        command_id=job_command,
        match=job_match,
        limits=_limits(fields.get("limits"), problems),
        abort=_abort(fields.get("abort"), problems),
        inline_targets=tuple(inline),
        targets_file=targets_file,
    )
    problems.raise_if_any()
    return job


def _read_bytes(path: Path) -> bytes:
    """The job file's bytes: a regular file (a FIFO would hang, /dev/zero never ends) of at
    most JOB_FILE_MAX bytes (targets belong in a targets file)."""
    try:
        info = path.stat()
        if not stat.S_ISREG(info.st_mode):
            raise JobFileError([f"{path}: not a regular file; give the path of a YAML job file"])
        if info.st_size > JOB_FILE_MAX:
            raise JobFileError(
                [
                    f"{path}: {info.st_size:,} bytes, more than a job file may hold "
                    f"({JOB_FILE_MAX:,}); put the targets in a targets_file (CSV or JSONL)"
                ]
            )
        with path.open("rb") as stream:
            return stream.read(JOB_FILE_MAX + 1)
    except OSError as exc:
        raise JobFileError([f"{path}: cannot read the job file: {exc.strerror}"]) from None


def _compose(path: Path, raw: bytes) -> yaml.Node | None:
    try:
        with gc_paused():
            return yaml.compose(raw, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise JobFileError([f"{path}{line}: not valid YAML: {exc.problem}"]) from None
    except yaml.YAMLError as exc:
        raise JobFileError([f"{path}: not valid YAML: {exc}"]) from None


def _is_version_1(node: yaml.Node) -> bool:
    try:
        value = _value(node)
    except ValueError:
        return False
    return value == 1 and not isinstance(value, bool)


def _mapping(
    node: yaml.MappingNode, allowed: tuple[str, ...], prefix: str, problems: _Problems
) -> dict[str, yaml.Node]:
    """The mapping's values by key; unknown and repeated keys are problems."""
    fields: dict[str, yaml.Node] = {}
    for key_node, value_node in node.value:
        key = str(key_node.value)
        name = f"{prefix}{key}"
        if key not in allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
            problems.add(key_node, name, "unknown key", hint)
        elif key in fields:
            problems.add(key_node, name, "given twice", "keep one")
        else:
            fields[key] = value_node
    return fields


def _value(node: yaml.Node) -> Any:
    """A scalar's YAML value (numbers, booleans, null) for non-id settings; ValueError when
    YAML cannot build it (``!!int ''``, ``!!binary yes``, ``!!timestamp ''``, ...)."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except Exception as exc:  # the constructors raise IndexError, KeyError, binascii.Error...
        tag = str(node.tag).rsplit(":", 1)[-1]
        raise ValueError(f"cannot be read as a YAML value (tag {shown(tag)})") from exc


def _id(
    node: yaml.Node | None, field_name: str, problems: _Problems, *, allow_null: bool = False
) -> str | None:
    """An identifier as the literal text written, whatever type YAML 1.1 would give it."""
    if node is None:
        return None
    if not isinstance(node, yaml.ScalarNode):
        problems.add(node, field_name, "must be a single text value", "write it as 'field: text'")
        return None
    text = str(node.value)
    if node.tag == _NULL_TAG and not node.style:
        if not allow_null:
            problems.add(node, field_name, "is empty", "give a value or remove the field")
        return None
    problem = _text_problem(text)
    if problem is not None:
        problems.add(node, field_name, *problem.split("; ", 1))
        return None
    return text


def _text_problem(text: str) -> str | None:
    """What is wrong with an id as written ("problem; fix"), or None."""
    if not text.strip():
        return "is empty or only spaces; give a value or remove the field"
    if text != text.strip():
        return f"{shown(text)} has spaces around it; remove the spaces"
    return id_problem(text)


ID_MAX = 256  # characters; EnOS ids are short, anything longer is a mistake or an attack
_HIDDEN = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def id_problem(text: str) -> str | None:
    """What is wrong with an id ("problem; fix"), or None: too long, or holding a control,
    line-break, zero-width or bidi character (which would also reach logs and reports)."""
    if len(text) > ID_MAX:
        return f"{len(text):,} characters long; an id has at most {ID_MAX}"
    hidden = _HIDDEN.search(text)
    if hidden is not None:
        return (
            f"holds the invisible character U+{ord(hidden.group()):04X}; remove it (control, "
            "line-break, zero-width and bidi characters are refused)"
        )
    return None


def _inline_targets(
    node: yaml.Node | None,
    org_id: str | None,
    command_id: str | None,
    job_match: Match | None,
    problems: _Problems,
) -> list[Target]:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
        return []
    if not isinstance(node, yaml.SequenceNode):
        problems.add(node, "targets", "must be a list", "write one '- asset_id: ...' per target")
        return []
    targets: list[Target] = []
    for index, item in enumerate(node.value):
        prefix = f"targets[{index}]."
        if not isinstance(item, yaml.MappingNode):
            problems.add(item, f"targets[{index}]", "must be a mapping", "write '- asset_id: ...'")
            continue
        before = len(problems.items)
        fields = _mapping(item, (*TARGET_KEYS, "match"), prefix, problems)
        own_match = fields.pop("match", None)
        match = _match(own_match, prefix + "match", problems) if own_match else job_match
        values = {key: _id(value, prefix + key, problems) for key, value in fields.items()}
        if len(problems.items) > before:
            continue  # one report per mistake: do not also say "no selector"
        where = f"{problems.path}:{item.start_mark.line + 1}"
        target = _target(
            {k: v for k, v in values.items() if v is not None}, org_id, command_id, where, match
        )
        if isinstance(target, str):
            problems.add(item, f"targets[{index}]", *target.split("; ", 1))
        else:
            targets.append(target)
    return targets


def _target(
    values: dict[str, str],
    org_id: str | None,
    command_id: str | None,
    where: str,
    match: Match | None,
) -> Target | str:
    """A target from its fields and the job's defaults, or "problem; fix" text."""
    row = tuple(values.get(name, "") for name in TARGET_KEYS)
    return _row_target(row, org_id or "", command_id or "", where, match)  # type: ignore[arg-type]


def _row_target(
    row: Row, org_id: str, command_id: str, where: str, match: Match | None = None
) -> Target | str:
    """A Target from a row (job defaults applied), or "problem; fix" text."""
    asset, product, device, command, org = row
    org = org or org_id
    problem = selector_problem(asset, product, device, org)
    if problem is not None:
        return problem
    command = command or command_id
    if match is not None and command:
        return _BOTH
    return Target(
        org_id=org,
        asset_id=asset or None,
        product_key=product or None,
        device_key=device or None,
        command_id=command or None,
        source=where,
        match=match,
    )


_LOCALE_RE = re.compile(r"default|[a-z]{2,3}(?:_[A-Z]{2})?")


def _match(node: yaml.Node | None, field_name: str, problems: _Problems) -> Match | None:
    """A `match:` block: which cached commands a selective target cancels."""
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
        return None
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, field_name, "must be a mapping", "write 'match:' then indented keys")
        return None
    before = len(problems.items)
    fields = _mapping(node, MATCH_KEYS, f"{field_name}.", problems)
    values: dict[str, Any] = {}
    for key in ("command_name", "command_name_locale", "tsl_identifier"):
        if key in fields:
            values[key] = _id(fields[key], f"{field_name}.{key}", problems)
    locale = values.get("command_name_locale")
    if locale is not None and not _LOCALE_RE.fullmatch(locale):
        problems.add(
            fields["command_name_locale"],
            f"{field_name}.command_name_locale",
            f"{shown(locale)} is not a locale",
            "write e.g. en_US, zh_CN or default",
        )
    if "command_type" in fields:
        values["command_type"] = _command_type(fields["command_type"], field_name, problems)
    for key in ("created_after", "created_before"):
        if key in fields:
            values[f"{key}_ms"] = _instant(fields[key], f"{field_name}.{key}", problems)
    if len(problems.items) > before:
        return None
    if not values:
        problems.add(
            node, field_name, "names no criterion", f"give at least one of {', '.join(MATCH_KEYS)}"
        )
        return None
    after, until = values.get("created_after_ms"), values.get("created_before_ms")
    if after is not None and until is not None and after >= until:
        problems.add(
            node,
            field_name,
            "created_after is not before created_before",
            "swap them, or widen the window",
        )
        return None
    return Match(**values)


def _command_type(node: yaml.Node, field_name: str, problems: _Problems) -> int | None:
    try:
        value = _value(node)
    except ValueError:
        value = None
    if value not in (1, 2) or isinstance(value, bool):
        problems.add(
            node,
            f"{field_name}.command_type",
            f"{shown(value)} is not 1 or 2",
            "1 = measurement-point setting, 2 = service invocation",
        )
        return None
    return int(value)


def _instant(node: yaml.Node, field_name: str, problems: _Problems) -> int | None:
    """An ISO 8601 moment with a zone, as epoch milliseconds (the scalar's text, not YAML's
    timestamp, which would drop or guess the zone)."""
    text = str(node.value).strip() if isinstance(node, yaml.ScalarNode) else ""
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        problems.add(
            node,
            field_name,
            f"{shown(text)} is not an ISO 8601 time with a zone",
            "write e.g. 2026-11-30T08:00:00Z or 2026-11-30T09:00:00+01:00",
        )
        return None
    return int(moment.timestamp() * 1000)


def _targets_file(
    node: yaml.Node | None, job_path: Path, problems: _Problems
) -> TargetsFile | None:
    text = _id(node, "targets_file", problems, allow_null=True)
    if text is None:
        return None
    path = (job_path.parent / text).resolve()
    suffix = path.suffix.lower()
    fmt = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}.get(suffix)
    if fmt is None:
        problems.add(
            node,
            "targets_file",
            f"{shown(text)} is neither .csv nor .jsonl",
            "rename or convert it",
        )
        return None
    if not path.exists():
        problems.add(
            node, "targets_file", f"{path} does not exist", "the path is relative to the job file"
        )
        return None
    if not path.is_file():
        problems.add(
            node,
            "targets_file",
            f"{path} is not a regular file",
            "give a CSV or JSONL file (not a FIFO, device or directory)",
        )
        return None
    return TargetsFile(path=path, fmt=fmt)


def _name(node: yaml.Node | None, path: Path, problems: _Problems) -> str:
    text = _id(node, "name", problems, allow_null=True) if node is not None else None
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text or path.stem).strip("-.") or "job"


def _gateway(node: yaml.Node | None, problems: _Problems) -> str | None:
    text = _id(node, "gateway", problems, allow_null=True)
    if text is not None and not re.match(r"https?://[^/\s]+", text):
        problems.add(node, "gateway", f"{shown(text)} is not an http(s) URL", "write https://host")
        return None
    return text


# -- limits and abort rules ---------------------------------------------------------------


_LIMIT_PARSERS: dict[str, tuple[Callable[[Any], Any], str]] = {
    "rate": (parse_rate, "requests per second above 0, 'unlimited' or 'auto'"),
    "rate_floor": (lambda v: positive(v, float), "with rate: auto, the starting rate, e.g. 10"),
    "rate_max": (lambda v: positive(v, float), "with rate: auto, the highest rate to try"),
    "concurrency": (lambda v: positive(v, int), "a whole number of requests in flight, 1 or more"),
    "attempts": (lambda v: positive(v, int), "a whole number of attempts, 1 or more"),
    "timeout": (lambda v: positive(v, float), "seconds per attempt above 0, e.g. 10"),
    "deadline": (parse_duration, "a duration such as 90s, 45m, 2h or 1h30m"),
    "max_retry_after": (
        lambda v: positive(v, float),
        "seconds, the longest pause a gateway's Retry-After may ask for, e.g. 300",
    ),
    "assets_per_call": (
        assets_per_call,
        f"a whole number of assets per cancel call, 1 (the default) to {MAX_ASSETS_PER_CALL}",
    ),
}


def _limits(node: yaml.Node | None, problems: _Problems) -> Limits:
    values = _settings(node, "limits", LIMIT_KEYS, _LIMIT_PARSERS, problems)
    rate = values.pop("rate", DEFAULT_RATE)
    return with_rate(Limits(**values), rate)


def _abort(node: yaml.Node | None, problems: _Problems) -> AbortRule:
    parsers: dict[str, tuple[Callable[[Any], Any], str]] = {
        "failure_ratio": (_ratio, "a share of failed targets, above 0 and at most 1, e.g. 0.2"),
        "min_finished": (
            lambda v: positive(v, int),
            "a whole number of finished targets, 1 or more",
        ),
    }
    return AbortRule(**_settings(node, "abort", ABORT_KEYS, parsers, problems))


def _ratio(value: object) -> float:
    number = float(positive(value, float))
    if number > 1:
        raise ValueError(f"{shown(value)} is above 1")
    return number


def _settings(
    node: yaml.Node | None,
    section: str,
    allowed: tuple[str, ...],
    parsers: dict[str, tuple[Callable[[Any], Any], str]],
    problems: _Problems,
) -> dict[str, Any]:
    if node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG):
        return {}
    if not isinstance(node, yaml.MappingNode):
        problems.add(node, section, "must be a mapping", f"write '{section}:' then indented keys")
        return {}
    values: dict[str, Any] = {}
    for key, value_node in _mapping(node, allowed, f"{section}.", problems).items():
        parse, expected = parsers[key]
        try:
            values[key] = parse(_value(value_node))
        except (ValueError, yaml.YAMLError) as exc:
            problems.add(value_node, f"{section}.{key}", str(exc), f"expected {expected}")
    return values


# -- streaming the targets ----------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What a run would do: validated once before anything is sent."""

    listed: int
    total: int
    skip: frozenset[int]
    duplicate_notes: tuple[str, ...]
    targets_sha256: str
    orgs: Counter[str] = field(default_factory=Counter)
    cancel_all: int = 0
    shard: Shard | None = None  # only this shard's targets are counted and run
    pending: bytes | None = None  # with a resume's done set: per ordinal, 1 if still to run

    @property
    def pending_count(self) -> int | None:
        """Targets still to run (None: not known, the plan had no done set)."""
        return None if self.pending is None else self.pending.count(1)


def all_targets(job: Job) -> Iterator[Target]:
    """Every listed target in order (inline first, then the file), duplicates included."""
    return (target for target in _listed(job, None) if target is not None)


def _listed(
    job: Job, done: set[int] | None, pending: bytes | None = None
) -> Iterator[Target | None]:
    """The listed targets; one whose digest is in `done`, or whose ordinal `pending` (the
    plan's marks) does not mark, is None (its place still counts) and is never built: resuming
    a run of a million skips the finished ones cheaply."""
    for ordinal, target in enumerate(job.inline_targets):
        skipped = pending is not None and not pending[ordinal]
        yield None if skipped or (done and target.digest() in done) else target
    if job.targets_file is None:
        return
    path = job.targets_file.path
    org_default, command_default = job.org_id or "", job.command_id or ""
    rows = enumerate(_file_rows(job.targets_file), start=len(job.inline_targets))
    for ordinal, (line, row) in rows:
        if pending is not None and not pending[ordinal]:
            yield None
            continue
        if done:
            asset, product, device, command, org = row
            key = identity_key(
                org or org_default, asset, product, device, command or command_default
            )
            if key_digest(key) in done:
                yield None
                continue
        built = _row_target(row, org_default, command_default, f"{path}:{line}", job.match)
        if isinstance(built, str):
            raise JobFileError([f"{path}:{line}: {built}"])
        yield built


def run_targets(
    job: Job, plan_: Plan, done: set[int] | None = None
) -> Iterator[tuple[int, Target]]:
    """The targets to run, in order, without duplicates and without those in `done`, each with
    its ordinal: its place in the job's list, the same in every segment of a run."""
    if plan_.pending is not None:  # the plan marked what is left (and the shard, duplicates)
        if plan_.pending.count(1):  # a finished run's resume does not read the file again
            marked = enumerate(_listed(job, None, plan_.pending))
            yield from ((ordinal, target) for ordinal, target in marked if target is not None)
        return
    skip, shard = plan_.skip, plan_.shard
    for ordinal, target in enumerate(_listed(job, done)):
        if target is None or ordinal in skip:
            continue
        if shard is None or shard.holds(target.digest()):
            yield ordinal, target


def plan(job: Job, shard: Shard | None = None, done: set[int] | None = None) -> Plan:
    """Stream every target once: validate, count, hash, find duplicates. Raises JobFileError.

    This is the only full pass before the first request, so it is written for speed: rows stay
    tuples, and duplicates are found by Python's hash of the row; a hash match is confirmed
    against the real keys before anything is dropped. With a `shard`, every row is still
    checked, but only the shard's are counted (duplicates share a shard: they share a key).
    With `done` (a resume's finished digests) it also marks which targets are still pending,
    so the run's pass builds only those, and a finished run's resume reads the file once.
    """
    seen: set[int] = set()
    pending = bytearray() if done is not None else None
    finished: set[int] = done if done is not None else set()
    candidates: dict[int, int] = {}  # ordinal of a probable duplicate -> its hash
    orgs: Counter[str] = Counter()
    cancel_all = 0
    with gc_paused():
        for ordinal, key in enumerate(_keys(job)):
            digest = key_digest(identity_key(*key)) if shard or pending is not None else 0
            if pending is not None:
                pending.append(digest not in finished and (shard is None or shard.holds(digest)))
            if shard is not None and not shard.holds(digest):
                continue
            number = hash(key)
            if number in seen:
                candidates[ordinal] = number
                continue
            seen.add(number)
            orgs[key[0]] += 1
            cancel_all += not key[4]
    skip, notes, distinct = _confirm_duplicates(job, candidates)
    for key in distinct:  # hash collisions: distinct targets after all
        orgs[key[0]] += 1
        cancel_all += not key[4]
    listed = len(seen) + len(candidates)
    return Plan(
        listed=listed,
        total=listed - len(skip),
        skip=frozenset(skip),
        duplicate_notes=notes,
        targets_sha256=_targets_sha256(job),
        orgs=orgs,
        cancel_all=cancel_all,
        shard=shard,
        pending=_still_pending(pending, skip),
    )


def _still_pending(marks: bytearray | None, skip: set[int]) -> bytes | None:
    """One byte per listed target: 1 when it is to run (in the shard, not done, no duplicate)."""
    if marks is None:
        return None
    for ordinal in skip:
        marks[ordinal] = 0
    return bytes(marks)


Key = tuple[str, str, str, str, str]  # org, asset, product, device, command (defaults applied)


def _keys(job: Job) -> Iterator[Key]:
    """The identity of every listed target; bad rows collected and raised at the end."""
    for target in job.inline_targets:
        yield _target_key(target)
    if job.targets_file is None:
        return
    problems: list[str] = []
    org_default, command_default = job.org_id or "", job.command_id or ""
    path = job.targets_file.path
    try:
        for line, (asset, product, device, command, own_org) in _file_rows(job.targets_file):
            org = own_org or org_default
            if job.match is not None and command:
                problems.append(f"{path}:{line}: {_BOTH}")
                continue
            if not org or not asset or product or device or "," in asset:  # common: no check
                problem = selector_problem(asset, product, device, org)
                if problem is not None:
                    problems.append(f"{path}:{line}: {problem}")
                    if len(problems) >= MAX_PROBLEMS:
                        break
                    continue
            yield org, asset, product, device, command or command_default
    except JobFileError as exc:
        problems.extend(exc.problems)
    if problems:
        raise JobFileError(problems[:MAX_PROBLEMS])


def _target_key(target: Target) -> Key:
    return (
        target.org_id,
        target.asset_id or "",
        target.product_key or "",
        target.device_key or "",
        target.command_id or "",
    )


def _confirm_duplicates(
    job: Job, candidates: dict[int, int]
) -> tuple[set[int], tuple[str, ...], list[Key]]:
    """Keep the candidates whose key really equals an earlier one, naming both places; return
    the keys of the others (hash collisions between distinct targets) too."""
    if not candidates:
        return set(), (), []
    wanted = set(candidates.values())
    first: dict[Key, str] = {}
    skip: set[int] = set()
    notes: list[str] = []
    distinct: list[Key] = []
    for ordinal, target in enumerate(all_targets(job)):
        key = _target_key(target)
        if hash(key) not in wanted:
            continue
        if key in first and ordinal in candidates:
            skip.add(ordinal)
            notes.append(f"{target.source}: duplicate of the target at {first[key]}; dropped")
            continue
        if ordinal in candidates:
            distinct.append(key)
        first.setdefault(key, target.source)
    return skip, tuple(notes), distinct


def _targets_sha256(job: Job) -> str:
    """sha256 of the inline targets (canonical, defaults applied) and the targets file's bytes.

    With no inline targets it is exactly ``sha256sum`` of the targets file.
    """
    digest = hashlib.sha256()
    for target in job.inline_targets:
        digest.update(target.key().encode() + b"\n")
    if job.targets_file is not None:
        with job.targets_file.path.open("rb") as stream:
            while chunk := stream.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _file_rows(targets_file: TargetsFile) -> Iterator[tuple[int, Row]]:
    """(line number, row) for each target row of a CSV or JSONL file."""
    if targets_file.fmt == "csv":
        return _csv_rows(targets_file.path)
    return _jsonl_rows(targets_file.path)


_BLOCK = 1 << 20  # bytes of a targets file read at a time


def _line_blocks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, the complete lines without their newline), a block at a
    time: a line over LINE_MAX bytes (a 200 MB "id", a header of fifty million commas) is
    refused before it is held, and there is no Python work per line here."""
    with path.open("rb") as stream:
        number, rest = 1, b""
        while chunk := stream.read(_BLOCK):
            lines = (rest + chunk).split(b"\n")
            rest = lines.pop()
            if len(rest) > LINE_MAX:
                _too_long(path, number + len(lines))
            if lines and max(map(len, lines)) > LINE_MAX:
                _too_long(path, number + next(i for i, x in enumerate(lines) if len(x) > LINE_MAX))
            if lines:
                yield number, lines
                number += len(lines)
        if rest:
            yield number, [rest]


def _too_long(path: Path, number: int) -> NoReturn:
    raise JobFileError(
        [
            f"{path}:{number}: the line is longer than {LINE_MAX:,} bytes; a target "
            "row holds a few short ids"
        ]
    )


def _raw_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of a targets file (see :func:`_line_blocks`)."""
    for number, lines in _line_blocks(path):
        yield from enumerate(lines, start=number)


def _text_lines(path: Path) -> Iterator[str]:
    """The lines of a targets file as text, with their line endings (as csv wants them): UTF-8
    (a leading BOM dropped), else JobFileError naming the line, the byte and the column."""
    for number, lines in _line_blocks(path):
        block = b"\n".join(lines) + b"\n"
        try:
            text = block.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = number + block.count(b"\n", 0, exc.start)
            column = exc.start - block.rfind(b"\n", 0, exc.start)
            byte = block[exc.start]
            message = f"not UTF-8 text (byte 0x{byte:02x} at column {column}); save it as UTF-8"
            raise JobFileError([f"{path}:{line}: {message}"]) from None
        if number == 1:
            text = text.removeprefix("\ufeff")
        yield from io.StringIO(text, newline="")


def _csv_rows(path: Path) -> Iterator[tuple[int, Row]]:
    reader = csv.reader(_text_lines(path))
    try:
        columns = _columns(path, next(reader, None))
        width = len(columns)
        # Absent columns read the empty cell appended to every row: one C-level itemgetter call.
        pick = operator.itemgetter(
            *(columns.index(name) if name in columns else width for name in TARGET_KEYS)
        )
        for row in reader:
            if len(row) != width:
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                raise JobFileError(
                    [
                        f"{path}:{reader.line_num}: has {len(row)} cells, the header has {width}"
                        "; fix the row"
                    ]
                )
            joined = "".join(row)
            if " " in joined or "\t" in joined:
                _refuse_padding(path, reader.line_num, row)
            if len(joined) > ID_MAX or _HIDDEN.search(joined):
                _refuse_odd_ids(path, reader.line_num, row)
            row.append("")
            yield reader.line_num, pick(row)
    except csv.Error as exc:
        raise JobFileError(
            [f"{path}:{reader.line_num}: not valid CSV ({shown(str(exc))}); fix the row"]
        ) from None


def _refuse_odd_ids(path: Path, line: int, row: list[str]) -> None:
    for value in row:
        problem = id_problem(value)
        if problem is not None:
            raise JobFileError([f"{path}:{line}: {shown(value)} {problem}"])


def _refuse_padding(path: Path, line: int, row: list[str]) -> None:
    for value in row:
        if value != value.strip():
            raise JobFileError([f"{path}:{line}: {shown(value)} has spaces around it; remove them"])


def _columns(path: Path, header: list[str] | None) -> list[str]:
    if not header:
        raise JobFileError([f"{path}: empty; the first row must name the columns, e.g. asset_id"])
    columns = [name.strip() for name in header]
    unknown = [name for name in columns if name not in TARGET_KEYS]
    if unknown:
        raise JobFileError(
            [f"{path}:1: unknown column(s) {shown(unknown)}; columns are {', '.join(TARGET_KEYS)}"]
        )
    return columns


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Row]]:
    for number, line in _raw_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            item = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise JobFileError(
                [f"{where}: not valid JSON ({shown(str(exc))}); one object per line"]
            ) from None
        if not isinstance(item, dict):
            raise JobFileError([f'{where}: must be a JSON object such as {{"asset_id": "..."}}'])
        yield number, _json_row(where, item)


def _json_row(where: str, item: dict[str, Any]) -> Row:
    for name, value in item.items():
        if name not in TARGET_KEYS:
            raise JobFileError(
                [f"{where}: unknown key {shown(name)}; keys are {', '.join(TARGET_KEYS)}"]
            )
        if value is not None and not isinstance(value, str):
            raise JobFileError([f"{where}: {name}: {shown(value)} is not text; write it in quotes"])
        problem = _text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            raise JobFileError([f"{where}: {name}: {problem}"])
    return tuple(item.get(name) or "" for name in TARGET_KEYS)  # type: ignore[return-value]
