"""What the watcher checks before a spooled job reads anything, and what the spool's other users
may read about a job that failed (design.md, "Spool trust").

A spool is shared: whoever can drop a file into ``incoming/`` is not necessarily someone who may
read every file the watcher can. So a job is refused, before anything is read through it, when
it would reach past its dropper: a job file that is a link to another file, a targets file that
resolves outside the spool (or has a second name, a hard link), a gateway other than the
watcher's own. And the error files in ``failed/``, which every user of the spool reads, say the
field, the path and the problem but never a file's content: :func:`public_text` keeps only the
words our own messages are made of. The watcher's log keeps the whole message.
"""

from __future__ import annotations

import ast
import functools
import importlib
import re
import stat
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import anyio
import structlog

from worker.app.settings import same_gateway
from worker.app.spool import JobRefused
from worker.errors import JobFileError, shown
from worker.model import Job

log = structlog.get_logger("worker.watch")

# The modules whose messages reach a spooled job's error file: their string literals are the
# vocabulary of a public message (anything else in a message came from a file).
MESSAGE_MODULES = (
    "worker.errors",
    "worker.model",
    "worker.jobs.parse",
    "worker.jobs.nodes",
    "worker.jobs.rules",
    "worker.jobs.targets",
    "worker.jobs.plan",
    "worker.jobs.units",
    "worker.store.layout",
    "worker.store.lock",
    "worker.app.prepare",
    "worker.app.settings",
    "worker.app.spool",
    "worker.app.watch",
)
HIDDEN = "…"
NOT_SHOWN = (
    "(values read from files are shown as …: this file is readable by the spool's users. "
    "`worker validate` on the job shows them to whoever can read its files; the watcher's log "
    "has the whole message)"
)
_WORD = re.compile(r"[A-Za-z0-9_]+")
_QUOTED = re.compile(r"'(?:[^'\\\n]|\\.)*'|\"(?:[^\"\\\n]|\\.)*\"")  # as repr() writes
# Problems.add writes "NAME: unknown key; ..." with the key as the file spelt it.
_RAW_KEY = re.compile(r"^(?P<name>.*): (?P<what>unknown key|given twice); ", re.DOTALL)
_SECTION = re.compile(r"(?:[A-Za-z_]+(?:\[\d+\])?\.)+")
_INDEX = re.compile(r"\[\d+\]")  # targets[12]: a place in a list, not a value
_EDGES = "'\"()[]{},;:.?!"
_INNER = frozenset("._-/()[]'\",:=+*<>" + HIDDEN)


def check_job_file(job_file: Path) -> None:
    """The claimed job file must be a regular file with no other name: a symbolic or hard
    link dropped in would have the watcher read, and report on, a file its dropper may not
    be able to read."""
    info = job_file.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise JobRefused(
            f"{job_file}: the job file is a symbolic link; nothing was read through it. Drop "
            "the file itself into incoming/"
        )
    if not stat.S_ISREG(info.st_mode):
        raise JobRefused(f"{job_file}: not a regular file; drop a YAML job file")
    if info.st_nlink > 1:
        raise JobRefused(
            f"{job_file}: the job file has other names (hard links); nothing was read. Drop "
            "a copy of it into incoming/"
        )


def check_job(job: Job, *, spool: Path, gateway: str) -> None:
    """A loaded job, before its targets are read: the watcher's gateway (a job naming
    another is refused: credentials go only where the operator said) and a targets file
    inside the spool. `spool` is the spool's resolved path."""
    if job.gateway is not None and not same_gateway(job.gateway, gateway):
        log.warning("worker.job_gateway_refused", job=str(job.path), named=shown(job.gateway))
        raise JobRefused(
            f"{job.path}: gateway: the job names a gateway other than this watcher's. In a "
            "spool every job runs against the watcher's own gateway (--gateway or "
            "ENOS_GATEWAY); credentials never go where a job file says. Nothing was sent. "
            "Remove 'gateway:' from the job, or drop it into the spool of a watcher of that "
            "gateway"
        )
    if job.targets_file is not None:
        _check_targets_file(job.path, job.targets_file.path, spool)


def _check_targets_file(job_path: Path, path: Path, spool: Path) -> None:
    """Inside the spool after every symbolic link, and no other name (a hard link to a file
    outside would pass the first test)."""
    if not path.resolve().is_relative_to(spool):
        raise JobRefused(
            f"{job_path}: targets_file must be inside the spool: the file it names resolves "
            f"(after symbolic links) outside {spool}; nothing was read from it. Put it in "
            f"{spool}/targets/ and write targets_file: ../targets/NAME.csv"
        )
    try:
        links = path.stat().st_nlink
    except FileNotFoundError:
        return  # gone since the job was read: the plan says so
    if links > 1:
        raise JobRefused(
            f"{job_path}: targets_file: the file has other names (hard links), which may be "
            "outside the spool; nothing was read from it. Copy it into the spool instead"
        )


class FileState(NamedTuple):
    """What changes when a file is written: compared over time to see a producer at work."""

    size: int
    mtime_ns: int
    inode: int

    @property
    def age_s(self) -> float:
        """Seconds since the file was last written, by its own clock."""
        return time.time() - self.mtime_ns / 1e9


def file_state(path: Path) -> FileState | None:
    """The file's state now; None when it is gone (the plan will say so)."""
    try:
        info = path.stat()
    except OSError:
        return None
    return FileState(info.st_size, info.st_mtime_ns, info.st_ino)


async def still(path: Path, quiet_s: float, poll_s: float, stopping: Callable[[], bool]) -> bool:
    """Wait until a job's targets file has not changed for `quiet_s` seconds, as the job file
    must not have before its claim: a producer still writing the CSV must not have half of it
    planned. Still by the file's own clock, or seen unchanged for that long (a clock skewed
    into the future must not hold the job forever). False when `stopping()` comes first."""
    seen, since = file_state(path), time.monotonic()
    if seen is not None and seen.age_s < quiet_s:
        log.info("worker.targets_file_changing", path=path.name, still_for_s=quiet_s)
    while seen is not None and seen.age_s < quiet_s and time.monotonic() - since < quiet_s:
        if stopping():
            return False
        await anyio.sleep(min(poll_s, quiet_s))
        now = file_state(path)
        if now != seen:
            seen, since = now, time.monotonic()
    return True


def public_text(error: Exception, roots: Sequence[Path] = ()) -> str:
    """What the spool's users may read about `error`. A refusal of the watcher's own is
    written from field, path and problem only and goes as it is. Any other message may quote
    a file (a value, a key, a CSV header line): each problem keeps its location (a path in
    one of `roots`, with its line) and our own words; a key it names is …, a quoted value is …
    unless it is one of our own texts, and so is any other word."""
    if isinstance(error, JobRefused):
        return str(error)
    problems = error.problems if isinstance(error, JobFileError) else [str(error)]
    text = "\n".join(_public_problem(problem, roots) for problem in problems)
    return f"{text}\n{NOT_SHOWN}" if HIDDEN in text else text


def _public_problem(problem: str, roots: Sequence[Path]) -> str:
    """One problem: its location as it is, a raw key hidden, quoted values hidden, then the
    rest word by word."""
    place, rest = _location(problem, roots)
    rest = _RAW_KEY.sub(_hide_key, rest)
    rest = _QUOTED.sub(_hide_quoted, rest)
    return place + _public_words(rest, tuple(f"{root}/" for root in roots))


def _location(problem: str, roots: Sequence[Path]) -> tuple[str, str]:
    """("PATH:LINE: ", the rest) when the problem starts at a path in one of `roots` (the
    spool: a file's name there is no file's content)."""
    for root in roots:
        match = re.match(re.escape(str(root)) + r"(?:/[^\s:]*)?(?::\d+)?: ", problem)
        if match:
            return match.group(), problem[match.end() :]
    return "", problem


def _hide_key(match: re.Match[str]) -> str:
    """A key the job file wrote, unknown or repeated, is the file's text (it may hold spaces
    and colons, so it is taken whole, up to the last such problem): only a leading section
    of our own (``limits.``) stays."""
    section = _SECTION.match(match.group("name"))
    prefix = section.group() if section and _all_ours(section.group()) else ""
    return f"{prefix}{HIDDEN}: {match.group('what')}; "


def _hide_quoted(match: re.Match[str]) -> str:
    """A quoted text stays when it is one of ours ('version: 1'), else it is hidden."""
    text = match.group()
    return text if text[1:-1] in phrases() else text[0] + HIDDEN + text[-1]


def _public_words(text: str, inside: tuple[str, ...]) -> str:
    """Each word of ours, and each path `inside` the spool, as it is; any other word as …; a
    run of hidden words (with only punctuation between) is one …"""
    pieces: list[str] = []
    for token in text.split():
        piece = _public_token(token, inside)
        if pieces and _only_hidden(pieces[-1]) and _only_hidden(piece):
            pieces[-1] = HIDDEN + (piece[-1] if piece[-1] in ",;:." else "")
        else:
            pieces.append(piece)
    return " ".join(pieces)


def _only_hidden(piece: str) -> bool:
    """Nothing but … and punctuation is left of the token."""
    return HIDDEN in piece and not _WORD.search(piece)


def _public_token(token: str, inside: tuple[str, ...]) -> str:
    """The token when it is made of our own words (or … already) and punctuation, or is a
    path inside the spool (a name there is no file's content); else … between the
    punctuation around it."""
    core = token.strip(_EDGES)
    if not core or core == HIDDEN or core.startswith(inside):
        return token
    if _WORD.search(core) and _all_ours(core):
        return token
    start = token.index(core)
    return token[:start] + HIDDEN + token[start + len(core) :]


def _all_ours(text: str) -> bool:
    """Every word of `text` is one of ours, and between them only plain punctuation."""
    checked = _INDEX.sub("[]", text)
    inner = set(_WORD.sub("", checked))
    return inner <= _INNER and all(word in vocabulary() for word in _WORD.findall(checked))


@functools.cache
def vocabulary() -> frozenset[str]:
    """Every word of our own texts (see :func:`phrases`)."""
    return frozenset(word for text in phrases() for word in _WORD.findall(text))


@functools.cache
def phrases() -> frozenset[str]:
    """Our own texts: the string literals (docstrings aside) of MESSAGE_MODULES, whole, and
    each part of one between quotes. A module whose source cannot be read adds none (then
    more is hidden, never less)."""
    texts: set[str] = set()
    for name in MESSAGE_MODULES:
        source = importlib.import_module(name).__file__
        try:
            tree = ast.parse(Path(source or "").read_text(encoding="utf-8"))
        except (OSError, SyntaxError, ValueError):
            continue
        texts.update(_literals(tree))
    quoted = {part[1:-1] for text in texts for part in _QUOTED.findall(text)}
    return frozenset(texts | quoted)


def _literals(tree: ast.Module) -> set[str]:
    """A module's string constants and f-string parts, docstrings left out."""
    docstrings: set[int] = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            docstrings.add(id(body[0].value))
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        if id(node) not in docstrings
    }
