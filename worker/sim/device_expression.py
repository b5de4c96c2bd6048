"""Search Device's expression language, as the simulated service reads it (enos-api.md §2.3a):
``productKey``, ``deviceKey``, ``assetId`` with ``=`` and ``in``; ``productType`` and ``status``
with ``=``; ``deviceName`` (and ``deviceName.default``, ``deviceName.<locale>``) with ``like``;
joined by ``and``. Strings are quoted with ' or " and hold no escape (none is documented).
Anything else is refused (99400).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from worker.sim.expression import ExpressionError

_TOKEN_RE = re.compile(r"\s*(?:(?P<str>'[^']*'|\"[^\"]*\")|(?P<op>=|\(|\)|,)|(?P<word>[\w.]+))")
_LISTED = ("productKey", "deviceKey", "assetId")
_EQUAL = ("productType", "status")


@dataclass
class DeviceQuery:
    """What a Search Device expression asks for: every condition must hold."""

    listed: dict[str, set[str]] = field(default_factory=dict)  # productKey/deviceKey/assetId
    equal: dict[str, str] = field(default_factory=dict)  # productType, status
    names: list[tuple[str | None, str]] = field(default_factory=list)  # (locale, text)


def parse_device_expression(text: str) -> DeviceQuery:
    """The conditions of an expression; ExpressionError when it cannot be read."""
    tokens = _tokenize(text)
    query = DeviceQuery()
    position = 0
    while True:
        position = _condition(tokens, position, query)
        if position == len(tokens):
            return query
        if tokens[position][1].lower() != "and":
            raise ExpressionError(f"expected 'and', found {tokens[position][1]!r}")
        position += 1


def _tokenize(text: str) -> list[tuple[str, str]]:
    """(kind, text) tokens: str (unquoted), op, word."""
    tokens: list[tuple[str, str]] = []
    position = 0
    while text[position:].strip():
        match = _TOKEN_RE.match(text, position)
        if match is None:
            raise ExpressionError(f"cannot read the expression at {text[position:]!r}")
        kind = match.lastgroup or "word"
        value = match.group(kind)
        tokens.append((kind, value[1:-1] if kind == "str" else value))
        position = match.end()
    if not tokens:
        raise ExpressionError("the expression is empty")
    return tokens


def _condition(tokens: list[tuple[str, str]], position: int, query: DeviceQuery) -> int:
    """One condition into `query`; the position after it."""
    if position + 2 >= len(tokens):
        raise ExpressionError("incomplete condition: expected <field> <operator> <value>")
    (_, name), (_, operator) = tokens[position], tokens[position + 1]
    operator = operator.lower()
    if name in _LISTED and operator == "in":
        values, position = _list(tokens, position + 2)
        query.listed[name] = query.listed.get(name, values) & values
        return position
    if name in (*_LISTED, *_EQUAL) and operator == "=":
        value = _string(tokens[position + 2])
        if name in _EQUAL:
            query.equal[name] = value
        else:
            query.listed[name] = query.listed.get(name, {value}) & {value}
        return position + 3
    if (name == "deviceName" or name.startswith("deviceName.")) and operator == "like":
        locale = name.split(".", 1)[1] if "." in name else None
        query.names.append((locale, _string(tokens[position + 2])))
        return position + 3
    raise ExpressionError(f"unsupported condition {name} {operator}")


def _string(token: tuple[str, str]) -> str:
    kind, value = token
    if kind != "str":
        raise ExpressionError(f"expected a quoted value, found {value!r}")
    return value


def _list(tokens: list[tuple[str, str]], position: int) -> tuple[set[str], int]:
    """A parenthesised list of quoted values; the position after it."""
    if position >= len(tokens) or tokens[position][1] != "(":
        raise ExpressionError("'in' needs a list in parentheses")
    values: set[str] = set()
    position += 1
    while position < len(tokens):
        values.add(_string(tokens[position]))
        position += 1
        if position < len(tokens) and tokens[position][1] == ")":
            return values, position + 1
        if position >= len(tokens) or tokens[position][1] != ",":
            break
        position += 1
    raise ExpressionError("an 'in' list is not closed")
