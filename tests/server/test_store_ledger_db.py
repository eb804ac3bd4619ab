"""The ledger's writer on both backends (SQLite and PostgreSQL, ``db`` from ``conftest.py``):
the fast path (records bound as they are: SQLite's multi-row INSERTs, PostgreSQL's
``unnest`` arrays) and the slow one (a batch with text :func:`storable` rewrites) store the
same rows, and the rollups equal their sums, whatever the batch's size and mix.

Test rules: as ``test_store.py`` (a fresh database per test; the store on its real worker
thread; nothing sleeps: ``sync_ledger`` waits for the writer).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
from store_db_helpers import StoreDb

from runestone_proxy.config import Config
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.server import store_ledger_sql
from runestone_proxy.server.store import Store

T0 = 1_800_000_000.0  # on the hour
HOUR = 3600.0


def rec(i: int, **kw: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "at": T0 + (i % 7) * 1000.0,  # spans three hours
        "request_id": f"req_{i:05d}",
        "tenant": "ab"[i % 2],
        "key_id": "k1",
        "endpoint": "chat",
        "model": ("fast", "smart")[i % 3 == 0],
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "attempts": 1 + i % 2,
        "prompt_tokens": 10 + i,
        "completion_tokens": 5,
        "cached_tokens": i % 3,
        "reasoning_tokens": 1,
        "cost_usd": (i % 5) / 1000,
        "status": 200,
        "outcome": ("ok", "error", "cancelled")[i % 3],
        "stream": i % 2 == 0,
        "estimated": i % 4 == 0,
        "latency_ms": 12.5 + i,
        "ttfb_ms": None if i % 2 else 3.25,
    }
    fields.update(kw)
    return UsageRecord(**fields)


async def write(db: StoreDb, nursery: trio.Nursery, records: list[UsageRecord]) -> Store:
    store = Store.from_config(Config(overflow=db.overflow()), env={})
    await nursery.start(store.run)
    for r in records:
        store.record(r)
    await store.sync_ledger()
    assert (store.stats.ledger_written, store.stats.ledger_dropped) == (len(records), 0)
    return store


def raw_rows(db: StoreDb) -> list[tuple[Any, ...]]:
    rows = db.rows(f"SELECT {store_ledger_sql._RAW_COLUMNS} FROM usage ORDER BY request_id")
    return [tuple(row.values()) for row in rows]


def expected_row(r: UsageRecord, **text: str) -> tuple[Any, ...]:
    return tuple(
        {**r._asdict(), "stream": int(r.stream), "estimated": int(r.estimated), **text}.values()
    )


# Around one statement's rows and past several (with the rest cut into smaller statements).
ROWS = store_ledger_sql.ROWS_PER_INSERT


@pytest.mark.parametrize("size", [1, 63, ROWS - 1, ROWS, ROWS + 1, 2 * ROWS + 75])
async def test_records_are_stored_as_they_are(
    db: StoreDb, nursery: trio.Nursery, size: int
) -> None:
    records = [rec(i) for i in range(size)]
    await write(db, nursery, records)
    assert raw_rows(db) == [expected_row(r) for r in records]
    for table, size_s in (("usage_hourly", HOUR), ("usage_daily", 86400.0)):
        got = db.rows(
            f"SELECT bucket_start, tenant, key_id, model, provider, requests, errors,"
            f" prompt_tokens, completion_tokens, cached_tokens, reasoning_tokens, cost_usd"
            f" FROM {table} ORDER BY bucket_start, tenant, key_id, model, provider"
        )
        want = store_ledger_sql.rollup_rows(records, size_s)
        assert [tuple(row.values())[:11] for row in got] == [w[:11] for w in want]
        assert [round(row["cost_usd"], 9) for row in got] == [round(w[11], 9) for w in want]


async def test_a_batch_with_text_to_rewrite_is_stored_whole(
    db: StoreDb, nursery: trio.Nursery
) -> None:
    # One record with text storable() rewrites (NUL, a lone surrogate) sends the batch down
    # the slow path: the same rows on both backends, the others' text untouched (accents
    # too: valid UTF-8 is stored as it is).
    odd = {"model": "caf\u00e9\x00", "tenant": "t\ud800"}
    records = [rec(0), rec(1, **odd), rec(2, upstream_model="\u00fcber")]
    await write(db, nursery, records)
    assert raw_rows(db) == [
        expected_row(records[0]),
        expected_row(records[1], model="caf\u00e9\\x00", tenant="t\\ud800"),
        expected_row(records[2]),
    ]
    tenants = db.rows("SELECT tenant, model, requests FROM usage_daily ORDER BY tenant, model")
    assert [tuple(r.values()) for r in tenants] == [
        ("a", "fast", 1),
        ("a", "smart", 1),
        ("t\\ud800", "caf\u00e9\\x00", 1),
    ]


async def test_a_whole_answers_ttfb_is_stored_as_null(db: StoreDb, nursery: trio.Nursery) -> None:
    """SQLite binds None as NaN (cheaper than ``sqlite3``'s adapter lookup for None), which
    it stores as NULL: ``IS NULL`` finds it, as on PostgreSQL."""
    await write(db, nursery, [rec(1), rec(2)])  # rec(1) has no ttfb, rec(2) 3.25 ms
    rows = db.rows("SELECT request_id, ttfb_ms FROM usage ORDER BY request_id")
    assert [(r["request_id"], r["ttfb_ms"]) for r in rows] == [
        ("req_00001", None),
        ("req_00002", 3.25),
    ]
    assert db.count("usage WHERE ttfb_ms IS NULL") == 1
