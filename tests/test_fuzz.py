"""Fuzzing the job-file parser and the CSV/JSONL readers with hypothesis.

Every input, generated or mutated, must give a valid job (whose targets then stream) or the
job-file error with a location: never another exception, and within a time bound.

Profiles (``HYPOTHESIS_PROFILE``): ``ci`` (the default: derandomized, a fixed budget, well under
a minute) and ``long`` (thousands of examples, for a local run before a release).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.errors import JobFileError
from worker.jobs.parse import JOB_KEYS, load_job
from worker.jobs.plan import plan, run_targets
from worker.jobs.rules import LIMIT_KEYS
from worker.jobs.targets import TARGET_KEYS

settings.register_profile(
    "ci",
    max_examples=120,
    derandomize=True,
    deadline=3000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("long", max_examples=5000, deadline=3000, database=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

LOCATED = re.compile(r"^[^\n]+?\.(yaml|csv|jsonl)(:\d+)?: ", re.MULTILINE)
SCALARS = [
    "1",
    "0",
    "-1",
    "1.5",
    "1e309",
    ".nan",
    ".inf",
    "-.inf",
    "0x1F",
    "0o17",
    "017",
    "yes",
    "no",
    "on",
    "~",
    "null",
    "''",
    '""',
    "'a b'",
    "2h",
    "90s",
    "1h30m",
    "auto",
    "unlimited",
    "12:30:00",
    "!!int ''",
    "!!float ''",
    "!!bool ''",
    "!!timestamp ''",
    "!!binary yes",
    "!!omap [a]",
    "!!float abc",
    "!!int 0xZZ",
    "!!set {a}",
    "!!str 5",
    "!!null x",
    "!!python/object:os.system x",
    "&anchor x",
    "*anchor",
    "[1, 2]",
    "{a: b}",
    "[]",
    "{}",
    "|\n  block",
    ">\n  folded",
    "'\u202e'",
    "'\\x00'",
    '"\\u0000"',
    "'" + "x" * 300 + "'",
    "as000001",
    "o15541858646501",
    "https://apim.example.com",
    "http://",
    "devices.csv",
    "t.jsonl",
    "/dev/zero",
    "..",
]
KEYS = [*JOB_KEYS, "limits", "abort", "bogus", "version", "targets"]
VALID = """version: 1
name: fuzz
org_id: o15541858646501
limits: {rate: 10, concurrency: 4, attempts: 3, timeout: 5, deadline: 1h}
abort: {failure_ratio: 0.5, min_finished: 10}
targets:
  - asset_id: as000001
  - {product_key: p1, device_key: d1, command_id: "2278935391225618432"}
targets_file: devices.csv
"""


@contextmanager
def job_dir() -> Iterator[Path]:
    """A fresh directory per example (hypothesis reruns the body many times)."""
    with tempfile.TemporaryDirectory() as name:
        yield Path(name)


def load_or_refuse(job: Path) -> None:
    """The property: a valid job whose targets stream, or a JobFileError with a location."""
    try:
        loaded = load_job(job)
        for _ in run_targets(loaded, plan(loaded)):
            pass
    except JobFileError as exc:
        problems = exc.problems
    else:
        return
    assert problems, "a job-file error names at least one problem"
    for problem in problems:
        assert LOCATED.match(problem), f"no location: {problem[:200]!r}"
        assert len(problem) < 2000, "an error message must stay bounded"


scalar = st.sampled_from(SCALARS)
flow_limits = st.dictionaries(st.sampled_from([*LIMIT_KEYS, "bogus"]), scalar, max_size=4).map(
    lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
)
target = st.dictionaries(st.sampled_from([*TARGET_KEYS, "bogus"]), scalar, max_size=3).map(
    lambda d: "  - {" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
)
line = st.one_of(
    st.tuples(st.sampled_from(KEYS), scalar).map(lambda kv: f"{kv[0]}: {kv[1]}"),
    flow_limits.map(lambda v: f"limits: {v}"),
    st.lists(target, max_size=4).map(lambda ts: "targets:\n" + "\n".join(ts)),
)
document = st.lists(line, max_size=8).map("\n".join)


@given(document)
def test_generated_job_files(text: str) -> None:
    """Documents from the job file's own keys with hostile scalars, tags and aliases."""
    with job_dir() as directory:
        (directory / "devices.csv").write_text("asset_id\nas000002\n")
        job = directory / "job.yaml"
        job.write_text(text, encoding="utf-8")
        load_or_refuse(job)


@given(
    st.lists(
        st.tuples(st.integers(0, len(VALID)), st.integers(0, 8), st.binary(max_size=6)),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_job_files(edits: list[tuple[int, int, bytes]]) -> None:
    """A valid job file with bytes cut out and others put in, anywhere."""
    raw = bytearray(VALID.encode())
    for at, cut, put in edits:
        raw[at : at + cut] = put
    with job_dir() as directory:
        (directory / "devices.csv").write_text("asset_id\nas000002\n")
        job = directory / "job.yaml"
        job.write_bytes(bytes(raw))
        load_or_refuse(job)


cell = st.one_of(
    st.sampled_from(["as000001", "", " a ", "a,b", '"q"', "\u202e", "x" * 300]),
    st.text(max_size=12),
)
csv_text = st.tuples(
    st.lists(st.sampled_from([*TARGET_KEYS, "bogus", ""]), min_size=1, max_size=4),
    st.lists(st.lists(cell, max_size=5), max_size=6),
).map(lambda hr: "\n".join([",".join(hr[0]), *(",".join(row) for row in hr[1])]) + "\n")


@given(st.one_of(csv_text.map(str.encode), st.binary(max_size=200)))
def test_csv_targets_files(content: bytes) -> None:
    """CSV targets files: generated rows and raw bytes (bad UTF-8, NULs, quotes, BOMs)."""
    with job_dir() as directory:
        (directory / "devices.csv").write_bytes(content)
        job = directory / "job.yaml"
        job.write_text("version: 1\nname: f\norg_id: o1\ntargets_file: devices.csv\n")
        load_or_refuse(job)


json_value = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=8),
    st.lists(st.integers(), max_size=2),
)
json_line = st.one_of(
    st.dictionaries(st.sampled_from([*TARGET_KEYS, "bogus"]), json_value, max_size=4).map(
        lambda d: __import__("json").dumps(d)
    ),
    st.text(max_size=30),
)


@given(
    st.one_of(
        st.lists(json_line, max_size=5).map(lambda ls: "\n".join(ls).encode()),
        st.binary(max_size=200),
    )
)
def test_jsonl_targets_files(content: bytes) -> None:
    """JSONL targets files: generated objects, wrong types, stray text and raw bytes."""
    with job_dir() as directory:
        (directory / "t.jsonl").write_bytes(content)
        job = directory / "job.yaml"
        job.write_text("version: 1\nname: f\norg_id: o1\ntargets_file: t.jsonl\n")
        load_or_refuse(job)
