"""What the report says of a targets_query: how it was resolved (in the summary table and on
the page), and, over several shard directories, whether the shards saw the same fleet."""

from __future__ import annotations

from worker.store.records import QueryRecord
from worker.store.state import Summary


def query_lines(query: QueryRecord) -> list[tuple[str, str]]:
    """(label, text) pairs of a run's resolution; none when the run had no query."""
    if not query:
        return []
    found, total = query.get("found", 0), query.get("total", 0)
    passes, calls = query.get("passes", 0), query.get("calls", 0)
    if query.get("complete"):
        state = "complete"
    elif query.get("accepted_incomplete"):
        state = f"INCOMPLETE, run as found (--accept-incomplete): {total - found:,} short"
    else:
        state = "INCOMPLETE: nothing was cancelled; a resume resolves again"
    lines = [
        ("query", str(query.get("query", ""))),
        (
            "query found",
            f"{found:,} of {total:,} devices ({state}); {passes} pass(es), {calls:,} searches, "
            f"pages of {query.get('page_size', 0):,}",
        ),
    ]
    if query.get("shard"):
        lines.append(("query kept", f"{query.get('kept', 0):,} in shard {query['shard']}"))
    if query.get("stopped"):
        lines.append(("query stopped", str(query["stopped"])))
    return lines


def differing_totals(summaries: list[Summary]) -> str | None:
    """Shards of one query job that saw different totals: the fleet changed between their
    resolutions, so together they may miss or repeat devices. None when they agree (or there
    is no query)."""
    seen = {
        summary.shard or summary.run_id: summary.query.get("total")
        for summary in summaries
        if summary.query
    }
    if len(seen) < 2 or len(set(seen.values())) < 2:
        return None
    each = ", ".join(f"{name}: {total:,}" for name, total in seen.items() if total is not None)
    return (
        f"the shards' queries counted different totals ({each}): the fleet changed between "
        "them, so together they may miss devices. Resolve once (worker resolve JOB --out FILE) "
        "and give every shard that file as its targets_file"
    )
