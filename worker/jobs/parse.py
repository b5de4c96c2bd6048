"""Job files: YAML (`version: 1`) -> a validated :class:`~worker.model.Job`.

The YAML is composed into nodes rather than loaded, so every error names its line and an id
keeps its literal text: YAML 1.1 would read an unquoted ``0123`` as 83, ``on`` as true and
``12:30:00`` as 45000; here the id is the text the operator wrote. Every problem found is
collected (up to MAX_PROBLEMS) and raised at once, each as "file:line: field: what; fix".
The targets themselves are checked and counted by :mod:`worker.jobs.plan`.
"""

from __future__ import annotations

import hashlib
import re
import stat
from pathlib import Path
from typing import Any

import yaml

from worker.errors import JobFileError, shown
from worker.jobs.change import read_stages, read_window
from worker.jobs.nodes import Problems, id_text, is_null, mapping, scalar_value
from worker.jobs.query import read_query
from worker.jobs.rules import read_abort, read_limits, read_match
from worker.jobs.targets import (
    BOTH_MATCH_AND_ID,
    TARGET_KEYS,
    open_regular,
    row_target,
)
from worker.model import Job, Match, Target, TargetsFile, gc_paused

JOB_KEYS = (
    "version",
    "name",
    "gateway",
    "org_id",
    "command_id",
    "match",
    "targets",
    "targets_file",
    "targets_query",
    "limits",
    "abort",
    "window",
    "stages",
)
JOB_FILE_MAX = 16 << 20  # bytes; a larger job file should move its targets to a targets_file
_STR_TAG = "tag:yaml.org,2002:str"
_Loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_job(path: Path) -> Job:
    """Read and validate a job file; raise JobFileError naming every problem found."""
    raw = _read_bytes(path)
    problems = Problems(path)
    root = _compose(path, raw)
    if not isinstance(root, yaml.MappingNode):
        raise JobFileError([f"{path}: the job file must be a YAML mapping (key: value lines)"])
    fields = mapping(root, JOB_KEYS, "", problems)
    version = fields.get("version")
    if version is None or not _is_version_1(version):
        problems.add(version or root, "version", "missing or not 1", "write 'version: 1'")
    org_id = id_text(fields.get("org_id"), "org_id", problems, allow_null=True)
    job_command = id_text(fields.get("command_id"), "command_id", problems, allow_null=True)
    job_match = read_match(fields.get("match"), "match", problems)
    if job_match is not None and job_command is not None:
        problems.add(fields["match"], "match", *BOTH_MATCH_AND_ID.split("; ", 1))
    inline = _inline_targets(fields.get("targets"), org_id, job_command, job_match, problems)
    targets_file = _targets_file(fields.get("targets_file"), path, problems)
    query = read_query(fields.get("targets_query"), org_id, problems)
    if "targets_query" in fields and ("targets" in fields or "targets_file" in fields):
        problems.add(
            fields["targets_query"],
            "targets_query",
            "given with targets or targets_file",
            "a run's targets come from one place: keep the query, or the list",
        )
    elif not inline and targets_file is None and not ({"targets", "targets_query"} & set(fields)):
        problems.add(
            root, "targets", "no targets", "add 'targets:', 'targets_file:' or 'targets_query:'"
        )
    job = Job(
        path=path,
        name=_name(fields.get("name"), path, problems),
        sha256=hashlib.sha256(raw).hexdigest(),
        gateway=_gateway(fields.get("gateway"), problems),
        org_id=org_id,
        command_id=job_command,
        match=job_match,
        limits=read_limits(fields.get("limits"), problems),
        abort=read_abort(fields.get("abort"), problems),
        inline_targets=tuple(inline),
        targets_file=targets_file,
        query=query,
        window=read_window(fields.get("window"), problems),
        stages=read_stages(fields.get("stages"), problems),
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
        with open_regular(path, "job file") as stream:  # a FIFO swapped in since the stat
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
        value = scalar_value(node)
    except ValueError:
        return False
    return value == 1 and not isinstance(value, bool)


def _inline_targets(
    node: yaml.Node | None,
    org_id: str | None,
    command_id: str | None,
    job_match: Match | None,
    problems: Problems,
) -> list[Target]:
    if is_null(node):
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
        fields = mapping(item, (*TARGET_KEYS, "match"), prefix, problems)
        own_match = fields.pop("match", None)
        match = read_match(own_match, prefix + "match", problems) if own_match else job_match
        values = {key: id_text(value, prefix + key, problems) for key, value in fields.items()}
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
    return row_target(row, org_id or "", command_id or "", where, match)  # type: ignore[arg-type]


def _targets_file(node: yaml.Node | None, job_path: Path, problems: Problems) -> TargetsFile | None:
    text = id_text(node, "targets_file", problems, allow_null=True)
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


def _name(node: yaml.Node | None, path: Path, problems: Problems) -> str:
    text = id_text(node, "name", problems, allow_null=True) if node is not None else None
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text or path.stem).strip("-.") or "job"


def _gateway(node: yaml.Node | None, problems: Problems) -> str | None:
    text = id_text(node, "gateway", problems, allow_null=True)
    if text is not None and not re.match(r"https?://[^/\s]+", text):
        problems.add(node, "gateway", f"{shown(text)} is not an http(s) URL", "write https://host")
        return None
    return text
