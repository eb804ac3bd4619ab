"""The SQL that runs a usage report's plan (``gateway/usage_report.py``): one plain,
parameterised ``SELECT ... GROUP BY`` per segment of the plan, on a connection the caller
owns, added up by :func:`~runestone_proxy.gateway.usage_report.combine`.

:func:`read` is the way in, for the gateway (``Store.usage_report``, on a worker thread)
and ``runestone-proxy usage`` alike, on either backend: a connection of its own
(:meth:`~.store_db.Backend.read_connection`: SQLite read-only, PostgreSQL a new short-lived
one) and one read-only transaction (:meth:`~.store_db.Db.begin_read`), so the report reads
one snapshot and never holds up the store's writer (SQLite's WAL and PostgreSQL's MVCC:
readers and the writer do not block each other; a report over a busy ledger reads for a
second or more, which on the writer's connection would stall every enqueue and ledger
commit behind it). The snapshot is taken by the transaction's first statement (the schema
version check; PostgreSQL at ``REPEATABLE READ``, not its per-statement default) and the
plan's ``now`` is read after it, so no retention sweep in the snapshot can have deleted
records the plan counts on.

Only SQL that SQLite and PostgreSQL both speak: ``SUM``, ``COUNT``, ``CASE``, no date
functions (a raw segment never crosses a bucket of the report, so its bucket is known
without computing one per row; a rollup read that spans several buckets groups by its
``bucket_start``). PostgreSQL sums the rollups' ``BIGINT`` columns as ``NUMERIC`` (a
``Decimal``): ``combine`` reads every count with ``int()``, exact for both.
"""

from __future__ import annotations

from collections.abc import Callable
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
from runestone_proxy.server import store_pg_schema, store_schema
from runestone_proxy.server.store_db import Backend, Db
from runestone_proxy.server.store_schema import storable

__all__ = [
    "LEDGER_SCHEMAS",
    "NoLedger",
    "Unreadable",
    "read",
    "report",
    "segment_query",
    "segment_rows",
]

#: Per dialect: the schema version that brought the ledger's tables, and the newest this
#: code knows (each backend numbers its own versions).
LEDGER_SCHEMAS = {
    "sqlite": (5, store_schema.SCHEMA_VERSION),
    "postgres": (1, store_pg_schema.SCHEMA_VERSION),
}


class Unreadable(Exception):
    """The report could not be read: the database failed, or holds no ledger it knows."""


class NoLedger(Unreadable):
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


def segment_rows(conn: Db, segment: Segment, query: UsageQuery) -> list[dict[str, Any]]:
    sql, params = segment_query(segment, query)
    cursor = conn.execute(sql, params)
    names = [d[0] for d in cursor.description]  # DB-API: sqlite3 and psycopg alike
    return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def report(conn: Db, query: UsageQuery, now: float, config: LedgerConfig) -> UsageReport:
    """Plan ``query`` against what the ledger keeps at ``now`` and run it."""
    report_plan = plan(query, Horizons.at(now, config))
    parts = [(s, segment_rows(conn, s, query)) for s in report_plan.reads]
    return combine(query, report_plan, parts)


def read(
    backend: Backend, query: UsageQuery, config: LedgerConfig, clock: Callable[[], float]
) -> UsageReport:
    """``query`` answered from ``backend``'s database on a connection of its own, in one
    read-only transaction. Blocking (run it on a worker thread). Raises
    :class:`Unreadable` (:class:`NoLedger`), or ``ServiceUnavailable`` when the database
    cannot be opened."""
    conn = backend.read_connection()
    try:
        try:
            conn.begin_read()
            # The first read takes the snapshot; ``now`` after it (see the module docstring).
            version = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0]
            first, newest = LEDGER_SCHEMAS[conn.dialect.name]
            if not isinstance(version, int) or version < first:
                raise NoLedger(
                    f"{backend.where} has no usage ledger yet (schema version {version})"
                )
            if version > newest:
                raise NoLedger(
                    f"{backend.where} was written by a newer Runestone"
                    f" (schema {version} > {newest})"
                )
            return report(conn, query, clock(), config)
        except conn.Error as exc:
            raise Unreadable(f"cannot read {backend.where}: {exc}") from exc
    finally:
        conn.close()
