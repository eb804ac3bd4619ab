"""The usage ledger in the durable store: the pending buffer, the SQL that writes records and
their rollups, the retention sweep's share, and the reads budgets and the admin API need.

:class:`~runestone_proxy.server.store.Store` implements
:class:`~runestone_proxy.gateway.ledger.UsageLedger` with what is here; the tables are
described in :mod:`.store_schema` (v5).

How this works
--------------
* **Off the hot path.** ``Store.record`` appends to a :class:`LedgerBuffer` (on the event
  loop: no I/O, no lock) and rings the store's single writer once. Each writer pass takes up
  to :data:`PASS_MAX` records and writes them in the same transaction as the pass's
  enqueues and Response saves: the ledger adds no fsync of its own.
* **Bounded.** At most :data:`MAX_PENDING` records wait; past that the oldest is dropped
  (``ledger.dropped`` telemetry per drop, one warning log per episode) rather than making a
  request wait or the process grow.
* **Isolated.** The records of a pass go in under their own savepoint: if SQLite refuses
  them, they are retried one by one, each in its own savepoint, and only those refused are
  dropped; the pass's other items commit all the same. A pass whose whole transaction
  fails (locked, disk full) puts its records back at the front of the buffer.
* **Rollups.** ``usage_hourly`` and ``usage_daily`` are updated in the raw insert's
  transaction (``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``), from the
  batch's records summed per bucket first, so they always equal the raw rows' sums (until
  retention deletes raw rows). Buckets are UTC hour and day starts in unix seconds.
* **Retention.** Each sweep deletes at most :data:`SWEEP_BATCH` rows per table (a large
  backlog is deleted over several passes, none holding the writer long; the next pass is
  due at once). Raw records are swept a minute (:data:`RAW_SWEEP_SLACK_S`) after they pass
  ``retention_days``, so a busy ledger is swept once a minute, not once per record.
"""

from __future__ import annotations

import math
import sqlite3
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
import structlog

from runestone_proxy import telemetry
from runestone_proxy.config.tree import LedgerConfig
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.server.store_schema import storable
from runestone_proxy.server.store_values import StoreStats

__all__ = [
    "GROUP_COLUMNS",
    "MAX_PENDING",
    "Granularity",
    "LedgerBuffer",
    "spend",
    "sweep",
    "totals",
    "write",
]

log = structlog.get_logger("runestone.store")

#: Records that may wait for the writer; past this the oldest are dropped.
MAX_PENDING = 10_000
#: Records written per writer pass (the rest wait for the next pass, rung at once).
PASS_MAX = 4096
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
    updates = ", ".join(f"{c} = {c} + excluded.{c}" for c in _SUMS)
    return (
        f"INSERT INTO {table} ({keys}, {', '.join(_SUMS)}) VALUES ({', '.join('?' * 12)})"
        f" ON CONFLICT ({keys}) DO UPDATE SET {updates}"
    )


_UPSERT = {"usage_hourly": _upsert("usage_hourly"), "usage_daily": _upsert("usage_daily")}


def bucket_start(at: float, size_s: float) -> float:
    """The start of the UTC hour (``HOUR_S``) or day (``DAY_S``) holding ``at``."""
    return math.floor(at / size_s) * size_s


# --- the pending buffer (event loop side) ------------------------------------------------------


@attrs.define(eq=False)
class LedgerBuffer:
    """Records waiting for the writer: bounded, the oldest dropped first."""

    stats: StoreStats
    max_pending: int = MAX_PENDING
    #: The writer has been rung for what is pending (cleared when it takes records).
    rung: bool = False
    _pending: deque[UsageRecord] = attrs.Factory(deque)
    _warned: bool = False

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, record: UsageRecord) -> bool:
        """Queue ``record``; True if the writer needs ringing."""
        self.stats.ledger_recorded += 1
        if len(self._pending) >= self.max_pending:
            self._pending.popleft()
            self.dropped(1, "buffer_full")
        self._pending.append(record)
        ring, self.rung = not self.rung, True
        return ring

    def take(self, limit: int = PASS_MAX) -> list[UsageRecord]:
        """Up to ``limit`` of the oldest records, for one writer pass."""
        count = min(limit, len(self._pending))
        self.rung = False
        return [self._pending.popleft() for _ in range(count)]

    def put_back(self, records: Sequence[UsageRecord]) -> None:
        """Records a failed transaction did not write: first in line again, as room allows
        (the oldest of them are dropped first)."""
        room = max(0, self.max_pending - len(self._pending))
        kept = list(records[len(records) - room :]) if room < len(records) else list(records)
        if len(kept) < len(records):
            self.dropped(len(records) - len(kept), "buffer_full")
        self._pending.extendleft(reversed(kept))

    def discard(self) -> None:
        """Drop everything pending (the store closed and cannot write it)."""
        if self._pending:
            self.dropped(len(self._pending), "store_closed")
            self._pending.clear()

    def written(self, count: int) -> None:
        self.stats.ledger_written += count
        self.stats.ledger_batches += 1
        self._warned = False

    def dropped(self, count: int, reason: str) -> None:
        self.stats.ledger_dropped += count
        telemetry.emit("ledger.dropped", count=count, reason=reason)
        if not self._warned:  # once per episode: a full buffer would log per request
            self._warned = True
            log.warning("ledger.dropped", count=count, reason=reason, pending=len(self))


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
    """The records summed per (bucket, tenant, key_id, model, provider)."""
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
    return [(*key, *row) for key, row in sums.items()]


def _insert(conn: sqlite3.Connection, records: Sequence[UsageRecord]) -> None:
    conn.executemany(_INSERT_RAW, [_raw_row(r) for r in records])
    conn.executemany(_UPSERT["usage_hourly"], rollup_rows(records, HOUR_S))
    conn.executemany(_UPSERT["usage_daily"], rollup_rows(records, DAY_S))


def _insert_guarded(conn: sqlite3.Connection, records: Sequence[UsageRecord]) -> bool:
    """:func:`_insert` under a savepoint, undone if SQLite refuses; whether it went in."""
    conn.execute("SAVEPOINT ledger")
    try:
        _insert(conn, records)
    except (sqlite3.Error, ValueError, OverflowError) as exc:
        log.error("ledger.write.refused", error=str(exc), records=len(records))
        conn.execute("ROLLBACK TO ledger")
        conn.execute("RELEASE ledger")
        return False
    conn.execute("RELEASE ledger")
    return True


def write(conn: sqlite3.Connection, records: Sequence[UsageRecord]) -> list[UsageRecord]:
    """Write ``records`` and their rollups in the caller's transaction; returns those SQLite
    refused (each tried alone once the batch was refused), which are not written."""
    if not records or _insert_guarded(conn, records):
        return []
    if len(records) == 1:
        return list(records)
    return [r for r in records if not _insert_guarded(conn, [r])]


# --- retention ---------------------------------------------------------------------------------


def sweep(conn: sqlite3.Connection, now: float, config: LedgerConfig) -> tuple[int, float | None]:
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
            f"DELETE FROM {table} WHERE rowid IN"
            f" (SELECT rowid FROM {table} WHERE {column} <= ? LIMIT ?)",
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
    conn: sqlite3.Connection,
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
    sums = ", ".join(f"SUM({c}) AS {c}" for c in _SUMS)
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


def spend(
    conn: sqlite3.Connection, tenant: str, key_id: str | None, since: float
) -> tuple[float, int]:
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
