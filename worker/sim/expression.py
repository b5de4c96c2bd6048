"""Search Command's expression language, as the simulated service reads it: ``state = 1``,
``state in (1,2)``, ``commandName.en_US like 'x'``, ``createTime >= '2019-08-13 09:00:00'``,
joined by ``and`` / ``or`` (and binds tighter). Unsupported conditions are refused (99400).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import UTC, datetime

from worker.sim.state import SimCommand, localized

Predicate = Callable[[SimCommand], bool]
_TOKEN_RE = re.compile(
    r"\s*(?:(?P<str>'[^']*'|\"[^\"]*\")|(?P<op>!=|>=|<=|=|<|>|\(|\)|,)|(?P<word>[\w.]+))"
)


class ExpressionError(ValueError):
    """The search expression cannot be parsed; the service answers 99400."""


def parse_expression(text: str) -> Predicate:
    """Compile a search expression into a predicate over commands."""
    tokens = _tokenize(text)
    alternatives: list[list[Predicate]] = [[]]
    position = 0
    while position < len(tokens):
        predicate, position = _comparison(tokens, position)
        alternatives[-1].append(predicate)
        if position < len(tokens):
            joiner = tokens[position].lower()
            if joiner == "or":
                alternatives.append([])
            elif joiner != "and":
                raise ExpressionError(f"expected 'and' or 'or', found {tokens[position]!r}")
            position += 1
            if position == len(tokens):
                raise ExpressionError("the expression ends with a dangling joiner")
    groups = [group for group in alternatives if group]
    if not groups:
        raise ExpressionError("the expression is empty")
    return lambda c: any(all(pred(c) for pred in group) for group in groups)


def _tokenize(text: str) -> list[str]:
    tokens: list[str] = []
    position = 0
    while position < len(text):
        if text[position:].strip() == "":
            break
        match = _TOKEN_RE.match(text, position)
        if match is None:
            raise ExpressionError(f"cannot read the expression at {text[position:]!r}")
        tokens.append(match.group(match.lastgroup or "word"))
        position = match.end()
    return tokens


def _comparison(tokens: list[str], position: int) -> tuple[Predicate, int]:
    if position + 2 >= len(tokens):
        raise ExpressionError("incomplete comparison: expected <field> <operator> <value>")
    field_name, operator = tokens[position], tokens[position + 1].lower()
    if field_name == "state":
        return _state_comparison(tokens, position + 1)
    value = tokens[position + 2].strip("'\"")
    if field_name.startswith("commandName.") and operator == "like":
        locale = field_name.split(".", 1)[1]
        return (lambda c: value.lower() in _name_in(c, locale).lower()), position + 3
    if field_name == "createTime":
        return _time_comparison(operator, value), position + 3
    raise ExpressionError(f"unsupported condition {field_name} {operator}")


def _name_in(command: SimCommand, locale: str) -> str:
    """A command's name in a locale, as the service's `like` sees it ("" when it has none)."""
    if locale in ("default", "en_US"):
        return command.identifier
    return localized(command.identifier) if locale == "zh_CN" else ""


def _state_comparison(tokens: list[str], position: int) -> tuple[Predicate, int]:
    operator = tokens[position].lower()
    if operator == "in":
        close = tokens.index(")", position)
        states = {int(t) for t in tokens[position + 2 : close] if t != ","}
        return (lambda c: c.state in states), close + 1
    state = int(tokens[position + 1])
    if operator == "=":
        return (lambda c: c.state == state), position + 2
    if operator == "!=":
        return (lambda c: c.state != state), position + 2
    raise ExpressionError(f"unsupported operator for state: {operator}")


_TIME_OPERATORS: dict[str, Callable[[int, int], bool]] = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
    "=": lambda a, b: a // 1000 == b // 1000,
}


def _time_comparison(operator: str, value: str) -> Predicate:
    compare = _TIME_OPERATORS.get(operator)
    if compare is None:
        raise ExpressionError(f"unsupported operator for createTime: {operator}")
    try:
        moment = datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    except ValueError:
        raise ExpressionError(f"createTime needs 'YYYY-MM-DD HH:mm:ss', not {value!r}") from None
    bound = int(moment.timestamp() * 1000)
    return lambda c: compare(c.create_time_ms, bound)
