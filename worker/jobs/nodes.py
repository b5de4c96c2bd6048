"""Reading YAML nodes with their line numbers: the helpers every part of the job file is read
with. Values are composed, not loaded, so an id keeps the text the operator wrote, and every
problem names "file:line: field: what; fix".
"""

from __future__ import annotations

import difflib
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from worker.errors import JobFileError, shown
from worker.jobs.targets import MAX_PROBLEMS, text_problem

NULL_TAG = "tag:yaml.org,2002:null"


class Problems:
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


def is_null(node: yaml.Node | None) -> bool:
    """An absent key, or one written with no value (``key:``, ``key: null``)."""
    return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == NULL_TAG)


def mapping(
    node: yaml.MappingNode, allowed: tuple[str, ...], prefix: str, problems: Problems
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


def scalar_value(node: yaml.Node) -> Any:
    """A scalar's YAML value (numbers, booleans, null) for non-id settings; ValueError when
    YAML cannot build it (``!!int ''``, ``!!binary yes``, ``!!timestamp ''``, ...)."""
    try:
        return yaml.constructor.SafeConstructor().construct_object(node, deep=True)
    except Exception as exc:  # the constructors raise IndexError, KeyError, binascii.Error...
        tag = str(node.tag).rsplit(":", 1)[-1]
        raise ValueError(f"cannot be read as a YAML value (tag {shown(tag)})") from exc


def id_text(
    node: yaml.Node | None, field_name: str, problems: Problems, *, allow_null: bool = False
) -> str | None:
    """An identifier as the literal text written, whatever type YAML 1.1 would give it."""
    if node is None:
        return None
    if not isinstance(node, yaml.ScalarNode):
        problems.add(node, field_name, "must be a single text value", "write it as 'field: text'")
        return None
    text = str(node.value)
    if node.tag == NULL_TAG and not node.style:
        if not allow_null:
            problems.add(node, field_name, "is empty", "give a value or remove the field")
        return None
    problem = text_problem(text)
    if problem is not None:
        problems.add(node, field_name, *problem.split("; ", 1))
        return None
    return text


def instant(node: yaml.Node, field_name: str, problems: Problems) -> float | None:
    """An ISO 8601 moment with a zone, as epoch seconds: the scalar's text, not YAML's own
    timestamp, which would drop or guess the zone."""
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
    return moment.timestamp()
