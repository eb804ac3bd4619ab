"""Usage reports against real databases, SQLite and PostgreSQL: the plan's SQL
(``server/usage_report_sql.py``) over the ledger's own tables, written by the ledger's own
writer and swept by its own sweep; the read in one snapshot on a connection of its own; the
store's ``usage_report`` (flushing the buffer first, then reading off the writer's
connection).

The property: for any records, retentions, range, grouping, granularity and filters, the
report equals, row by row, token for token and to the cent (and within 1e-9 USD), what the
records ever written sum to over the report's covered range; the covered range is the
range asked for while the raw records are kept.

Test rules: every test runs on both backends (SQLite in memory or in ``tmp_path``; a real
PostgreSQL server per session, a fresh database per test or per module: ``conftest.py``);
time is passed in (no sleeps); hypothesis is derandomized.
"""

from __future__ import annotations

import math
import sqlite3
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pg_server
import pytest
import trio
from helpers import usage_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from store_db_helpers import StoreDb

from runestone_proxy.config import Config
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.gateway.usage_report import DAY_S, HOUR_S, UsageQuery, UsageReport
from runestone_proxy.server import store_ledger_sql, store_schema, usage_report_sql
from runestone_proxy.server.store import Store, backend_from_config
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_pg import PgBackend
from runestone_proxy.server.store_sqlite import SqliteDb

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z
COLUMNS = ("tenant", "key_id", "model", "provider")
COUNTS = ("prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens")


def write(conn: Db, records: list[UsageRecord]) -> None:
    """``records`` in one transaction, as the store's writer writes them."""
    conn.begin()
    assert store_ledger_sql.write(conn, records) == []
    conn.commit()


@pytest.fixture(scope="module", params=["sqlite", "postgres"])
def ledger(request: pytest.FixtureRequest) -> Iterator[Db]:
    """One connection per backend for the module's property test (each example empties
    the ledger's tables first): SQLite in memory, or a PostgreSQL database of its own."""
    conn: Db
    if request.param == "sqlite":
        sqlite_conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
        sqlite_conn.row_factory = sqlite3.Row
        store_schema.migrate(sqlite_conn)
        conn = sqlite_conn
    else:
        server: pg_server.PgServer = request.getfixturevalue("pg")
        conn = PgBackend(server.create_database("usage")).connect()
    try:
        yield conn
    finally:
        conn.close()


def expected_rows(records: list[UsageRecord], query: UsageQuery, covered: Any) -> dict[Any, Any]:
    """What the records sum to per (bucket, group) over ``covered``, as the report's rows."""
    rows: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, 0, 0, 0, 0, []])
    if covered is None:
        return {}
    for r in records:
        if not covered[0] <= r.at < covered[1]:
            continue
        if any(getattr(r, column) != value for column, value in query.filters):
            continue
        size = query.bucket_s
        bucket = None if size is None else math.floor(r.at / size) * size
        sums = rows[(bucket, tuple(getattr(r, c) for c in query.group_by))]
        sums[0] += 1
        sums[1] += r.outcome == "error"
        for i, name in enumerate(COUNTS):
            sums[2 + i] += getattr(r, name)
        sums[6].append(r.cost_usd)
    return {k: (*v[:6], math.fsum(v[6])) for k, v in rows.items()}


def got_rows(report: UsageReport) -> dict[Any, Any]:
    return {
        (r.bucket_start, r.group): (
            r.sums.requests,
            r.sums.errors,
            *(getattr(r.sums, name) for name in COUNTS),
            r.sums.cost_usd,
        )
        for r in report.rows
    }


def assert_same(got: dict[Any, Any], expected: dict[Any, Any]) -> None:
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        have = got[key]
        assert have[:6] == want[:6], key
        assert round(have[6], 2) == round(want[6], 2) or abs(have[6] - want[6]) < 1e-9
        assert abs(have[6] - want[6]) < 1e-9


# --- the property, on the ledger's own writer and sweep ---------------------------------------

records_strategy = st.lists(
    st.builds(
        lambda ms, tenant, key, model, provider, p, c, cost, error: usage_record(
            T0 - ms / 1000,
            tenant,
            key_id=key,
            model=model,
            provider=provider,
            prompt_tokens=p,
            completion_tokens=c,
            cached_tokens=p // 3,
            reasoning_tokens=c // 4,
            cost_usd=cost,
            outcome="error" if error else "ok",
        ),
        st.integers(0, 9 * 86_400_000),
        st.sampled_from(["a", "b"]),
        st.sampled_from(["k1", "k2", ""]),
        st.sampled_from(["fast", "smart"]),
        st.sampled_from(["openai", "anthropic"]),
        st.integers(0, 5000),
        st.integers(0, 2000),
        st.sampled_from([0.0, 0.000135, 0.0021, 0.015, 1.1]),
        st.booleans(),
    ),
    max_size=60,
)


@settings(
    max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)
@given(
    records=records_strategy,
    retention=st.tuples(st.integers(1, 4), st.integers(1, 6), st.integers(1, 9)),
    span=st.tuples(st.integers(0, 9 * 24 * 60), st.integers(1, 9 * 24 * 60)),
    group_by=st.permutations(COLUMNS).flatmap(lambda cs: st.integers(0, 4).map(lambda n: cs[:n])),
    granularity=st.sampled_from(["hour", "day", "total"]),
    filters=st.lists(
        st.sampled_from([("tenant", "a"), ("key_id", ""), ("model", "smart")]), unique=True
    ),
)
def test_reports_equal_the_records_over_the_covered_range(
    ledger: Db,
    records: list[UsageRecord],
    retention: tuple[int, int, int],
    span: tuple[int, int],
    group_by: tuple[str, ...],
    granularity: Any,
    filters: list[tuple[str, str]],
) -> None:
    config = LedgerConfig(
        retention_days=retention[0],
        hourly_retention_days=retention[1],
        daily_retention_days=retention[2],
    )
    now = T0 + 123.456
    conn = ledger
    conn.begin()
    for table in ("usage", "usage_hourly", "usage_daily"):
        conn.execute(f"DELETE FROM {table}")
    conn.commit()
    write(conn, records)
    while True:  # until nothing is left due
        conn.begin()
        due = store_ledger_sql.sweep(conn, now, config)[1]
        conn.commit()
        if due != now:
            break
    start = now - span[0] * 60.0 - 0.5
    query = UsageQuery(start, start + span[1] * 60.0, group_by, granularity, tuple(filters))
    report = usage_report_sql.report(conn, query, now, config)
    if start > now - config.retention_days * DAY_S:
        assert report.plan.exact
    assert_same(got_rows(report), expected_rows(records, query, report.plan.covered))
    totals = report.totals
    assert totals.requests == sum(r.sums.requests for r in report.rows)


def test_segment_sql_is_plain() -> None:
    """One SELECT per segment, parameterised, nothing SQLite-only (PostgreSQL runs it too)."""
    from runestone_proxy.gateway.usage_report import Segment

    query = UsageQuery(T0, T0 + DAY_S, ("model", "tenant"), "hour", (("key_id", "k1"),))
    sql, params = usage_report_sql.segment_query(Segment("usage", T0, T0 + 60), query)
    assert sql == (
        "SELECT model, tenant, COUNT(*) AS requests,"
        " SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END) AS errors,"
        " SUM(prompt_tokens) AS prompt_tokens, SUM(completion_tokens) AS completion_tokens,"
        " SUM(cached_tokens) AS cached_tokens, SUM(reasoning_tokens) AS reasoning_tokens,"
        " SUM(cost_usd) AS cost_usd FROM usage WHERE at >= ? AND at < ? AND key_id = ?"
        " GROUP BY model, tenant"
    )
    assert params == [T0, T0 + 60, "k1"]
    sql, _ = usage_report_sql.segment_query(Segment("usage_hourly", T0, T0 + 2 * HOUR_S), query)
    assert sql.startswith("SELECT bucket_start, model, tenant, SUM(requests) AS requests")
    assert sql.endswith("GROUP BY bucket_start, model, tenant")
    # A read inside one bucket of the report needs no bucket_start of its own.
    sql, _ = usage_report_sql.segment_query(Segment("usage_hourly", T0, T0 + HOUR_S), query)
    assert sql.startswith("SELECT model, tenant, SUM(requests) AS requests")


# --- one snapshot, off the writer's connection -------------------------------------------------


def test_a_report_reads_one_snapshot_taken_before_its_now(db: StoreDb) -> None:
    """A record committed after the report's first read (here: while the report reads its
    clock, as a writer may at any moment) is in none of the report's reads, on either
    backend (PostgreSQL at READ COMMITTED would see it in the reads after)."""
    backend = backend_from_config(db.overflow(), {})
    writer = backend.connect()
    try:
        write(writer, [usage_record(T0 - 90, tenant="early")])
        seen_at: list[float] = []

        def clock() -> float:
            write(
                writer,
                [
                    usage_record(T0 - 30, tenant="late"),
                    usage_record(T0 - 2 * HOUR_S, tenant="late"),
                ],
            )
            seen_at.append(T0)
            return T0

        query = UsageQuery(T0 - DAY_S, T0, ("tenant",), "hour")
        report = usage_report_sql.read(backend, query, LedgerConfig(), clock)
        assert seen_at == [T0]
        assert [(r.bucket_start, r.group) for r in report.rows] == [(T0 - HOUR_S, ("early",))]
        again = usage_report_sql.read(backend, query, LedgerConfig(), lambda: T0)
        assert {r.group for r in again.rows} == {("early",), ("late",)}
        assert again.totals.requests == 3
    finally:
        writer.close()


def test_a_database_without_a_ledger_is_unreadable(db: StoreDb) -> None:
    backend = backend_from_config(db.overflow(), {})
    backend.connect().close()  # a current schema
    db.rows("DELETE FROM schema_version")
    db.rows("INSERT INTO schema_version (version) VALUES (999)")
    query = UsageQuery(T0 - DAY_S, T0)
    with pytest.raises(usage_report_sql.NoLedger, match="newer Runestone"):
        usage_report_sql.read(backend, query, LedgerConfig(), lambda: T0)
    db.rows("DROP TABLE schema_version")
    with pytest.raises(usage_report_sql.Unreadable, match="cannot read"):
        usage_report_sql.read(backend, query, LedgerConfig(), lambda: T0)


# --- the store: a report sees what is still buffered ------------------------------------------


def make_store(db: StoreDb, now: float) -> Store:
    store = Store.from_config(Config(overflow=db.overflow()), env={})
    store.clock = lambda: now
    return store


async def test_the_store_flushes_its_buffer_before_reporting(
    db: StoreDb, nursery: trio.Nursery
) -> None:
    store = make_store(db, T0 + 10)
    await nursery.start(store.run)
    records = [usage_record(T0 - 3600 * i - 1, tenant="ab"[i % 2]) for i in range(30)]
    with trio.fail_after(10):
        for r in records:
            store.record(r)  # buffered: the flush timer has not fired (1 s)
        query = UsageQuery(T0 - DAY_S, T0 + 10, ("tenant",), "day")
        report = await store.usage_report(query)
    assert report.plan.exact
    assert_same(got_rows(report), expected_rows(records, query, (query.start, query.end)))
    assert report.totals.requests == 24  # those in the last 24 hours
