"""The SQL that runs a usage report's plan (``gateway/usage_report.py``): one plain,
parameterised ``SELECT ... GROUP BY`` per segment of the plan, on a connection the caller
owns, added up by :func:`~runestone_proxy.gateway.usage_report.combine`.

:func:`read` is the way in, for the gateway (``Store.usage_report``, on a worker thread)
and ``runestone-proxy usage`` alike: its own read-only connection to the database file and
one read transaction, so the report reads one snapshot and never holds up the store's
writer (WAL: readers and the writer do not block each other; a report over a busy ledger
reads for a second or more, which on the writer's connection would stall every enqueue
and ledger commit behind it). The plan's ``now`` is taken once the snapshot is open, so no
retention sweep in the snapshot can have deleted records the plan counts on. Only SQL that
SQLite and PostgreSQL both speak: ``SUM``, ``COUNT``, ``CASE``, no date functions (a raw
segment never crosses a bucket of the report, so its bucket is known without computing
one per row; a rollup read that spans several buckets groups by its ``bucket_start``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.gateway.usage_report import (
    GROUP_COLUMNS,
    SUMS,
    Horizons,
    Segment,
    UsageQuery,
    UsageReport,
    combine,
    plan,
)
from runestone_proxy.server.store_schema import SCHEMA_VERSION, decode_text, storable

__all__ = ["LEDGER_SCHEMA", "NoLedger", "read", "report", "segment_query", "segment_rows"]

#: The schema version that brought the ledger's tables.
LEDGER_SCHEMA = 5


class NoLedger(Exception):
    """The database has no usage ledger this code can read (too old, or too new)."""


#: A raw record's contribution to the sums (a rollup row has them as columns).
_RAW_SUMS = (
    "COUNT(*) AS requests",
    "SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END) AS errors",
    *(f"SUM({c}) AS {c}" for c in SUMS[2:]),
)
_ROLLUP_SUMS = tuple(f"SUM({c}) AS {c}" for c in SUMS)


def segment_query(segment: Segment, query: UsageQuery) -> tuple[str, list[Any]]:
    """The ``SELECT`` for one segment, and its parameters."""
    columns = list(query.group_by)
    assert all(c in GROUP_COLUMNS for c in columns + [c for c, _ in query.filters])
    if segment.table == "usage":
        time_column, sums = "at", _RAW_SUMS
    else:
        time_column, sums = "bucket_start", _ROLLUP_SUMS
        if not query.one_bucket(segment.start, segment.end):
            columns.insert(0, "bucket_start")
    sql = f"SELECT {', '.join([*columns, *sums])} FROM {segment.table}"
    sql += f" WHERE {time_column} >= ? AND {time_column} < ?"
    params: list[Any] = [segment.start, segment.end]
    for column, value in query.filters:
        sql += f" AND {column} = ?"
        params.append(storable(value))
    if columns:
        sql += f" GROUP BY {', '.join(columns)}"
    return sql, params


def segment_rows(
    conn: sqlite3.Connection, segment: Segment, query: UsageQuery
) -> list[dict[str, Any]]:
    sql, params = segment_query(segment, query)
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def report(
    conn: sqlite3.Connection, query: UsageQuery, now: float, config: LedgerConfig
) -> UsageReport:
    """Plan ``query`` against what the ledger keeps at ``now`` and run it."""
    report_plan = plan(query, Horizons.at(now, config))
    parts = [(s, segment_rows(conn, s, query)) for s in report_plan.reads]
    return combine(query, report_plan, parts)


def read(
    path: Path, query: UsageQuery, config: LedgerConfig, clock: Callable[[], float]
) -> UsageReport:
    """``query`` answered from the database at ``path``: read-only, one read transaction.
    Raises :class:`NoLedger`, or ``sqlite3.Error`` (the caller maps it)."""
    conn = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None)
    try:
        conn.text_factory = decode_text
        conn.execute("PRAGMA busy_timeout=5000")
        conn.execute("BEGIN")
        # The first read opens the snapshot; ``now`` after it (see the module docstring).
        version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
        if not isinstance(version, int) or version < LEDGER_SCHEMA:
            raise NoLedger(f"{path} has no usage ledger yet (schema version {version})")
        if version > SCHEMA_VERSION:
            raise NoLedger(
                f"{path} was written by a newer Runestone (schema {version} > {SCHEMA_VERSION})"
            )
        return report(conn, query, clock(), config)
    finally:
        conn.close()
