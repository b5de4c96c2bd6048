"""The Command struct as the gateway lists it in cancel, get and search answers, read tolerant
of the wire's variants (createTime as number or text, names as I18n objects or text) and
bounded: an id of at most ID_CAP characters that holds no secret of this run, names cut at
NAME_CAP. A listed command whose id cannot be read is counted, never guessed.
"""

from __future__ import annotations

from collections.abc import Callable

from worker import redact
from worker.model import Command


def read_commands(
    data: object, read: Callable[[object], Command | str] | None = None
) -> tuple[tuple[Command, ...], int, str | None]:
    """The commands of an answer's `data` (null is an empty list), tolerant of wire variants.

    Returns (readable commands, how many listed commands had no readable id, the first
    problem met). Never raises: a code-0 answer is a fact about the gateway (something was
    cancelled), so what can be read is kept and the rest is said, not thrown away.
    """
    if data is None:
        return (), 0, None
    if not isinstance(data, list):
        return (), 1, f"'data' is a {type(data).__name__}, not a list of commands"
    commands: list[Command] = []
    unreadable, problem = 0, None
    read = read or command_of  # command_id_only for cancels, command_full for searches
    for item in data:
        command = read(item)
        if isinstance(command, str):
            unreadable += 1
            problem = problem or command
        else:
            commands.append(command)
    return tuple(commands), unreadable, problem


def command_id_only(item: object) -> Command | str:
    """Only the id: all a cancel's result needs (the hot path: three fields less to parse per
    command of every answer). The id rules are those of :func:`command_of`."""
    if type(item) is dict:
        command_id = item.get("commandId")
        if type(command_id) is str and 0 < len(command_id) <= ID_CAP:
            return UNKEPT_ID if redact.carries_secret(command_id) else Command(command_id)
    return command_of(item)


def command_of_asset(item: object) -> Command | str:
    """The id and the asset it belongs to (answers to a call for several assets)."""
    command = command_id_only(item)
    if isinstance(command, str):
        return command
    asset = item.get("assetId") if type(item) is dict else None
    return command._replace(asset_id=asset if type(asset) is str and asset else None)


def command_of(item: object) -> Command | str:
    """One Command struct (createTime as number or string, name as I18n object or text), or
    what makes it unreadable. Only the id is required; any other field may be odd.

    ``type(x) is`` rather than isinstance: it is the hot path, and it also refuses bools."""
    if type(item) is not dict:
        return f"a command is a {type(item).__name__}, not an object"
    command_id = item.get("commandId")
    if type(command_id) is int:
        command_id = str(command_id)
    if type(command_id) is not str or not command_id:
        return "a command has no readable commandId"
    if len(command_id) > ID_CAP:  # cut, it would be an id no answer gave
        return f"a command's commandId is longer than {ID_CAP} characters"
    if redact.carries_secret(command_id):
        return UNKEPT_ID
    name = item.get("commandName")
    if type(name) is dict:
        name = name.get("defaultValue")
    state = item.get("state")
    return Command(
        command_id,
        state if type(state) is int else None,
        _int_or_none(item.get("createTime")),
        name[:NAME_CAP] if type(name) is str else None,
    )


def command_full(item: object) -> Command | str:
    """A command with every field a match looks at (search answers only)."""
    command = command_of(item)
    if isinstance(command, str):
        return command
    assert type(item) is dict
    kind, tsl, name = item.get("commandType"), item.get("tslIdentifier"), item.get("commandName")
    i18n = name.get("i18nValue") if type(name) is dict else None
    names = tuple(
        (str(locale)[:32], text[:NAME_CAP])
        for locale, text in (i18n.items() if type(i18n) is dict else ())
        if type(text) is str
    )[:16]
    return command._replace(
        command_type=kind if type(kind) is int else None,
        tsl_identifier=tsl[:NAME_CAP] if type(tsl) is str else None,
        names=names,
    )


ID_CAP, NAME_CAP, EPOCH_MS_CAP = 128, 256, 10**15
# An id holding a secret of this run is not masked (a masked id would be claimed) but unreadable.
UNKEPT_ID = "a command's commandId holds a secret of this run (not kept)"


def _int_or_none(value: object) -> int | None:
    """An epoch-ms number from a number or a numeric string; None for anything else (a
    string of 5,000 digits, a superscript two that str.isdigit() accepts but int() refuses)."""
    if type(value) is int:
        return value if -EPOCH_MS_CAP < value < EPOCH_MS_CAP else None
    if type(value) is str and 0 < len(value) <= 15 and value.isascii() and value.isdigit():
        return int(value)
    return None
