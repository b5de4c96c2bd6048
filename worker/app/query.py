"""A ``targets_query:`` at the start of a segment: resolved (after ``run_started``, before any
cancel and before the confirmation, which then names the count found) into the run's targets
copy, ``targets.csv``, the file every resume reads; and ``worker resolve``'s story, the same
resolution into a file of the operator's.

A snapshot is kept only when the query was found complete, or the operator accepted it
incomplete (``--accept-incomplete``): then run.json names it (``targets_file``, its sha256 as
``targets_sha256``, ``query.complete``), the audit says so in a ``targets_resolved`` record, and
no resume queries again. Otherwise the run stops before any cancel (exit 3) and a resume
resolves again.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TextIO

import anyio
import structlog

from worker.app.resolve import Resolution, Resolver, ResolveStopped
from worker.app.wiring import RunOptions, client_for, limiter_for, proven
from worker.core.engine import Engine
from worker.core.ports import StopReason
from worker.core.ratelimit import RateLimiter
from worker.enos.client import EnOSClient
from worker.errors import StoreError
from worker.jobparts import TargetsQuery
from worker.jobs.plan import Plan, plan
from worker.jobs.query import describe, expressions
from worker.model import Job, Shard, TargetsFile
from worker.store.appendlog import iso
from worker.store.audit import AuditLog
from worker.store.layout import RunDir, write_manifest
from worker.store.records import AttemptRecord, QueryRecord, TargetsResolvedRecord
from worker.store.snapshot import SnapshotWriter
from worker.store.state import Manifest

log = structlog.get_logger("worker.query")

STOP_POLL_S = 0.1  # how soon a resolution notices that the run stops


def needs_resolving(job: Job, manifest: Manifest) -> bool:
    """A query job whose run has no targets copy yet (new, or its resolution never completed;
    a run that has one goes over it, whatever the job says now)."""
    return job.query is not None and manifest.targets_file is None


async def resolve_for_run(
    job: Job,
    plan_: Plan,
    manifest: Manifest,
    *,
    client: EnOSClient,
    engine: Engine,
    audit: AuditLog,
    options: RunOptions,
    out: TextIO | None,
) -> tuple[Job, Plan] | None:
    """Resolve the job's query into the run directory; the job and plan over the snapshot, or
    None when nothing is to be sent (the engine then says why: stopped, or nothing found)."""
    query = job.query
    assert query is not None
    run = options.run
    sent = expressions(query)
    log.info("worker.query_resolving", query=describe(query), searches=len(sent))
    writer = SnapshotWriter(run.resolving, run.targets("csv"))
    resolver = Resolver(
        client,
        engine.limiter,
        options.policy(),
        writer,
        org_id=query.org_id,
        shard=plan_.shard,
        command_id=job.command_id,
        on_call=_auditing(audit),
        rng=options.rng(),
        stopping=engine.must_stop,
        heard=engine.heard,
    )
    result = await _stoppable(resolver, sent, engine)
    engine.progress.requests += result.calls  # the searches were requests of this segment
    complete = result.complete(len(sent))
    usable = not result.fatal and not engine.stopping  # not a refusal, not a signal
    accepted = not complete and options.accept_incomplete and usable
    sha256 = writer.finish() if complete or accepted else None
    if sha256 is None:
        writer.abandon()
    record = query_record(query, result, sent, shard=plan_.shard, sha256=sha256, accepted=accepted)
    if sha256 is not None:
        record["targets_file"] = run.targets("csv").name
    manifest.query = record
    if sha256 is None:
        _not_resolved(
            manifest=manifest,
            record=record,
            result=result,
            engine=engine,
            run=run,
            audit=audit,
            segment=len(manifest.segments),
        )
        return None
    own = replace(job, targets_file=TargetsFile(run.targets("csv"), "csv"))
    made = plan(own, plan_.shard)
    if made.targets_sha256 != sha256:
        raise StoreError(run.targets("csv"), "it changed while it was written (not by worker)")
    manifest.targets_sha256, manifest.targets_file = sha256, record["targets_file"]
    manifest.targets = made.total
    write_manifest(run, manifest)
    audit.write(resolved_record(record, len(manifest.segments)))
    _tell_resolved(record, made.total, out)
    return await _go_on(own, made, record, engine, options)


async def _stoppable(resolver: Resolver, sent: list[str], engine: Engine) -> Resolution:
    """The resolution, cut short at once when the run stops (a signal, worker ctl stop, the
    deadline, the watcher): searches change nothing, so nothing in flight needs to finish."""
    async with anyio.create_task_group() as group:
        group.start_soon(_cut_when_stopping, engine, group.cancel_scope)
        await resolver.resolve(sent)
        group.cancel_scope.cancel()
    result = resolver.result
    if engine.stopping and result.stopped is None:
        result.stopped = engine.stop_message
    return result


async def _cut_when_stopping(engine: Engine, scope: anyio.CancelScope) -> None:
    """Cancel the resolution once the run stops (nothing was cancelled; a resume resolves
    again)."""
    while True:
        if engine.stopping:
            scope.cancel()
            return
        await anyio.sleep(STOP_POLL_S)


def _auditing(audit: AuditLog) -> Callable[[AttemptRecord], None]:
    """Each search call to the audit; a record that cannot be written stops the resolution
    (as it stops a run)."""

    def write(record: AttemptRecord) -> None:
        try:
            audit.write(record)
        except StoreError as error:
            raise ResolveStopped(str(error), fatal=True) from None

    return write


def _not_resolved(
    *,
    manifest: Manifest,
    record: QueryRecord,
    result: Resolution,
    engine: Engine,
    run: RunDir,
    audit: AuditLog,
    segment: int,
) -> None:
    """No snapshot kept: say why, record it, stop before any cancel (a resume resolves again)."""
    write_manifest(run, manifest)
    audit.write(resolved_record(record, segment))
    if engine.stopping:  # a signal, the watcher: the run's stop says it
        return
    if result.fatal:  # credentials, permission, a wrong gateway: as any call would say
        engine.stop(StopReason.FATAL, result.stopped or "the search was refused")
        return
    why = result.stopped or result.shortfall()
    engine.stop(
        StopReason.FATAL,
        f"the targets query is incomplete: {why}; nothing was cancelled. Resume to resolve it "
        "again, or pass --accept-incomplete to run what was found",
    )


async def _go_on(
    job: Job, made: Plan, record: QueryRecord, engine: Engine, options: RunOptions
) -> tuple[Job, Plan] | None:
    """The snapshot's targets to run, unless there are none or the operator said no."""
    if made.total == 0:
        shard = record.get("shard")
        engine.stop_message = (
            f"no device the query found falls in shard {shard}; nothing to cancel"
            if shard and record.get("found")
            else "the query matched no device; nothing to cancel"
        )
        log.info("worker.query_empty", why=engine.stop_message)
        return None
    if options.confirm is not None:
        refused = await anyio.to_thread.run_sync(options.confirm, made.total)
        if refused is not None:
            engine.stop(StopReason.FATAL, refused)
            return None
    return job, made


def query_record(
    query: TargetsQuery,
    result: Resolution,
    sent: list[str],
    *,
    shard: Shard | None,
    sha256: str | None,
    accepted: bool,
) -> QueryRecord:
    """The resolution as run.json, summary.json and the audit keep it."""
    return {
        "query": describe(query),
        "org_id": query.org_id,
        "expressions": sent,
        "parts": result.parts,
        "total": result.total,
        "found": result.found,
        "kept": result.kept if sha256 is not None else 0,
        "shard": str(shard) if shard is not None else None,
        "passes": result.passes,
        "pages": result.pages,
        "calls": result.calls,
        "page_size": result.page_size,
        "complete": result.complete(len(sent)),
        "accepted_incomplete": accepted,
        "stopped": result.stopped,
        "targets_file": None,
        "targets_sha256": sha256,
        "resolved_at": iso(time.time()),
    }


def resolved_record(record: QueryRecord, segment: int) -> TargetsResolvedRecord:
    """The audit's targets_resolved record."""
    return {
        "type": "targets_resolved",
        "at": record.get("resolved_at", iso(time.time())),
        "segment": segment,
        "targets_sha256": record.get("targets_sha256"),
        "query": record,
    }


def _tell_resolved(record: QueryRecord, targets: int, out: TextIO | None) -> None:
    """One line for people: what the query found."""
    stream = out or sys.stdout
    state = "complete" if record.get("complete") else "INCOMPLETE (accepted)"
    stream.write(
        f"Query resolved ({state}): {record.get('found', 0):,} devices found of "
        f"{record.get('total', 0):,} counted, {targets:,} targets to run"
        f"{' in shard ' + str(record.get('shard')) if record.get('shard') else ''}, "
        f"{record.get('calls', 0):,} searches\n"
    )
    stream.flush()


async def resolve_to_file(
    job: Job, options: RunOptions, out: Path, *, limiter: RateLimiter | None = None
) -> tuple[QueryRecord, Resolution]:
    """``worker resolve``: the job's query into `out` (a targets file), read-only calls; the
    file is written only when complete (or accepted incomplete): else `out`.partial holds what
    was found. The record says which."""
    query = job.query
    assert query is not None
    sent = expressions(query)
    writer = SnapshotWriter(out.with_name(out.name + ".partial"), out)
    client = client_for(options)
    resolver = Resolver(
        client,
        limiter or limiter_for(options.limits, options.wall),
        options.policy(),
        writer,
        org_id=query.org_id,
        command_id=job.command_id,
        rng=options.rng(),
    )
    async with proven(client, options) as refused:
        if refused is not None:
            resolver.result.stopped, resolver.result.fatal = refused, True
            result = resolver.result
        else:
            result = await resolver.resolve(sent)
    complete = result.complete(len(sent))
    accepted = not complete and options.accept_incomplete and not result.fatal
    sha256 = writer.finish() if complete or accepted else None
    if sha256 is None:
        writer.abandon()
    record = query_record(query, result, sent, shard=None, sha256=sha256, accepted=accepted)
    record["targets_file"] = str(out) if sha256 is not None else None
    return record, result
