"""The usage ledger's SQL (schema v5, :mod:`.store_schema`): writing records and their
rollups under a savepoint, the retention sweep's share, and the reads budgets and the admin
API need. Synchronous, on a connection the caller owns (SQLite or PostgreSQL, one SQL for
both: :mod:`.store_db`), inside the caller's transaction; :mod:`.store_ledger` says how the
store uses it.

Rollup rows are upserted in key order: two gateways adding to the same buckets on
PostgreSQL take the rows' locks in the same order, so they wait for each other rather than
deadlock.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import structlog

from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_schema import storable

__all__ = [
    "DAY_S",
    "GROUP_COLUMNS",
    "HOUR_S",
    "Granularity",
    "bucket_start",
    "first_due",
    "spend",
    "sweep",
    "totals",
    "write",
]

log = structlog.get_logger("runestone.store")

#: Rows deleted per table per sweep pass.
SWEEP_BATCH = 10_000
#: Raw records are swept this long after they pass retention (batches the deletes).
RAW_SWEEP_SLACK_S = 60.0
HOUR_S = 3600.0
DAY_S = 86400.0

#: What :func:`totals` may group by.
GROUP_COLUMNS = ("tenant", "key_id", "model", "provider")
Granularity = Literal["hour", "day"]

_SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
)
_RAW_COLUMNS = (
    "at, request_id, tenant, key_id, endpoint, model, provider, upstream_model, attempts,"
    " prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd, status,"
    " outcome, stream, estimated, latency_ms, ttfb_ms"
)
_INSERT_RAW = f"INSERT INTO usage ({_RAW_COLUMNS}) VALUES ({', '.join('?' * 20)})"


def _upsert(table: str) -> str:
    keys = "bucket_start, tenant, key_id, model, provider"
    # The old value qualified by its table: PostgreSQL finds a bare ``requests`` ambiguous
    # (the table's or ``excluded``'s) and refuses the statement; SQLite takes either.
    updates = ", ".join(f"{c} = {table}.{c} + excluded.{c}" for c in _SUMS)
    return (
        f"INSERT INTO {table} ({keys}, {', '.join(_SUMS)}) VALUES ({', '.join('?' * 12)})"
        f" ON CONFLICT ({keys}) DO UPDATE SET {updates}"
    )


_UPSERT = {"usage_hourly": _upsert("usage_hourly"), "usage_daily": _upsert("usage_daily")}


def bucket_start(at: float, size_s: float) -> float:
    """The start of the UTC hour (``HOUR_S``) or day (``DAY_S``) holding ``at``."""
    return math.floor(at / size_s) * size_s


# --- writing (worker thread, inside the caller's transaction) --------------------------------


def _raw_row(r: UsageRecord) -> tuple[Any, ...]:
    return (
        r.at,
        storable(r.request_id),
        storable(r.tenant),
        storable(r.key_id),
        storable(r.endpoint),
        storable(r.model),
        storable(r.provider),
        storable(r.upstream_model),
        r.attempts,
        r.prompt_tokens,
        r.completion_tokens,
        r.cached_tokens,
        r.reasoning_tokens,
        r.cost_usd,
        r.status,
        r.outcome,
        int(r.stream),
        int(r.estimated),
        r.latency_ms,
        r.ttfb_ms,
    )


def rollup_rows(records: Iterable[UsageRecord], size_s: float) -> list[tuple[Any, ...]]:
    """The records summed per (bucket, tenant, key_id, model, provider), in key order."""
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for r in records:
        key: tuple[Any, ...] = (bucket_start(r.at, size_s), storable(r.tenant))
        key += (storable(r.key_id), storable(r.model), storable(r.provider))
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0, 0, 0, 0, 0, 0, 0.0]
        row[0] += 1
        row[1] += r.outcome == "error"
        row[2] += r.prompt_tokens
        row[3] += r.completion_tokens
        row[4] += r.cached_tokens
        row[5] += r.reasoning_tokens
        row[6] += r.cost_usd
    return [(*key, *sums[key]) for key in sorted(sums)]


def _insert(conn: Db, records: Sequence[UsageRecord]) -> None:
    conn.executemany(_INSERT_RAW, [_raw_row(r) for r in records])
    conn.executemany(_UPSERT["usage_hourly"], rollup_rows(records, HOUR_S))
    conn.executemany(_UPSERT["usage_daily"], rollup_rows(records, DAY_S))


def _insert_guarded(conn: Db, records: Sequence[UsageRecord]) -> bool:
    """:func:`_insert` under a savepoint, undone if the database refuses; whether it went
    in."""
    conn.execute("SAVEPOINT ledger")
    try:
        _insert(conn, records)
    except (conn.Error, ValueError, OverflowError) as exc:
        log.error("ledger.write.refused", error=str(exc), records=len(records))
        conn.execute("ROLLBACK TO ledger")
        conn.execute("RELEASE ledger")
        return False
    conn.execute("RELEASE ledger")
    return True


def write(conn: Db, records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Write ``records`` and their rollups in the caller's transaction; returns those SQLite
    refused (each tried alone once the batch was refused), which are not written."""
    if not records or _insert_guarded(conn, records):
        return []
    if len(records) == 1:
        return list(records)
    return [r for r in records if not _insert_guarded(conn, [r])]


# --- retention ---------------------------------------------------------------------------------


def sweep(conn: Db, now: float, config: LedgerConfig) -> tuple[int, float | None]:
    """Delete raw records, hourly and daily rows past their retention, at most
    :data:`SWEEP_BATCH` per table. Returns how many, and when the next sweep is due (``now``
    if a table had more to delete)."""
    deleted, more, due = 0, False, []
    tables = (
        ("usage", "at", config.retention_days * DAY_S, RAW_SWEEP_SLACK_S),
        ("usage_hourly", "bucket_start", config.hourly_retention_days * DAY_S, 0.0),
        ("usage_daily", "bucket_start", config.daily_retention_days * DAY_S, 0.0),
    )
    for table, column, keep_s, slack_s in tables:
        count: int = conn.execute(
            f"DELETE FROM {table} WHERE {conn.dialect.row_id} IN"
            f" (SELECT {conn.dialect.row_id} FROM {table} WHERE {column} <= ? LIMIT ?)",
            (now - keep_s, SWEEP_BATCH),
        ).rowcount
        deleted += count
        more = more or count >= SWEEP_BATCH
        oldest = conn.execute(f"SELECT MIN({column}) FROM {table}").fetchone()[0]
        if oldest is not None:
            due.append(oldest + keep_s + slack_s)
    if more:
        return deleted, now
    return deleted, min(due) if due else None


def first_due(records: Sequence[UsageRecord], config: LedgerConfig) -> float | None:
    """When the earliest of ``records`` falls due for sweeping (as :func:`sweep` sees it)."""
    if not records:
        return None
    keep = min(config.retention_days, config.hourly_retention_days, config.daily_retention_days)
    return min(r.at for r in records) + keep * DAY_S + RAW_SWEEP_SLACK_S


# --- reading -----------------------------------------------------------------------------------


def totals(
    conn: Db,
    *,
    since: float,
    until: float,
    group_by: Sequence[str],
    granularity: Granularity | None,
    tenant: str | None,
    daily: bool,
) -> list[dict[str, Any]]:
    """Sums from the hourly (or, ``daily``, the daily) rollup over the buckets starting in
    ``[since, until)``, per bucket if ``granularity``, per ``group_by`` columns."""
    unknown = [c for c in group_by if c not in GROUP_COLUMNS]
    if unknown:
        raise InvalidParam(
            f"Cannot group usage by {', '.join(unknown)}; use {', '.join(GROUP_COLUMNS)}.",
            param="group_by",
        )
    columns = [c for c in GROUP_COLUMNS if c in group_by]
    if granularity is not None:
        columns.insert(0, "bucket_start")
    table = "usage_daily" if daily else "usage_hourly"
    # Integer sums cast back: PostgreSQL sums BIGINT columns as NUMERIC (read as Decimal).
    sums = ", ".join(
        f"CAST(SUM({c}) AS {'DOUBLE PRECISION' if c == 'cost_usd' else 'BIGINT'}) AS {c}"
        for c in _SUMS
    )
    query = f"SELECT {', '.join([*columns, sums])} FROM {table}"
    query += " WHERE bucket_start >= ? AND bucket_start < ?"
    params: list[Any] = [since, until]
    if tenant is not None:
        query += " AND tenant = ?"
        params.append(storable(tenant))
    if columns:
        query += f" GROUP BY {', '.join(columns)} ORDER BY {', '.join(columns)}"
    rows = conn.execute(query, params).fetchall()
    return [dict(row) for row in rows if row["requests"] is not None]


def spend(conn: Db, tenant: str, key_id: str | None, since: float) -> tuple[float, int]:
    """USD and tokens (prompt + completion) of ``tenant`` (and ``key_id``, if given) since
    ``since``: the hourly rollup from the first hour boundary at or after ``since``, plus the
    raw records between ``since`` and that boundary (none when ``since`` is on the hour, as
    a calendar day or month start is). Exact, as far as the raw records are kept."""
    boundary = math.ceil(since / HOUR_S) * HOUR_S
    where = " WHERE tenant = ?"
    params: list[Any] = [storable(tenant)]
    if key_id is not None:
        where += " AND key_id = ?"
        params.append(storable(key_id))
    sums = (
        "SELECT COALESCE(SUM(cost_usd), 0.0), COALESCE(SUM(prompt_tokens + completion_tokens), 0)"
    )
    cost, tokens = conn.execute(
        f"{sums} FROM usage_hourly{where} AND bucket_start >= ?", (*params, boundary)
    ).fetchone()
    if boundary > since:
        raw_cost, raw_tokens = conn.execute(
            f"{sums} FROM usage{where} AND at >= ? AND at < ?", (*params, since, boundary)
        ).fetchone()
        cost, tokens = cost + raw_cost, tokens + raw_tokens
    return float(cost), int(tokens)
