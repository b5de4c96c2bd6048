"""Job files: what is accepted, what each refusal says (file, line, field, fix)."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.errors import JobFileError
from worker.jobs.parse import load_job
from worker.jobs.plan import plan, run_targets
from worker.jobs.units import parse_duration
from worker.model import Target

HEAD = "version: 1\nname: t\norg_id: o1\n"


def write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    """Write a file into tmp_path and return its path."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def targets_of(path: Path) -> list[Target]:
    """Load, plan and list the targets a run would send."""
    job = load_job(path)
    return [target for _, target in run_targets(job, plan(job))]


def refusal(path: Path) -> str:
    """The error text of a job that must be refused."""
    with pytest.raises(JobFileError) as caught:
        plan(load_job(path))
    return str(caught.value)


def test_inline_csv_and_jsonl_targets_with_defaults(tmp_path: Path) -> None:
    """Inline targets come first, then the file; org_id and command_id defaults apply."""
    write(
        tmp_path,
        "asset_id,product_key,device_key,command_id,org_id\na2,,,,\n,pk,dk,42,o2\n",
        "devices.csv",
    )
    job = write(
        tmp_path, HEAD + "command_id: '7'\ntargets:\n  - asset_id: a1\ntargets_file: devices.csv\n"
    )
    assert targets_of(job) == [
        Target(org_id="o1", asset_id="a1", command_id="7"),
        Target(org_id="o1", asset_id="a2", command_id="7"),
        Target(org_id="o2", product_key="pk", device_key="dk", command_id="42"),
    ]
    write(tmp_path, '{"asset_id": "a3"}\n\n{"product_key": "p", "device_key": "d"}\n', "d.jsonl")
    job = write(tmp_path, HEAD + "targets_file: d.jsonl\n", "j2.yaml")
    assert [t.asset_id or t.device_key for t in targets_of(job)] == ["a3", "d"]


@pytest.mark.parametrize(
    ("written", "expected"),
    [("0123", "0123"), ("on", "on"), ("12:30:00", "12:30:00"), ("1e3", "1e3"), ("'007'", "007")],
)
def test_ids_keep_their_literal_text(tmp_path: Path, written: str, expected: str) -> None:
    """YAML 1.1 would turn 0123 into 83, on into true, 12:30:00 into 45000: ids stay text."""
    job = write(tmp_path, HEAD + f"targets:\n  - asset_id: {written}\n    command_id: {written}\n")
    (target,) = targets_of(job)
    assert target.asset_id == expected
    assert target.command_id == expected


@pytest.mark.parametrize(
    ("body", "where", "words"),
    [
        ("- a\n", "job.yaml", "must be a YAML mapping"),
        (HEAD + "targts: []\n", "job.yaml:4: targts", "did you mean 'targets'"),
        (HEAD + "targets:\n  - command_id: '1'\n", "job.yaml:5: targets[0]", "no device selector"),
        (HEAD + "targets:\n  - product_key: p\n", "job.yaml:5: targets[0]", "add device_key"),
        (
            HEAD + "targets:\n  - {asset_id: a, device_key: d, product_key: p}\n",
            "job.yaml:5: targets[0]",
            "keep one selector",
        ),
        (HEAD + "targets:\n  - asset_id: ''\n", "job.yaml:5: targets[0].asset_id", "empty"),
        (HEAD + "targets:\n  - asset_id: '  '\n", "job.yaml:5: targets[0].asset_id", "only spaces"),
        (HEAD + "targets:\n  - asset_id:\n", "job.yaml:5: targets[0].asset_id", "is empty"),
        (
            HEAD + "limits: {rate: 0}\ntargets: [{asset_id: a}]\n",
            "job.yaml:4: limits.rate",
            "not above zero",
        ),
        (HEAD + "limits: {rate: -5}\ntargets: [{asset_id: a}]\n", "limits.rate", "not above zero"),
        (
            HEAD + "limits: {concurrency: 0}\ntargets: [{asset_id: a}]\n",
            "limits.concurrency",
            "not above zero",
        ),
        (
            HEAD + "limits: {concurrency: 2.5}\ntargets: [{asset_id: a}]\n",
            "limits.concurrency",
            "whole number",
        ),
        (
            HEAD + "limits: {attempts: 0}\ntargets: [{asset_id: a}]\n",
            "limits.attempts",
            "above zero",
        ),
        (HEAD + "limits: {timeout: 0}\ntargets: [{asset_id: a}]\n", "limits.timeout", "above zero"),
        (
            HEAD + "limits: {deadline: soon}\ntargets: [{asset_id: a}]\n",
            "limits.deadline",
            "not a duration",
        ),
        (HEAD + "limits: {rate: yes}\ntargets: [{asset_id: a}]\n", "limits.rate", "not a number"),
        (
            HEAD + "abort: {failure_ratio: 2}\ntargets: [{asset_id: a}]\n",
            "abort.failure_ratio",
            "above 1",
        ),
        ("version: 1\ntargets:\n  - asset_id: a\n", "job.yaml:3: targets[0]", "has no org_id"),
        ("name: x\norg_id: o\ntargets: [{asset_id: a}]\n", "job.yaml:1: version", "version: 1"),
        (
            HEAD + "targets: [{asset_id: a}]\ntargets_file: nope.csv\n",
            "targets_file",
            "does not exist",
        ),
        (HEAD + "targets:\n  - asset_id: [a]\n", "targets[0].asset_id", "single text value"),
        ("version: 1\n  bad: [\n", "job.yaml:2", "not valid YAML"),
    ],
)
def test_refusals_name_file_line_field(tmp_path: Path, body: str, where: str, words: str) -> None:
    """Each bad job is refused with the place, the field and what to do."""
    message = refusal(write(tmp_path, body))
    assert where in message
    assert words in message


def test_all_problems_are_reported_at_once(tmp_path: Path) -> None:
    """Several mistakes: one error listing each of them."""
    job = write(tmp_path, HEAD + "limits: {rate: 0, attempts: 0}\ntargets:\n  - asset_id: ''\n")
    with pytest.raises(JobFileError) as caught:
        load_job(job)
    assert len(caught.value.problems) == 3


@pytest.mark.parametrize(
    ("content", "name", "words"),
    [
        ("asset_id,colour\na,b\n", "d.csv", "unknown column"),
        ("asset_id\n\n", "d.csv", None),
        ("product_key,device_key\np,\n", "d.csv", ":2: has half a device pair"),
        ("asset_id,product_key\na,b,c\n", "d.csv", ":2: has 3 cells"),
        ("asset_id\n a\n", "d.csv", "spaces around it"),
        ('{"asset_id": 123}\n', "d.jsonl", ":1: asset_id: 123 is not text"),
        ('{"asset_id": "a"}\n{oops\n', "d.jsonl", ":2: not valid JSON"),
        ('["a"]\n', "d.jsonl", "must be a JSON object"),
        ('{"device": "a"}\n', "d.jsonl", "unknown key"),
    ],
)
def test_targets_file_refusals(tmp_path: Path, content: str, name: str, words: str | None) -> None:
    """A bad row is refused with its row or line number, before anything is sent."""
    write(tmp_path, content, name)
    job = write(tmp_path, HEAD + f"targets_file: {name}\n")
    if words is None:
        assert targets_of(job) == []  # a header and blank lines: nothing to do, no error
        return
    message = refusal(job)
    assert words in message
    assert name in message


def test_duplicates_are_dropped_naming_both_places(tmp_path: Path) -> None:
    """The second occurrence is dropped; the note names where both were written."""
    write(tmp_path, "asset_id\na2\na1\n", "d.csv")
    job_path = write(tmp_path, HEAD + "targets:\n  - asset_id: a1\ntargets_file: d.csv\n")
    job = load_job(job_path)
    result = plan(job)
    assert (result.listed, result.total) == (3, 2)
    (note,) = result.duplicate_notes
    assert "d.csv:3" in note
    assert "job.yaml:5" in note
    assert [t.asset_id for _, t in run_targets(job, result)] == ["a1", "a2"]


def test_same_device_different_commands_are_not_duplicates(tmp_path: Path) -> None:
    """Two commands of one device are two targets."""
    job = write(
        tmp_path,
        HEAD + "targets:\n  - {asset_id: a, command_id: '1'}\n"
        "  - {asset_id: a, command_id: '2'}\n  - {asset_id: a}\n",
    )
    assert len(targets_of(job)) == 3


def test_targets_hash_changes_with_the_list(tmp_path: Path) -> None:
    """The targets sha256 covers the effective targets (defaults applied)."""
    one = plan(load_job(write(tmp_path, HEAD + "targets: [{asset_id: a}]\n", "a.yaml")))
    two = plan(load_job(write(tmp_path, HEAD.replace("o1", "o2") + "targets: [{asset_id: a}]\n")))
    assert one.targets_sha256 != two.targets_sha256


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("45m", 2700), ("2h", 7200), ("1h30m", 5400), (30, 30)]
)
def test_durations(text: str | int, seconds: float) -> None:
    """Deadlines read as seconds."""
    assert parse_duration(text) == seconds


def test_every_shipped_job_loads() -> None:
    """Every job in jobs/ is valid (a query job's targets are found when it runs)."""
    jobs = sorted(Path(__file__).resolve().parent.parent.joinpath("jobs").glob("*.yaml"))
    assert jobs, "jobs/ should hold example jobs"
    for path in jobs:
        job = load_job(path)
        assert plan(job).total > 0 or job.query is not None, path


def test_a_resume_plan_builds_only_what_is_still_pending(tmp_path: Path) -> None:
    """With the done set, the plan marks what is left (duplicates and the done excluded), the
    run's pass yields exactly what the digest pass would, and a finished run's resume does not
    read the targets file again."""
    rows = [f"as{i:06d}" for i in range(50)] + ["as000003"]  # one duplicate
    (tmp_path / "t.csv").write_text("asset_id\n" + "".join(f"{r}\n" for r in rows))
    job_path = tmp_path / "job.yaml"
    job_path.write_text(
        "version: 1\nname: t\norg_id: o1\ntargets_file: t.csv\ntargets:\n  - asset_id: inline1\n"
    )
    job = load_job(job_path)
    everything = list(run_targets(job, plan(job)))
    done = {target.digest() for _, target in everything[::3]}
    marked = plan(job, done=done)
    assert marked.pending_count == len(everything) - len(done)
    assert list(run_targets(job, marked)) == list(run_targets(job, plan(job), done))
    finished = plan(job, done={target.digest() for _, target in everything})
    assert finished.pending_count == 0
    (tmp_path / "t.csv").unlink()
    assert list(run_targets(job, finished)) == []
