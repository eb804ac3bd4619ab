"""The raw ledger's indexes (SQLite schema v7, PostgreSQL v3): ``usage`` keeps only
``usage_at``, which every query on it uses (a tenant filter is checked on the rows of the
time range), and a database made before (SQLite v6, PostgreSQL v2) loses ``usage_tenant_at``
at the next start, its records and their spend kept.

Test rules: as ``test_store.py`` (``db`` runs on both backends; the store on its real worker
thread; nothing sleeps: ``sync_ledger`` waits for the writer).
"""

from __future__ import annotations

import sqlite3

import pytest
import trio
from store_db_helpers import StoreDb
from test_store_ledger_db import HOUR, T0, rec

from runestone_proxy.config import Config
from runestone_proxy.gateway.usage_report import Segment, UsageQuery
from runestone_proxy.server import store_ledger_sql, store_pg_schema, store_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.usage_report_sql import segment_query


def usage_indexes(db: StoreDb) -> list[str]:
    if db.backend == "sqlite":
        sql = "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = 'usage'"
    else:
        sql = "SELECT indexname AS name FROM pg_indexes WHERE tablename = 'usage'"
    return sorted(row["name"] for row in db.rows(sql))


def make_previous(db: StoreDb) -> None:
    """The database as the version before this one left it, with one raw record in it
    (half past T0: spend from T0 + 10 min reads it from the raw rows)."""
    if db.backend == "sqlite":
        conn = sqlite3.connect(db.path, isolation_level=None)
        conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version in range(1, 7):
            for statement in store_schema._MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.close()
    else:
        db.rows("CREATE TABLE schema_version (version INTEGER NOT NULL)")
        for version in (1, 2):
            for statement in store_pg_schema.MIGRATIONS[version]:
                db.rows(statement)
            db.rows("INSERT INTO schema_version (version) VALUES (?)", (version,))
    assert usage_indexes(db) == ["usage_at", "usage_tenant_at"]
    r = rec(0, at=T0 + 1800.0, tenant="acme", cost_usd=0.25, prompt_tokens=7, completion_tokens=3)
    columns = store_ledger_sql._RAW_COLUMNS
    db.rows(
        f"INSERT INTO usage ({columns}) VALUES ({', '.join('?' * 20)})",
        (*r[:16], int(r.stream), int(r.estimated), *r[18:]),
    )


async def test_a_new_database_indexes_usage_on_at_only(db: StoreDb, nursery: trio.Nursery) -> None:
    store = Store.from_config(Config(overflow=db.overflow()), env={})
    with trio.fail_after(10):
        await nursery.start(store.run)
        assert usage_indexes(db) == ["usage_at"]
        for i in range(6):
            store.record(rec(i, tenant="acme", at=T0 + 600.0 * i, cost_usd=0.5))
        store.record(rec(9, tenant="other", at=T0 + 900.0, cost_usd=4.0))
        await store.sync_ledger()
        # From ten minutes past: the raw rows up to the next hour and the hourly rollup.
        assert await store.spend("acme", None, T0 + 600.0) == pytest.approx((2.5, 90))
        assert (await store.spend("acme", "k1", T0 + HOUR))[0] == 0.0


@pytest.mark.parametrize(
    "sql",
    [
        # spend()'s raw part, by tenant and by key
        "SELECT SUM(cost_usd) FROM usage WHERE tenant = ? AND at >= ? AND at < ?",
        "SELECT SUM(cost_usd) FROM usage WHERE tenant = ? AND key_id = ? AND at >= ? AND at < ?",
        # the retention sweep
        "DELETE FROM usage WHERE rowid IN (SELECT rowid FROM usage WHERE at <= ? LIMIT ?)",
        "SELECT MIN(at) FROM usage",
        # a report's raw segment filtered by tenant and key
        segment_query(
            Segment("usage", T0, T0 + 1800.0),
            UsageQuery(T0, T0 + HOUR, ("model",), "hour", (("tenant", "a"), ("key_id", "k"))),
        )[0],
    ],
)
def test_every_query_on_usage_searches_by_at(sql: str) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    store_schema.migrate(conn)
    plan = [row[3] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", [0] * sql.count("?"))]
    assert any("usage_at" in step for step in plan), plan
    assert not any(step.startswith("SCAN usage") for step in plan), plan


async def test_the_previous_schema_loses_the_tenant_index_and_keeps_its_records(
    db: StoreDb, nursery: trio.Nursery
) -> None:
    make_previous(db)
    store = Store.from_config(Config(overflow=db.overflow()), env={})
    with trio.fail_after(10):
        await nursery.start(store.run)
        assert usage_indexes(db) == ["usage_at"]
        newest = (store_schema if db.backend == "sqlite" else store_pg_schema).SCHEMA_VERSION
        assert [r["version"] for r in db.rows("SELECT version FROM schema_version")] == list(
            range(1, newest + 1)
        )
        assert await store.spend("acme", None, T0 + 600.0) == (0.25, 10)
        assert await store.spend("acme", "k1", T0 + 600.0) == (0.25, 10)
        assert await store.spend("other", None, T0 + 600.0) == (0.0, 0)
