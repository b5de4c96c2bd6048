"""The words of ``--help``: each command's examples and its own exit codes (the README says
the same)."""

from __future__ import annotations

SIM_APP_KEY, SIM_APP_SECRET = "sim-app-key", "sim-app-secret"  # the simulator's defaults

EXIT_CODES = """exit codes:
  0  every target was cancelled or had nothing to cancel
  1  the run finished; some targets failed
  2  bad usage, an invalid job file, or a run directory that cannot be made or written:
     nothing was sent
  3  aborted (credentials, permission, wrong gateway, abort rule, outage, an incomplete
     targets_query, a failed stage gate, a disk that can no longer be written, internal
     error); resumable
  4  interrupted (SIGINT/SIGTERM, worker ctl stop), the deadline was reached, the job's
     window closed (or, with --no-wait, is closed), the gateway's quota is spent (the
     summary says when it resets), or the run directory is busy with another live worker;
     resumable: try again later"""

CTL_EXIT_CODES = """exit codes:
  0  every run acknowledged the request (it consumed it and its status file shows it)
  1  no live run holds a directory, or a run did not acknowledge in time
  2  bad usage, or a run refused the request (promote with no stage waiting, the rate of a
     spooled job, which is the watcher's)"""

VALIDATE_EXIT_CODES = """exit codes:
  0  the job is valid and has targets to run (with --probe: and its calls fit in what the
     gateway says is left, or it states no budget)
  1  with --probe: the job's calls do not fit in what the gateway says is left
  2  the job file (or a flag) cannot be used, or it lists no targets; the message says why
  3  with --probe: the gateway could not be probed (credentials, gateway, an error)"""

RESOLVE_EXIT_CODES = """exit codes:
  0  every device the query selects was found; the file is written
  2  bad usage: no targets_query in the job, an --out file that exists or cannot be written
  3  incomplete (FILE.partial holds what was found) or refused (credentials, permission,
     the gateway); with --accept-incomplete an incomplete query is written and exits 0
  4  interrupted (Ctrl-C): nothing written"""

REPORT_EXIT_CODES = """exit codes:
  0  the summaries were printed and the report written
  2  bad usage: not a run directory, or a report path that cannot be written"""

AUDIT_EXIT_CODES = """exit codes:
  0  every audit log is whole and agrees with its results and summary
  1  an audit log is broken (the first bad line is named)
  2  bad usage (not a run directory; --head is not 64 hex digits)"""

SIMULATE_EXIT_CODES = """exit codes:
  0  stopped cleanly (Ctrl-C / SIGTERM)
  2  bad usage (a port out of range or taken, devices below 0, a share outside 0 to 1)"""

WATCH_EXIT_CODES = """exit codes:
  0  stopped (SIGINT/SIGTERM with nothing left in running/), or with --once nothing left to do
  1  with --once, a job of this pass went to failed/ (its NAME.error.txt says why); or a job
     could not be run nor filed (failed/ cannot be written: it stays in running/, the log
     says why)
  2  bad usage: no gateway (--gateway or ENOS_GATEWAY), no spool (or pass --create), bad
     credentials or flags; nothing was claimed
  4  drained by SIGINT/SIGTERM with jobs left in running/ (the next watcher resumes them);
     or with --once, jobs left that wait for the gateway's quota or for their window"""

SWEEP_EXIT_CODES = """exit codes:
  0  every searched target is verified: nothing the job asked to cancel is pending
  1  some targets still have such a command pending, or could not be searched
  2  bad usage (not a run directory, a run in progress)
  3  the gateway or the credentials cannot be used"""

EXAMPLES = {
    "worker": """examples:
  worker demo                                    the simulator and an example job, in process
  worker validate jobs/maintenance.yaml          check a job and print its plan; sends nothing
  worker run jobs/maintenance.yaml --gateway https://apim-ppe1.envisioniot.com
  worker run JOB.yaml --resume runs/JOB-20261201T120000Z
  worker report runs/JOB-20261201T120000Z        the summary again, and report.html""",
    "run": """examples:
  worker run jobs/maintenance.yaml --gateway https://apim.example.com
  worker run JOB.yaml --rate auto --concurrency 64 --deadline 1h --yes
  worker run JOB.yaml --dry-run --sample 20      token + 20 sampled searches; no cancel
  worker run JOB.yaml --resume DIR --retry-failed""",
    "resolve": """examples:
  worker resolve jobs/incident-query.yaml --out incident-devices.csv
  worker resolve JOB.yaml --rate 20 --accept-incomplete""",
    "validate": """examples:
  worker validate jobs/incident.yaml
  worker validate JOB.yaml --rate 200 --json
  worker validate JOB.yaml --probe --gateway https://apim.example.com""",
    "simulate": """examples:
  worker simulate --devices 10000 --commands 4
  worker simulate --port 0 --error-rate 0.2 --rate-cap 300
  curl -X POST localhost:8080/_sim/faults -d '{"down_for_s": 5}'""",
    "report": """examples:
  worker report runs/JOB-20261201T120000Z
  worker report shard-0 shard-1 shard-2 --html incident.html
  worker report DIR --json""",
    "watch": """examples:
  worker watch /srv/spool --gateway https://apim.example.com --rate 100
                                                 run every job file dropped in incoming/
  worker watch /srv/spool --rate 100 --jobs 4    (ENOS_GATEWAY set) four jobs at once
  worker watch /srv/spool --create --once        make the spool, run what is there, exit""",
    "sweep": """examples:
  worker verify runs/JOB-20261201T120000Z        search each target: is anything still pending?
  worker verify DIR --rate 50
  worker run JOB.yaml --verify                   the run, then the sweep""",
    "ctl": """examples:
  worker ctl runs/JOB-20261201T120000Z status    the live state (status.json)
  worker ctl DIR pause                           nothing new is sent; in flight finish
  worker ctl DIR rate 5                          a new rate, now (capped at a known budget)
  worker ctl shard-0 shard-1 shard-2 rate 300    100/s each
  worker ctl DIR promote                         a stage waiting for promotion goes on
  worker ctl DIR stop                            as a first Ctrl-C: exit 4, resumable
  worker ctl /srv/spool rate 50                  a watcher's rate, shared by its jobs""",
    "verify": """examples:
  worker audit verify runs/JOB-20261201T120000Z
  worker audit verify DIR --head SHA256            (the audit head the run printed)""",
}
