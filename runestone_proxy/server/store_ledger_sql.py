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

import functools
import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import attrs
import structlog

from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.ledger import UsageRow
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
#
# Per record this is most of the ledger's cost (the request only appends a tuple to a
# buffer), so it does per-record Python work only where C cannot:
#
# * **Text as it is.** The batch is taken as columns (one ``zip``); one C pass over its
#   text columns (:func:`_plain`; one value of a column that holds one value in every
#   record) tells whether every text is ASCII without NUL, which
#   :func:`storable` leaves as it is: then the records are bound as they are. Otherwise
#   (rare: a model name with an accent, a lone surrogate from a JSON escape, a NUL) the
#   whole batch is rewritten with :func:`storable` text first, so both backends store
#   exactly what they stored before.
# * **Few statements, few binds.** SQLite: multi-row ``INSERT ... VALUES (...), (...)`` of
#   :data:`ROWS_PER_INSERT` rows (the rest of a batch in 128, 64, ... 1: nine sizes of
#   statement, prepared once each). Each statement releases the GIL once (around
#   ``sqlite3_step``), where ``executemany`` released it per row and the event loop and the
#   writer traded it back and forth. A value every row of a statement has (the tenant, the
#   model, ``ok``, ...: :data:`_SHAREABLE`) is bound once and named by number (``?3``) in
#   every row: each ``sqlite3_bind_*`` takes the connection's mutex, and a text is copied
#   (``SQLITE_TRANSIENT``), so eight texts a row were a third of the insert. ``stream``/
#   ``estimated`` are bound as ints (the ``sqlite3`` module looks a ``bool``, and ``None``,
#   up in its adapter registry) and a whole answer's ``ttfb_ms`` (None) as NaN, which
#   SQLite stores as NULL (``sqlite3`` adapts None through that registry: two failed
#   attribute lookups, each raising and clearing an AttributeError). PostgreSQL: one
#   ``INSERT ... SELECT FROM unnest(...)`` of 20 arrays (one statement and one round trip
#   for the batch; psycopg dumps each array in C).
# * **Rollups summed once.** A batch in one rollup row (one hour, tenant, key, model and
#   provider: a steady stream's usual pass) is summed per column in C (:func:`_one_bucket`);
#   another is summed per hour in one pass, the days from those hours (a handful of rows);
#   rows are upserted in key order (PostgreSQL's lock order, see the module docstring).

#: Rows per multi-row INSERT on SQLite (at most; 20 parameters each, within SQLite's 32,766).
#: Each statement costs the writer a fixed share besides its rows (the ``sqlite3`` module's
#: call, the statement's setup and reset, the chunk's Python): 64-row statements cost
#: 15,480 instructions a record in 4096-record passes (``bench.ledger_writer --size 4096``
#: under callgrind), 256-row ones 13,125 (1024-row ones 12,647). A prepared 256-row
#: statement holds ~0.4 MB (its registers and program): the ``sqlite3`` module caches at
#: most 128 statements, so the many shapes of a very mixed traffic stay within ~50 MB; one
#: tenant's steady traffic uses the nine sizes of one or two shapes (~1 MB).
ROWS_PER_INSERT = 256
#: The statement sizes a batch is cut into: 256-row statements, then the rest in powers of
#: two (at most one of each), so a pass prepares at most nine shapes of statement per mask
#: (below), which stay in the connection's statement cache, whatever the batch's size.
_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_COLUMNS = 20
#: A record's text fields: request_id, tenant, key_id, endpoint, model, provider,
#: upstream_model (``outcome`` is one of three literals).
_TEXTS = range(1, 8)
#: ``stream`` and ``estimated``: bound as 0/1.
_FLAGS = (16, 17)
#: ``ttfb_ms``: None bound as NaN (SQLite stores a NaN as NULL).
_TTFB = 19
#: The columns whose values come from small sets (who asked, for what, how it went:
#: tenant, key_id, endpoint, model, provider, upstream_model, attempts, cached and
#: reasoning tokens, status, outcome, stream, estimated, ttfb_ms): where every row of a
#: statement has the same value in one of them, that value is bound once and every row
#: refers to it (``?N``), rather than bound per row. A steady stream of one tenant's calls
#: to one model shares all of these; mixed traffic shares fewer and binds the rest per row.
_SHAREABLE = (2, 3, 4, 5, 6, 7, 8, 11, 12, 14, 15, 16, 17, 19)
#: A rollup row's who: tenant, key_id, model, provider.
_WHO = (2, 3, 5, 6)
#: PostgreSQL: the batch as one array per column.
_PG_TYPES = (
    "DOUBLE PRECISION",
    *["TEXT"] * 7,
    *["BIGINT"] * 5,
    "DOUBLE PRECISION",
    "INTEGER",
    "TEXT",
    "INTEGER",
    "INTEGER",
    "DOUBLE PRECISION",
    "DOUBLE PRECISION",
)
_INSERT_UNNEST = (
    f"INSERT INTO usage ({_RAW_COLUMNS}) SELECT * FROM unnest("
    + ", ".join(f"CAST(? AS {t}[])" for t in _PG_TYPES)
    + ")"
)


@functools.lru_cache(maxsize=256)
def _insert_rows(count: int, shared: tuple[int, ...] = ()) -> str:
    """``INSERT INTO usage ... VALUES`` with ``count`` rows of placeholders: the ``shared``
    columns refer to one parameter each (the first ones, in column order), the others to
    one per row (row after row, in column order).

    The first row numbers its own parameters (``?15``, ...), the later rows leave them
    bare (``?``): SQLite gives a bare ``?`` the number after the largest so far, so they
    number themselves in order. SQLite looks every numbered parameter up in a list of
    those it has seen while it prepares the statement, so numbering all of them (~1,500 in
    256 rows) made the prepare quadratic (several milliseconds for each shape of
    statement); bare ones are not looked up."""
    own = [c for c in range(_COLUMNS) if c not in shared]
    first = len(shared) + 1
    names = {c: f"?{i}" for i, c in enumerate(shared, 1)}
    names.update({c: f"?{first + i}" for i, c in enumerate(own)})
    rows = [f"({', '.join(names[c] for c in range(_COLUMNS))})"]
    names.update(dict.fromkeys(own, "?"))
    rows += [f"({', '.join(names[c] for c in range(_COLUMNS))})"] * (count - 1)
    return f"INSERT INTO usage ({_RAW_COLUMNS}) VALUES {', '.join(rows)}"


def _plain(texts: Iterable[Sequence[Any]]) -> bool:
    """Every text of the records' text columns ``texts`` is ASCII without NUL
    (:func:`storable` would keep it)."""
    try:
        text = "".join(itertools.chain.from_iterable(texts))
    except TypeError:  # not a str: let storable() and the driver say what it is
        return False
    return text.isascii() and "\x00" not in text


def _storable_record(r: UsageRow) -> UsageRow:
    def text(value: str) -> str:
        return storable(value) or ""  # only None gives None, and these are str

    request_id, tenant, key_id, endpoint, model, provider, upstream_model = map(text, r[1:8])
    return (r[0], request_id, tenant, key_id, endpoint, model, provider, upstream_model, *r[8:])


@attrs.frozen
class _Batch:
    """A batch as the writer binds it: its records (their text made storable if it had to
    be), the same values as columns, and the :data:`_SHAREABLE` columns that hold one
    value in every record."""

    records: Sequence[UsageRow]
    columns: list[Sequence[Any]]
    uniform: frozenset[int]

    @classmethod
    def of(cls, records: Sequence[UsageRow]) -> _Batch:
        batch = cls._columns(records)
        # A uniform column's first value stands for all of them.
        texts = (batch.columns[c][:1] if c in batch.uniform else batch.columns[c] for c in _TEXTS)
        if _plain(texts):
            return batch
        return cls._columns([_storable_record(r) for r in records])

    @classmethod
    def _columns(cls, records: Sequence[UsageRow]) -> _Batch:
        columns: list[Sequence[Any]] = list(zip(*records, strict=True))
        count = len(records)
        uniform = frozenset(c for c in _SHAREABLE if columns[c].count(columns[c][0]) == count)
        return cls(records, columns, uniform)


def _bindable(column: int, values: Sequence[Any]) -> Sequence[Any]:
    """A column's values as SQLite binds them cheaply: flags as 0/1, no ttfb as NaN."""
    if column in _FLAGS:
        return list(map(int, values))
    if column == _TTFB:
        nan = math.nan
        return [nan if t is None else t for t in values]
    return values


def _insert_chunk(
    conn: Db, columns: list[Sequence[Any]], count: int, uniform: frozenset[int]
) -> None:
    """One multi-row INSERT of ``count`` rows given as ``columns`` (one sequence each), the
    ``uniform`` columns known to hold one value."""
    shared = tuple(
        c for c in _SHAREABLE if c in uniform or columns[c].count(columns[c][0]) == count
    )
    params: list[Any] = [_bindable(c, columns[c][:1])[0] for c in shared]
    own = [_bindable(c, columns[c]) for c in range(_COLUMNS) if c not in shared]
    params += itertools.chain.from_iterable(zip(*own, strict=True))
    conn.execute(_insert_rows(count, shared), params)


def _insert_sqlite(conn: Db, batch: _Batch) -> None:
    at, left = 0, len(batch.records)
    for size in _SIZES:
        while left >= size:
            chunk = [column[at : at + size] for column in batch.columns]
            _insert_chunk(conn, chunk, size, batch.uniform)
            at, left = at + size, left - size


def _insert_postgres(conn: Db, batch: _Batch) -> None:
    columns = [_bindable(c, v) if c in _FLAGS else list(v) for c, v in enumerate(batch.columns)]
    conn.execute(_INSERT_UNNEST, columns)


def rollup_rows(records: Iterable[UsageRow], size_s: float) -> list[tuple[Any, ...]]:
    """The records summed per (bucket, tenant, key_id, model, provider), ``size_s`` being
    ``HOUR_S`` or ``DAY_S``, in key order (text as the records hold it)."""
    hourly = _hour_sums(records)
    return _rows(hourly if size_s == HOUR_S else _day_sums(hourly))


def _hour_sums(records: Iterable[UsageRow]) -> dict[tuple[Any, ...], list[Any]]:
    sums: dict[tuple[Any, ...], list[Any]] = {}
    floor = math.floor
    # Unpacked (one C step) rather than read by name: a named tuple's field is a
    # descriptor call per read, twelve per record here.
    for (
        at,
        _,
        tenant,
        key_id,
        _,
        model,
        provider,
        _,
        _,
        prompt,
        completion,
        cached,
        reasoning,
        cost,
        _,
        outcome,
        _,
        _,
        _,
        _,
    ) in records:
        key = (floor(at / HOUR_S) * HOUR_S, tenant, key_id, model, provider)
        row = sums.get(key)
        if row is None:
            row = sums[key] = [0, 0, 0, 0, 0, 0, 0.0]
        row[0] += 1
        if outcome == "error":
            row[1] += 1
        row[2] += prompt
        row[3] += completion
        if cached:
            row[4] += cached
        if reasoning:
            row[5] += reasoning
        row[6] += cost
    return sums


def _day_sums(hourly: dict[tuple[Any, ...], list[Any]]) -> dict[tuple[Any, ...], list[Any]]:
    """The hourly sums summed per UTC day (an hour lies within one day: a day is 24 whole
    hours from the epoch): a handful of rows, not a second pass over the records."""
    sums: dict[tuple[Any, ...], list[Any]] = {}
    for (hour, *who), values in hourly.items():
        key = (bucket_start(hour, DAY_S), *who)
        row = sums.get(key)
        if row is None:
            sums[key] = list(values)
        else:
            for i, v in enumerate(values):
                row[i] += v
    return sums


def _rows(sums: dict[tuple[Any, ...], list[Any]]) -> list[tuple[Any, ...]]:
    return [(*key, *sums[key]) for key in sorted(sums)]


def _one_bucket(batch: _Batch) -> dict[tuple[Any, ...], list[Any]] | None:
    """The batch's hourly sums when it all falls in one rollup row (one hour, tenant, key,
    model and provider: a steady stream's usual batch), summed per column in C; else None
    (:func:`_hour_sums` sums the records one by one). The same sums, added in the same
    order."""
    columns = batch.columns
    hour = math.floor(min(columns[0]) / HOUR_S) * HOUR_S
    if math.floor(max(columns[0]) / HOUR_S) * HOUR_S != hour:
        return None
    if not batch.uniform.issuperset(_WHO):
        return None
    who = [columns[c][0] for c in _WHO]
    errors = columns[15].count("error")
    sums = [len(columns[0]), errors, *map(sum, columns[9:13]), sum(columns[13], 0.0)]
    return {(hour, *who): sums}


def _insert(conn: Db, records: Sequence[UsageRow]) -> None:
    # The raw rows, then the rollups from the values as stored (storable() text).
    batch = _Batch.of(records)
    if conn.dialect.name == "postgres":
        _insert_postgres(conn, batch)
    else:
        _insert_sqlite(conn, batch)
    hourly = _one_bucket(batch)
    if hourly is None:
        hourly = _hour_sums(batch.records)
    conn.executemany(_UPSERT["usage_hourly"], _rows(hourly))
    conn.executemany(_UPSERT["usage_daily"], _rows(_day_sums(hourly)))


def _insert_guarded(conn: Db, records: Sequence[UsageRow]) -> bool:
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


def write(conn: Db, records: Sequence[UsageRow]) -> list[UsageRow]:
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


def first_due(records: Sequence[UsageRow], config: LedgerConfig) -> float | None:
    """When the earliest of ``records`` falls due for sweeping (as :func:`sweep` sees it).

    The earliest is taken to be the first or the last (the buffer keeps records in the
    order their requests ended, a failed pass's in front again): this runs on the event
    loop once per pass, where a scan of 4096 records cost ~80 instructions a record. A
    record stamped earlier than both (the wall clock stepped back while the pass filled)
    is swept up to that step late at worst: every sweep asks the tables when the next one
    is due."""
    if not records:
        return None
    keep = min(config.retention_days, config.hourly_retention_days, config.daily_retention_days)
    earliest: float = min(records[0][0], records[-1][0])
    return earliest + keep * DAY_S + RAW_SWEEP_SLACK_S


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
