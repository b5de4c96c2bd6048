"""deploy/: the Kubernetes manifests hold up on a real cluster (non-root, read-only, the
failure policy each exit code needs, every reference resolved) and the Grafana dashboard
asks only for metrics the worker exports."""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.app.metrics import RunMetrics
from worker.cli.grammar import build_parser
from worker.cli.main import HANDLERS
from worker.errors import ExitCode
from worker.jobs.parse import load_job
from worker.jobs.plan import plan

ROOT = Path(__file__).parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
DASHBOARD = DEPLOY / "grafana" / "worker-dashboard.json"
WORKLOADS = ("indexed-job.yaml", "cronjob.yaml", "spool-watcher.yaml")
DISRUPTED = frozenset({("DisruptionTarget", "True")})
SAMPLE_ENV = {"SHARD_INDEX": "2", "JOB_NAME": "worker-maintenance-29412570", "CAMPAIGN": "c-1"}


def documents() -> Iterator[tuple[str, dict[str, Any]]]:
    """(file name, object) for every object in deploy/kubernetes/."""
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            yield path.name, doc


def manifest(name: str) -> dict[str, Any]:
    (doc,) = (doc for file, doc in documents() if file == name)
    return doc


def job_spec(doc: dict[str, Any]) -> dict[str, Any]:
    """A Job's spec, or a CronJob's Job template's."""
    spec: dict[str, Any] = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec


def pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    spec = job_spec(doc) if doc["kind"] in ("Job", "CronJob") else doc["spec"]
    template: dict[str, Any] = spec["template"]["spec"]
    return template


def the_container(doc: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod_spec(doc)["containers"]
    found: dict[str, Any] = container
    return found


def parsed_args(container: dict[str, Any]) -> Any:
    """The container's args as `worker` parses them, $(VAR) put in as Kubernetes would."""
    args = [re.sub(r"\$\((\w+)\)", lambda m: SAMPLE_ENV[m.group(1)], a) for a in container["args"]]
    return build_parser(HANDLERS).parse_args(args)


def dockerfile_user() -> tuple[int, int]:
    """The uid and gid the image runs as (its USER line)."""
    (line,) = re.findall(r"^USER (\d+):(\d+)$", (DEPLOY / "Dockerfile").read_text(), re.M)
    return int(line[0]), int(line[1])


# -- security ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_pod_runs_as_the_images_non_root_user_on_a_read_only_root(name: str) -> None:
    pod = pod_spec(manifest(name))
    uid, gid = dockerfile_user()
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True
    assert (security["runAsUser"], security["runAsGroup"], security["fsGroup"]) == (uid, gid, gid)
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}  # "restricted" profile
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod.get("initContainers", []):
        own = container["securityContext"]
        assert own["allowPrivilegeEscalation"] is False
        assert own["readOnlyRootFilesystem"] is True
        assert own["capabilities"]["drop"] == ["ALL"]
        assert "add" not in own["capabilities"]
        assert not own.get("privileged", False)
        assert "runAsUser" not in own  # the pod's, the image's: one number


def test_the_image_user_is_the_one_created_and_owns_the_results_directory() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    uid, gid = dockerfile_user()
    assert uid != 0
    assert f"--uid {uid} --gid {gid}" in text
    assert f"groupadd --gid {gid}" in text
    assert f"chown {uid}:{gid} /results" in text


@pytest.mark.parametrize("name", WORKLOADS)
def test_credentials_come_from_the_secret_and_the_gateway_is_set(name: str) -> None:
    env = {item["name"]: item for item in the_container(manifest(name))["env"]}
    secret = manifest("secret.example.yaml")["metadata"]["name"]
    for key in ("ENOS_APP_KEY", "ENOS_APP_SECRET"):
        assert "value" not in env[key]  # never a literal secret in a manifest
        assert env[key]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": key}
    assert env["ENOS_GATEWAY"]["value"].startswith("https://")


# -- the pod failure policy ----------------------------------------------------------------


def action(
    policy: dict[str, Any],
    exit_code: int | None,
    conditions: frozenset[tuple[str, str]] = frozenset(),
    container: str = "worker",
) -> str:
    """What the Job controller does with a failed pod: the first rule that matches, else
    Count. onExitCodes: exit code 0 never matches; In/NotIn against the named container's
    code. onPodConditions: any pattern (type, status; status defaults to True) present."""
    for rule in policy["rules"]:
        codes = rule.get("onExitCodes")
        if (
            codes is not None
            and exit_code not in (None, 0)
            and codes.get("containerName", container) == container
            and (exit_code in codes["values"]) == (codes["operator"] == "In")
        ):
            return str(rule["action"])
        for pattern in rule.get("onPodConditions", []):
            if (pattern["type"], pattern.get("status", "True")) in conditions:
                return str(rule["action"])
    return "Count"


def assert_valid_policy(doc: dict[str, Any]) -> None:
    """What the API server checks of a podFailurePolicy (pkg/apis/batch/validation), which
    a schema check does not: a Job it refuses would never start."""
    spec, pod = job_spec(doc), pod_spec(doc)
    rules = spec["podFailurePolicy"]["rules"]
    names = {c["name"] for c in pod["containers"] + pod.get("initContainers", [])}
    assert pod["restartPolicy"] == "Never"
    assert spec.get("podReplacementPolicy", "Failed") == "Failed"
    assert 1 <= len(rules) <= 20
    for rule in rules:
        assert rule["action"] in ("FailJob", "FailIndex", "Ignore", "Count")
        assert ("onExitCodes" in rule) != ("onPodConditions" in rule)  # one of them
        if rule["action"] == "FailIndex":
            assert spec.get("backoffLimitPerIndex") is not None
        codes = rule.get("onExitCodes")
        if codes is not None:
            assert codes["operator"] in ("In", "NotIn")
            assert codes.get("containerName", next(iter(names))) in names
            values = codes["values"]
            assert 1 <= len(values) <= 255
            assert values == sorted(set(values))  # ordered, no duplicates
            assert codes["operator"] != "In" or 0 not in values
        for pattern in rule.get("onPodConditions", []):
            assert pattern.get("status", "True") in ("True", "False", "Unknown")
    if "backoffLimitPerIndex" in spec:
        assert spec["completionMode"] == "Indexed"
        assert spec.get("maxFailedIndexes", 0) <= spec["completions"]


def named_exit_codes(doc: dict[str, Any]) -> set[int]:
    rules = job_spec(doc)["podFailurePolicy"]["rules"]
    return {code for rule in rules for code in rule.get("onExitCodes", {}).get("values", [])}


@pytest.mark.parametrize("name", ["indexed-job.yaml", "cronjob.yaml"])
def test_the_failure_policy_is_one_the_api_server_accepts_and_names_every_exit_code(
    name: str,
) -> None:
    doc = manifest(name)
    assert_valid_policy(doc)
    assert named_exit_codes(doc) == {int(code) for code in ExitCode if code != ExitCode.OK}
    assert job_spec(doc)["activeDeadlineSeconds"] > 0  # what ends the ignored retries


def test_the_incident_job_stops_everything_on_3_and_2_an_index_on_1_and_retries_4() -> None:
    doc = manifest("indexed-job.yaml")
    policy = job_spec(doc)["podFailurePolicy"]
    expected = {
        ExitCode.ABORTED: "FailJob",  # a failed canary or an outage is not hammered
        ExitCode.USAGE: "FailJob",  # bad input: every index reads the same
        ExitCode.FAILED: "FailIndex",  # finished: a retry fails the same targets again
        ExitCode.INTERRUPTED: "Ignore",  # quota, busy, deadline, SIGTERM: later, for free
        137: "Count",  # OOMKilled: one of backoffLimitPerIndex, the journal resumes
    }
    assert {code: action(policy, code) for code in expected} == expected
    for code in (ExitCode.INTERRUPTED, 137, 143):  # a drained node's pod, however it ended
        assert action(policy, code, DISRUPTED) == "Ignore"
    assert action(policy, ExitCode.ABORTED, DISRUPTED) == "FailJob"  # its verdict stands
    assert action(policy, None, DISRUPTED) == "Ignore"  # evicted before it started
    assert action(policy, ExitCode.ABORTED, container="sidecar") == "Count"
    assert "backoffLimit" not in job_spec(doc)  # per index: one shard cannot spend them all


def test_the_maintenance_cronjob_fails_on_1_2_3_and_retries_4_into_the_same_run() -> None:
    doc = manifest("cronjob.yaml")
    spec = job_spec(doc)
    policy = spec["podFailurePolicy"]
    for code in (ExitCode.FAILED, ExitCode.USAGE, ExitCode.ABORTED):
        assert action(policy, code) == "FailJob"
    assert action(policy, ExitCode.INTERRUPTED) == "Ignore"
    assert action(policy, 137, DISRUPTED) == "Ignore"
    assert action(policy, 137) == "Count"
    assert spec["backoffLimit"] >= 1
    assert doc["spec"]["concurrencyPolicy"] == "Forbid"
    # Every Job and every retried pod resumes the campaign's run: one directory, named in the
    # job's ConfigMap, across as many windows as the run needs.
    container = the_container(doc)
    args = parsed_args(container)
    assert args.resume_existing is True
    assert str(args.out) == f"/results/maintenance/{SAMPLE_ENV['CAMPAIGN']}"
    env = {item["name"]: item for item in container["env"]}
    volumes = {v["name"]: v for v in pod_spec(doc)["volumes"]}
    reference = env["CAMPAIGN"]["valueFrom"]["configMapKeyRef"]
    assert reference == {"name": volumes["job"]["configMap"]["name"], "key": "campaign"}
    # The job's window drives it: no per-pod deadline, and the worker waits for the opening.
    assert args.deadline is None
    assert args.no_wait is False
    assert spec["activeDeadlineSeconds"] <= 4 * 3600


def test_the_maintenance_cronjob_starts_before_its_jobs_window_and_outlasts_it(
    tmp_path: Path,
) -> None:
    """The schedule's zone is the window's; each Job starts a few minutes before an opening,
    on the window's days; the active deadline covers the window, also on the night the
    clocks go back (the opening an hour later by the start's clock)."""
    doc = manifest("cronjob.yaml")
    (data,) = (
        d["data"] for _, d in documents() if d["metadata"]["name"] == "worker-maintenance-job"
    )
    for file, text in data.items():
        (tmp_path / file).write_text(text)
    window = load_job(tmp_path / "job.yaml").window
    assert window is not None
    assert window.daily is not None
    minute, hour, _, _, days = doc["spec"]["schedule"].split()
    start = int(hour) * 60 + int(minute)
    opens, closes = window.daily
    assert doc["spec"]["timeZone"] == window.timezone
    assert 0 <= opens - start <= 15
    assert {(int(d) - 1) % 7 for d in days.split(",")} == set(window.days)  # cron: 0 = Sunday
    deadline = job_spec(doc)["activeDeadlineSeconds"]
    assert deadline >= ((opens - start) + (closes - opens) + 60) * 60


def test_the_maintenance_cronjob_has_its_own_valid_job(tmp_path: Path) -> None:
    volumes = {v["name"]: v for v in pod_spec(manifest("cronjob.yaml"))["volumes"]}
    name = volumes["job"]["configMap"]["name"]
    assert name != manifest("configmap.yaml")["metadata"]["name"]  # not the incident job
    (data,) = (doc["data"] for _, doc in documents() if doc["metadata"]["name"] == name)
    for file, text in data.items():
        (tmp_path / file).write_text(text)
    job = load_job(tmp_path / "job.yaml")
    assert job.name != yaml.safe_load(manifest("configmap.yaml")["data"]["job.yaml"])["name"]
    assert job.limits.deadline is None  # see the CronJob's activeDeadlineSeconds
    assert plan(job).total == 4


# -- wiring --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", WORKLOADS)
def test_every_reference_resolves(name: str) -> None:
    """$(VAR) names a variable defined before it (Kubernetes passes an unknown one on as
    text); every mount names a volume; every ConfigMap, claim and Secret is in deploy/."""
    doc = manifest(name)
    pod, container = pod_spec(doc), the_container(doc)
    defined = [item["name"] for item in container.get("env", [])]
    for arg in container["args"]:
        for variable in re.findall(r"\$\((\w+)\)", arg):
            assert variable in defined
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in container["volumeMounts"]} == set(volumes)
    objects = {(doc["kind"], doc["metadata"]["name"]) for _, doc in documents()}
    for volume in volumes.values():
        if "configMap" in volume:
            assert ("ConfigMap", volume["configMap"]["name"]) in objects
        if "persistentVolumeClaim" in volume:
            claim = volume["persistentVolumeClaim"]["claimName"]
            assert ("PersistentVolumeClaim", claim) in objects
    for item in container["env"]:
        secret = item.get("valueFrom", {}).get("secretKeyRef")
        if secret is not None:
            assert ("Secret", secret["name"]) in objects


@pytest.mark.parametrize("name", WORKLOADS)
def test_the_args_parse_and_metrics_are_served_where_prometheus_is_told(name: str) -> None:
    doc = manifest(name)
    container = the_container(doc)
    args = parsed_args(container)
    assert args.log_json is True  # one JSON line per event for the cluster's log pipeline
    (port,) = container["ports"]
    host, _, number = args.metrics_port.rpartition(":")
    assert (host, int(number)) == ("0.0.0.0", port["containerPort"])  # noqa: S104 (a pod)
    template = job_spec(doc) if doc["kind"] in ("Job", "CronJob") else doc["spec"]
    annotations = template["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    mounts = {m["mountPath"] for m in container["volumeMounts"] if m["name"] == "results"}
    written = args.spool if args.command == "watch" else args.out
    assert any(str(written).startswith(f"{path}/") for path in mounts)  # on the volume


def test_the_spool_watcher_runs_watch_with_its_own_gateway_one_at_a_time() -> None:
    doc = manifest("spool-watcher.yaml")
    assert doc["kind"] == "Deployment"
    args = parsed_args(the_container(doc))
    assert args.command == "watch"
    assert args.rate is not None  # the watcher's whole budget, shared by its jobs
    env = {item["name"]: item for item in the_container(doc)["env"]}
    assert "ENOS_GATEWAY" in env  # it refuses to start without a gateway of its own
    assert doc["spec"]["replicas"] == 1
    assert doc["spec"]["strategy"]["type"] == "Recreate"  # no two watchers in a rollout
    selector = doc["spec"]["selector"]["matchLabels"]
    assert selector.items() <= doc["spec"]["template"]["metadata"]["labels"].items()


# -- the Grafana dashboard -----------------------------------------------------------------

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gauge": ("",),
}
PROMQL_WORDS = {
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
}


def registered_gauges() -> set[str]:
    """Every ``*.gauge("name", ...)`` call in the worker package: the gauges the run, the
    watcher and the server register, read from their code (a renamed one is caught)."""
    names = set()
    for path in (ROOT / "worker").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "gauge"
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                names.add(node.args[0].value)
    return names


def exported() -> dict[str, set[str]]:
    """The series names a worker's /metrics can show, by metric family: a real RunMetrics
    with every gauge the code registers, as prometheus-client collects it."""
    metrics = RunMetrics()
    for name in registered_gauges():
        metrics.gauge(name, "as the worker registers it", lambda: 0.0)
    families = list(metrics.registry.collect())
    return {f.name: {f.name + suffix for suffix in SUFFIXES[f.type]} for f in families}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: what is left once strings, label
    matchers, ranges, grouping labels, variables, functions and keywords are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\$\{?\w+\}?|(?<![\w:])\d[\w.]*", " ", expr)  # variables, numbers, 5m
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        if expr[match.end() :].lstrip().startswith("("):
            continue  # a function or an aggregation
        if match.group() not in PROMQL_WORDS:
            names.add(match.group())
    return names


def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def expressions(board: dict[str, Any]) -> list[str]:
    """Every PromQL the dashboard runs: panel targets and query variables (label_values'
    last argument is a label, not a metric)."""
    exprs = [target["expr"] for panel in board["panels"] for target in panel["targets"]]
    for variable in board["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def test_metric_names_are_read_out_of_promql() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{code!="0", x=~"by(y)"}[5m])))'
        " / on (job) group_left (pod) sum without (code) (b_total offset 5m) > bool 0"
    )
    assert metric_names(expr) == {"a_bucket", "b_total"}


def test_the_dashboard_asks_only_for_exported_metrics_and_shows_each_one() -> None:
    series = exported()
    known = set().union(*series.values())
    assert {
        "worker_requests_in_flight",
        "worker_targets_waiting",
        "worker_targets_pending",
        "worker_rate_allowed",
        "worker_jobs_running",
        "worker_jobs_waiting",
        "worker_jobs_settled",
    } <= registered_gauges()
    used = set().union(*(metric_names(expr) for expr in expressions(dashboard())))
    assert all(name.startswith("worker_") for name in used)  # the reader missed nothing
    assert used <= known, f"not exported: {sorted(used - known)}"
    shown = {family for family, names in series.items() if names & used}
    assert shown == set(series), f"no panel: {sorted(set(series) - shown)}"


def test_the_dashboard_imports_into_grafana() -> None:
    """The shape Grafana's import needs: a uid and title, a Prometheus datasource variable
    every panel and query uses, panels with unique ids on the 24-column grid that do not
    overlap, and targets with a refId and an expression."""
    board = dashboard()
    assert re.fullmatch(r"[a-zA-Z0-9_-]{1,40}", board["uid"])
    assert board["title"]
    assert board["id"] is None  # a new dashboard on import, whatever the instance holds
    assert isinstance(board["schemaVersion"], int)
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == (
        "datasource",
        "prometheus",
    )
    datasource = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["instance"]["datasource"] == datasource
    ids: set[int] = set()
    cells: set[tuple[int, int]] = set()
    for panel in board["panels"]:
        assert panel["id"] not in ids
        ids.add(panel["id"])
        assert panel["title"]
        assert panel["type"] in ("timeseries", "stat")
        assert panel["datasource"] == datasource
        grid = panel["gridPos"]
        assert grid["x"] >= 0
        assert grid["x"] + grid["w"] <= 24
        area = {
            (x, y)
            for x in range(grid["x"], grid["x"] + grid["w"])
            for y in range(grid["y"], grid["y"] + grid["h"])
        }
        assert not area & cells, f"{panel['title']} overlaps another panel"
        cells |= area
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)) >= 1
        for target in panel["targets"]:
            assert target["datasource"] == datasource
            assert target["expr"].count("(") == target["expr"].count(")")
