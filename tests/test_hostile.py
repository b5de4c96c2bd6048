"""Hostile and careless files: each gives the job-file error with a location, quickly and in
bounded memory; never another exception, a hang, or an unbounded message."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from worker.errors import JobFileError
from worker.jobs.parse import load_job
from worker.jobs.plan import plan

HEAD = "version: 1\nname: t\norg_id: o1\n"
LAUGHS = (
    "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
    "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n"
    "g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"
)


def refused(path: Path) -> str:
    """Load and plan `path`; it must be refused with a JobFileError; returns its message."""
    began = time.monotonic()
    with pytest.raises(JobFileError) as caught:
        plan(load_job(path))
    assert time.monotonic() - began < 5
    message = str(caught.value)
    assert len(message) < 4000, "an error message must stay bounded"
    return message


@pytest.mark.parametrize(
    ("body", "line"),
    [
        ("version: !!int ''\nname: t\norg_id: o1\ntargets: [{asset_id: a}]\n", 1),
        (HEAD + "limits: {rate: !!float ''}\ntargets: [{asset_id: a}]\n", 4),
        ("version: !!bool ''\nname: t\norg_id: o1\ntargets: [{asset_id: a}]\n", 1),
        (HEAD + "limits:\n  deadline: !!timestamp ''\ntargets: [{asset_id: a}]\n", 5),
        (HEAD + "limits:\n  timeout: !!binary yes\ntargets: [{asset_id: a}]\n", 5),
        (HEAD + "limits:\n  rate: !!omap [a]\ntargets: [{asset_id: a}]\n", 5),
        (HEAD + "limits:\n  rate: !!float abc\ntargets: [{asset_id: a}]\n", 5),
        (HEAD + "limits:\n  attempts: !!int 0xZZ\ntargets: [{asset_id: a}]\n", 5),
        (HEAD + "abort:\n  failure_ratio: !!set {a}\ntargets: [{asset_id: a}]\n", 5),
    ],
)
def test_tagged_scalars_are_job_file_errors(tmp_path: Path, body: str, line: int) -> None:
    """Tags YAML cannot build are the job-file error at their line (were IndexError, KeyError,
    binascii.Error: a traceback and exit 1)."""
    job = tmp_path / "job.yaml"
    job.write_text(body)
    assert f"{job}:{line}:" in refused(job)


@pytest.mark.parametrize("field", ["rate", "deadline", "timeout"])
def test_billion_laughs_in_limits_stays_small(tmp_path: Path, field: str) -> None:
    """An alias bomb under a limit: refused in bounded time and memory, the message bounded
    (it was built from the repr of the expanded value: past 2 GB)."""
    job = tmp_path / "job.yaml"
    job.write_text(
        LAUGHS.replace("a: &a", "x_a: &a") + "version: 1\nname: t\norg_id: o1\n"
        f"limits:\n  {field}: *h\ntargets: [{{asset_id: a}}]\n"
    )
    message = refused(job)
    assert "limits." in message


def test_a_fifo_or_device_is_refused_without_reading(tmp_path: Path) -> None:
    """A FIFO would hang and /dev/zero never ends: both are refused before being opened."""
    fifo = tmp_path / "job.yaml"
    os.mkfifo(fifo)
    assert "not a regular file" in refused(fifo)
    assert "not a regular file" in refused(Path("/dev/zero"))
    job = tmp_path / "real.yaml"
    job.write_text(HEAD + "targets_file: pipe.csv\n")
    os.mkfifo(tmp_path / "pipe.csv")
    assert "is not a regular file" in refused(job)


def test_an_oversized_job_file_says_where_targets_belong(tmp_path: Path) -> None:
    """Past 16 MiB a job file is refused, pointing at targets_file."""
    job = tmp_path / "job.yaml"
    with job.open("wb") as stream:
        stream.write(HEAD.encode())
        stream.truncate(17 << 20)
    assert "targets_file" in refused(job)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"asset_id\nas000001\nas\xd2002\n", ":3: not UTF-8 text (byte 0xd2"),
        (b"asset_id\n" + b"a" * 100_000 + b"\n", ":2: the line is longer than"),
        (b"," * 100_000 + b"\n", ":1: the line is longer than"),
        (b'asset_id\n"' + b"a\n" * 70_000 + b'"\n', "not valid CSV"),
        (b"asset_id\n" + b"a" * 300 + b"\n", "300 characters long"),
        (b"asset_id\nas\x00001\n", "U+0000"),
        ("asset_id\nas\u202e001\n".encode(), "U+202E"),
        (b'asset_id\n"as\n001"\n', "U+000A"),
        (b"bogus," * 10 + b"\n", "unknown column"),
    ],
)
def test_hostile_csv_rows_are_refused_with_the_line(
    tmp_path: Path, content: bytes, words: str
) -> None:
    """Bad bytes, giant lines or fields, control and bidi characters, long ids: the job-file
    error naming the file and line (were UnicodeDecodeError, _csv.Error, or accepted)."""
    (tmp_path / "devices.csv").write_bytes(content)
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "targets_file: devices.csv\n")
    message = refused(job)
    assert words in message
    assert "devices.csv" in message


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ('{"asset_id": "as\\u0000x"}', "U+0000"),
        ('{"asset_id": "as\\nx"}', "U+000A"),
        ('{"asset_id": "as\\u2066x"}', "U+2066"),
        ('{"asset_id": "' + "a" * 257 + '"}', "257 characters long"),
        ('{"asset_id": "\xd2"}', "not valid JSON"),
    ],
)
def test_hostile_jsonl_rows_are_refused(tmp_path: Path, line: str, words: str) -> None:
    """The same rules for JSONL targets."""
    (tmp_path / "t.jsonl").write_bytes(line.encode("latin-1") + b"\n")
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + "targets_file: t.jsonl\n")
    message = refused(job)
    assert words in message
    assert "t.jsonl:1" in message


@pytest.mark.parametrize(
    ("target", "words"),
    [
        ('{asset_id: "as\\nx"}', "U+000A"),
        ('{asset_id: "as\\u202ex"}', "U+202E"),
        ("{asset_id: " + "a" * 300 + "}", "300 characters long"),
        ('{asset_id: a, command_id: "c\\x00"}', "U+0000"),
    ],
)
def test_hostile_inline_ids_are_refused(tmp_path: Path, target: str, words: str) -> None:
    """Inline YAML ids follow the same rules, with the line of the target."""
    job = tmp_path / "job.yaml"
    job.write_text(HEAD + f"targets:\n  - {target}\n")
    message = refused(job)
    assert words in message
    assert f"{job}:5:" in message
