"""``targets_query:``: a job's targets chosen by the fleet itself (Search Device), read from its
YAML node, said in words, and written as the expressions sent.

EnOS documents no escaping inside an expression's strings, so a value holding a quote, a
backslash or a control character is refused here (file:line, field, fix), never escaped on a
guess: a guess that is wrong would select other devices than the operator wrote.
"""

from __future__ import annotations

import re

import yaml

from worker.errors import shown
from worker.jobparts import TargetsQuery
from worker.jobs.nodes import Problems, id_text, is_null, mapping

QUERY_KEYS = (
    "org_id",
    "product_key",
    "asset_id",
    "status",
    "product_type",
    "device_name",
    "device_name_locale",
)
STATUSES = ("inactive", "online", "offline", "disable")  # Search Device's `status =` values
PRODUCT_TYPES = ("Device", "Gateway")  # Search Device's `productType =` values
MAX_LISTED = 1000  # product keys or asset ids in one query; more belong in a targets_file
_LOCALE_RE = re.compile(r"default|[a-z]{2,3}_[A-Z]{2}")
_UNSENDABLE = re.compile(r"['\"\\\x00-\x1f\x7f]")


def read_query(
    node: yaml.Node | None, job_org: str | None, problems: Problems
) -> TargetsQuery | None:
    """The `targets_query:` mapping: every criterion checked, every problem collected."""
    if is_null(node):
        return None
    assert node is not None
    if not isinstance(node, yaml.MappingNode):
        problems.add(
            node, "targets_query", "must be a mapping", "write 'targets_query:' then indented keys"
        )
        return None
    before = len(problems.items)
    fields = mapping(node, QUERY_KEYS, "targets_query.", problems)
    texts: dict[str, str | None] = {
        key: _value(fields[key], key, problems)
        for key in ("org_id", "status", "product_type", "device_name", "device_name_locale")
        if key in fields
    }
    query = TargetsQuery(
        org_id=texts.get("org_id") or job_org or "",
        product_keys=_values(fields.get("product_key"), "product_key", problems, one=True),
        asset_ids=_values(fields.get("asset_id"), "asset_id", problems, one=False),
        status=_choice(fields, texts, "status", STATUSES, problems),
        product_type=_choice(fields, texts, "product_type", PRODUCT_TYPES, problems),
        device_name=texts.get("device_name"),
        device_name_locale=texts.get("device_name_locale"),
        source=f"{problems.path}:{node.start_mark.line + 1}",
    )
    _check_whole(node, fields, query, problems)
    return query if len(problems.items) == before else None


def _check_whole(
    node: yaml.Node, fields: dict[str, yaml.Node], query: TargetsQuery, problems: Problems
) -> None:
    """The rules between the criteria: an org, at least one criterion, a locale only with a
    name and spelt as one."""
    if not query.org_id:
        problems.add(node, "targets_query", "has no org_id", "set org_id for the job or the query")
    if not set(fields) - {"org_id", "device_name_locale"}:
        problems.add(
            node,
            "targets_query",
            "names no criterion (it would select every device of the org)",
            "give at least one of product_key, asset_id, status, product_type, device_name",
        )
    locale = query.device_name_locale
    if locale is not None and query.device_name is None:
        problems.add(
            fields["device_name_locale"],
            "targets_query.device_name_locale",
            "without device_name",
            "add device_name, or remove the locale",
        )
    elif locale is not None and not _LOCALE_RE.fullmatch(locale):
        problems.add(
            fields["device_name_locale"],
            "targets_query.device_name_locale",
            f"{shown(locale)} is not a locale",
            "write default, en_US, zh_CN, ...",
        )


def _value(node: yaml.Node, key: str, problems: Problems) -> str | None:
    """One text value of the query: an id's rules, and nothing an expression string cannot
    hold unescaped."""
    field_name = f"targets_query.{key}"
    text = id_text(node, field_name, problems)
    if text is None:
        return None
    bad = _UNSENDABLE.search(text)
    if bad is not None:
        problems.add(
            node,
            field_name,
            f"{shown(text)} holds {shown(bad.group())}, which EnOS documents no way to escape in "
            "a search expression",
            "remove it (a quote, a backslash or a control character is refused, never guessed at)",
        )
        return None
    if key == "asset_id" and "," in text:
        problems.add(node, field_name, f"{shown(text)} has a comma", "write one asset id per item")
        return None
    return text


def _values(node: yaml.Node | None, key: str, problems: Problems, *, one: bool) -> tuple[str, ...]:
    """A list of values (`one`: a single text is a list of one); duplicates are problems."""
    if node is None:
        return ()
    field_name = f"targets_query.{key}"
    if isinstance(node, yaml.ScalarNode) and one:
        value = _value(node, key, problems)
        return (value,) if value is not None else ()
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        problems.add(node, field_name, "must be a non-empty list", f"write {key}: [a, b]")
        return ()
    if len(node.value) > MAX_LISTED:
        problems.add(
            node,
            field_name,
            f"lists {len(node.value):,} values, more than {MAX_LISTED:,}",
            "put that many targets in a targets_file",
        )
        return ()
    values: list[str] = []
    for item in node.value:
        value = _value(item, key, problems)
        if value is not None and value in values:
            problems.add(item, field_name, f"{shown(value)} is listed twice", "keep one")
        elif value is not None:
            values.append(value)
    return tuple(values)


def _choice(
    fields: dict[str, yaml.Node],
    texts: dict[str, str | None],
    key: str,
    allowed: tuple[str, ...],
    problems: Problems,
) -> str | None:
    """A value that must be one of the documented ones."""
    value = texts.get(key)
    if value is not None and value not in allowed:
        problems.add(
            fields[key],
            f"targets_query.{key}",
            f"{shown(value)} is not a {key.replace('_', ' ')} EnOS documents",
            f"write one of {', '.join(allowed)} (as EnOS spells them)",
        )
        return None
    return value


def expressions(query: TargetsQuery) -> list[str]:
    """The Search Device expressions sent, in order: one per product key (a product holds at
    most 10,000 devices, so each search stays small), else one for the whole query."""
    rest = _conditions(query)
    if not query.product_keys:
        return [" and ".join(rest)]
    return [" and ".join([f"productKey = '{key}'", *rest]) for key in query.product_keys]


def _conditions(query: TargetsQuery) -> list[str]:
    """The criteria besides the product key, as Search Device's expression writes them."""
    conditions = []
    if len(query.asset_ids) == 1:
        conditions.append(f"assetId = '{query.asset_ids[0]}'")
    elif query.asset_ids:
        conditions.append("assetId in (" + ", ".join(f"'{a}'" for a in query.asset_ids) + ")")
    if query.status is not None:
        conditions.append(f"status = '{query.status}'")
    if query.product_type is not None:
        conditions.append(f"productType = '{query.product_type}'")
    if query.device_name is not None:
        locale = f".{query.device_name_locale}" if query.device_name_locale else ""
        conditions.append(f"deviceName{locale} like '{query.device_name}'")
    return conditions


def describe(query: TargetsQuery) -> str:
    """The query in words, for validate, the log, the audit and the report."""
    parts = []
    keys = query.product_keys
    if keys:
        parts.append(f"of product {_either(keys)}")
    if query.asset_ids:
        parts.append(f"with asset id {_either(query.asset_ids)}")
    if query.status is not None:
        parts.append(f"whose status is {query.status}")
    if query.product_type is not None:
        parts.append(f"of product type {query.product_type}")
    if query.device_name is not None:
        where = f" ({query.device_name_locale} name)" if query.device_name_locale else ""
        parts.append(f"whose name is like {query.device_name!r}{where}, as the gateway judges")
    return f"every device in org {query.org_id} " + ", ".join(parts)


def _either(values: tuple[str, ...]) -> str:
    """'P1', 'P1 or P2', 'P1, P2 or 8 more' (a long list is not said whole)."""
    if len(values) == 1:
        return values[0]
    shown_values = list(values[:5])
    rest = len(values) - len(shown_values)
    if rest:
        return ", ".join(shown_values) + f" or {rest:,} more"
    return ", ".join(shown_values[:-1]) + f" or {shown_values[-1]}"
