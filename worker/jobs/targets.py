"""Targets files: a CSV (header row) or JSONL list of targets, read as rows, streamed, never
held; and the rules every row (and every inline target) must meet: ids of bounded length
without control, line-break, zero-width or bidi characters; one device selector; an org.

Lines are read a block at a time through a bounded reader: a line over LINE_MAX bytes (a 200 MB
"id", a header of fifty million commas) is refused before it is held; text must be UTF-8.
"""

from __future__ import annotations

import csv
import io
import operator
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, NoReturn

import orjson

from worker.errors import JobFileError, shown
from worker.model import JsonObject, Match, Target, TargetsFile, selector_problem

TARGET_KEYS = ("asset_id", "product_key", "device_key", "command_id", "org_id")
Row = tuple[str, str, str, str, str]  # TARGET_KEYS in order; "" where absent
MAX_PROBLEMS = 20
LINE_MAX = 1 << 16  # bytes of one targets-file line: five ids of 256 characters fit many times
BOTH_MATCH_AND_ID = (
    "has both a match and a command_id; remove one (a match finds the command ids itself)"
)


def text_problem(text: str) -> str | None:
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


def row_target(
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
        return BOTH_MATCH_AND_ID
    return Target(
        org_id=org,
        asset_id=asset or None,
        product_key=product or None,
        device_key=device or None,
        command_id=command or None,
        source=where,
        match=match,
    )


def file_rows(targets_file: TargetsFile) -> Iterator[tuple[int, Row]]:
    """(line number, row) for each target row of a CSV or JSONL file."""
    if targets_file.fmt == "csv":
        return _csv_rows(targets_file.path)
    return _jsonl_rows(targets_file.path)


_BLOCK = 1 << 20  # bytes of a targets file read at a time


def open_regular(path: Path, what: str = "targets file") -> BinaryIO:
    """`path` opened to read, checked to be a regular file through the descriptor itself: a
    FIFO swapped in after validation neither blocks the open (O_NONBLOCK) nor is read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise JobFileError([f"{path}: cannot read the {what}: {exc.strerror}"]) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JobFileError(
            [f"{path}: not a regular file (a FIFO, a device or a directory); give a file"]
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _line_blocks(path: Path) -> Iterator[tuple[int, list[bytes]]]:
    """(number of the first line, the complete lines without their newline), a block at a
    time: a line over LINE_MAX bytes (a 200 MB "id", a header of fifty million commas) is
    refused before it is held, and there is no Python work per line here."""
    with open_regular(path) as stream:
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


def _json_row(where: str, item: JsonObject) -> Row:
    for name, value in item.items():
        if name not in TARGET_KEYS:
            raise JobFileError(
                [f"{where}: unknown key {shown(name)}; keys are {', '.join(TARGET_KEYS)}"]
            )
        if value is not None and not isinstance(value, str):
            raise JobFileError([f"{where}: {name}: {shown(value)} is not text; write it in quotes"])
        problem = text_problem(value) if isinstance(value, str) else None
        if problem is not None:
            raise JobFileError([f"{where}: {name}: {problem}"])
    return tuple(item.get(name) or "" for name in TARGET_KEYS)  # type: ignore[return-value]
