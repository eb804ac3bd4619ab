"""The usage ledger in the SQLite store: batching into the writer's group commits, rollups
equal to the raw rows, migration from v4, retention of each table, the bounded buffer, the
flush on shutdown, ``usage_totals`` and ``spend``.

Test rules: every database lives in ``tmp_path``; the store runs on its real worker thread;
time comes from a settable clock or is passed in; nothing sleeps (``sync_ledger`` waits for
the writer).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from helpers import usage_record
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy import config as config_module
from runestone_proxy import telemetry
from runestone_proxy.config import Config, ConfigError, OverflowConfig
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.gateway.overflow import NewJob
from runestone_proxy.server import store_ledger_sql, store_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_ledger import LedgerBuffer
from runestone_proxy.server.store_schema import SCHEMA_VERSION
from runestone_proxy.server.store_sqlite import SqliteDb

DAY = 86400.0
HOUR = 3600.0
T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, on the hour
SUMS = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens")


@attrs.define
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


def rec(at: float = T0, tenant: str = "a", **kw: Any) -> UsageRecord:
    return usage_record(at, tenant, **{"cost_usd": 0.25, **kw})


def make_store(tmp_path: Path, clock: Clock | None = None, **ledger: int) -> Store:
    config = Config(
        overflow=OverflowConfig(database=str(tmp_path / "s.sqlite3")),
        ledger=LedgerConfig(**ledger),
    )
    store = Store.from_config(config, env={})
    store.clock = clock or Clock()
    return store


@pytest.fixture
async def store(tmp_path: Path, nursery: trio.Nursery) -> Store:
    s = make_store(tmp_path)
    await nursery.start(s.run)
    return s


@pytest.fixture
def events() -> Iterator[list[tuple[str, dict[str, Any]]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    remove = telemetry.add_handler(lambda event, fields: seen.append((event, fields)))
    yield seen
    remove()


def count(path: Path, table: str) -> int:
    conn = sqlite3.connect(path)
    try:
        n: int = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
        return n
    finally:
        conn.close()


# --- writing -----------------------------------------------------------------------------------


async def test_records_are_written_in_a_few_group_commits(store: Store) -> None:
    for i in range(1000):
        store.record(rec(T0 + i, request_id=f"req_{i}"))
    assert store.stats.transactions == 0  # record() only buffers
    await store.sync_ledger()
    assert store.stats.ledger_written == 1000
    assert store.stats.transactions <= 3  # one pass takes up to PASS_MAX records
    assert count(store.path, "usage") == 1000


async def test_a_passs_records_are_freed_once_committed(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Freed on the worker thread right after the commit (not kept until the next pass and
    # freed on the event loop); counted as written all the same.
    taken: list[list[Any]] = []
    take = LedgerBuffer.take

    def spy(self: LedgerBuffer, limit: int = 4096) -> list[Any]:
        records = take(self, limit)
        taken.append(records)
        return records

    monkeypatch.setattr(LedgerBuffer, "take", spy)
    for i in range(10):
        store.record(rec(T0 + i, request_id=f"req_{i}"))
    await store.sync_ledger()
    assert store.stats.ledger_written == 10
    assert sum(map(len, taken)) == 0  # every pass's list emptied
    assert count(store.path, "usage") == 10


async def test_records_share_transactions_with_concurrent_enqueues(store: Store) -> None:
    async def one(i: int) -> None:
        store.record(rec(T0 + i))
        await store.enqueue(NewJob(f"t{i % 5}", f"req_{i}", "chat", b"{}"), now=T0)

    async with trio.open_nursery() as nursery:
        for i in range(200):
            nursery.start_soon(one, i)
    await store.sync_ledger()
    assert (store.stats.enqueued, store.stats.ledger_written) == (200, 200)
    assert store.stats.transactions < 200 / 4  # no fsync of the ledger's own per request
    assert store.stats.ledger_batches <= store.stats.transactions


async def test_a_record_sqlite_refuses_is_dropped_alone(
    store: Store, events: list[tuple[str, dict[str, Any]]]
) -> None:
    store.record(rec(T0, request_id="good_1"))
    store.record(rec(T0, request_id="bad", prompt_tokens=2**70))  # cannot be bound
    store.record(rec(T0, request_id="good_2"))
    job = await store.enqueue(NewJob("a", "req_job", "chat", b"{}"), now=T0)
    await store.sync_ledger()
    assert job.created
    assert (store.stats.ledger_written, store.stats.ledger_dropped) == (2, 1)
    assert ("ledger.dropped", {"count": 1, "reason": "refused"}) in events
    totals = await store.usage_totals(since=T0, until=T0 + HOUR, group_by=())
    assert totals[0]["requests"] == 2


async def test_records_survive_a_failed_enqueue_in_their_pass(store: Store) -> None:
    job = NewJob("a", "req_a", "chat", b"{}")
    await store.enqueue(job, now=T0)
    failures = 0

    async def dup() -> None:
        nonlocal failures
        store.record(rec(T0))
        try:
            await store.enqueue(attrs.evolve(job, request_id="again"), now=T0)  # same id
        except Exception:
            failures += 1

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(dup)
    await store.sync_ledger()
    assert failures == 3
    assert (store.stats.ledger_written, store.stats.ledger_dropped) == (3, 0)


def test_text_that_is_not_utf8_is_stored() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    assert store_ledger_sql.write(conn, [rec(tenant="t\ud800")]) == []
    assert conn.execute("SELECT tenant FROM usage_hourly").fetchone()[0] == "t\\ud800"


def test_one_unstorable_text_rewrites_its_batch_and_loses_no_record() -> None:
    # The records are bound as they are; the one SQLite cannot store sends the whole batch
    # down the slow path (undone, rewritten), which must neither double nor drop a row.
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    batch = [rec(request_id="r1"), rec(model="m\udc80", request_id="r2"), rec(request_id="r3")]
    conn.execute("BEGIN")
    assert store_ledger_sql.write(conn, batch) == []
    conn.execute("COMMIT")
    rows = conn.execute("SELECT request_id, model, stream FROM usage ORDER BY request_id")
    assert rows.fetchall() == [("r1", "fast", 0), ("r2", "m\\udc80", 0), ("r3", "fast", 0)]
    for table in ("usage_hourly", "usage_daily"):
        sums = conn.execute(f"SELECT model, requests FROM {table} ORDER BY model").fetchall()
        assert sums == [("fast", 2), ("m\\udc80", 1)]


# --- rollups -----------------------------------------------------------------------------------

records_st = st.lists(
    st.builds(
        rec,
        at=st.floats(T0 - 3 * DAY, T0 + 3 * DAY),
        tenant=st.sampled_from(["a", "b"]),
        key_id=st.sampled_from(["k1", "k2"]),
        model=st.sampled_from(["fast", "smart"]),
        provider=st.sampled_from(["openai", "anthropic"]),
        prompt_tokens=st.integers(0, 10**6),
        completion_tokens=st.integers(0, 10**5),
        cached_tokens=st.integers(0, 1000),
        cost_usd=st.integers(0, 10**7).map(lambda micro: micro / 1_000_000),
        outcome=st.sampled_from(["ok", "error", "cancelled"]),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(records=records_st, cut=st.integers(0, 60))
def test_rollups_equal_the_sums_of_the_raw_rows(records: list[UsageRecord], cut: int) -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    for batch in (records[:cut], records[cut:]):  # two writer passes
        conn.execute("BEGIN")
        assert store_ledger_sql.write(conn, batch) == []
        conn.execute("COMMIT")
    for table, size in (("usage_hourly", HOUR), ("usage_daily", DAY)):
        rollup = {
            row[:5]: row[5:]
            for row in conn.execute(
                f"SELECT bucket_start, tenant, key_id, model, provider, {', '.join(SUMS)},"
                f" reasoning_tokens, cost_usd FROM {table}"
            )
        }
        expected: dict[tuple[Any, ...], list[Any]] = {}
        for r in records:
            key = (
                store_ledger_sql.bucket_start(r.at, size),
                r.tenant,
                r.key_id,
                r.model,
                r.provider,
            )
            row = expected.setdefault(key, [0, 0, 0, 0, 0, 0, 0])
            values = (1, r.outcome == "error", r.prompt_tokens, r.completion_tokens)
            values += (r.cached_tokens, r.reasoning_tokens, round(r.cost_usd * 1_000_000))
            for i, v in enumerate(values):
                row[i] += v
        assert set(rollup) == set(expected)
        for key, row in rollup.items():
            assert key[0] % size == 0  # UTC hour / day starts
            assert list(row[:6]) == expected[key][:6]  # token for token
            assert round(row[6] * 1_000_000) == expected[key][6]  # to the micro-dollar
            assert round(row[6], 2) == round(expected[key][6] / 1_000_000, 2)  # cent for cent


one_stream_st = st.lists(  # one tenant, key, model and provider within one hour
    st.builds(
        rec,
        at=st.floats(T0, T0 + HOUR, exclude_max=True),
        request_id=st.text("abc", min_size=1, max_size=3),
        endpoint=st.sampled_from(["chat", "chat", "messages"]),
        upstream_model=st.sampled_from(["m1", "m1", "m2"]),
        attempts=st.sampled_from([1, 1, 2]),
        prompt_tokens=st.integers(0, 10**6),
        cached_tokens=st.sampled_from([0, 0, 7]),
        cost_usd=st.integers(0, 10**7).map(lambda micro: micro / 1_000_000),
        status=st.sampled_from([200, 200, 499]),
        outcome=st.sampled_from(["ok", "ok", "error"]),
        stream=st.booleans(),
        ttfb_ms=st.sampled_from([None, None, 2.5]),
    ),
    min_size=1,
    max_size=140,
)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(records=one_stream_st)
def test_values_rows_share_are_stored_as_every_row_has_them(records: list[UsageRecord]) -> None:
    # The SQLite writer binds a value every row of a statement has once (?N), cuts a batch
    # into statements of 64, 32, ... 1 rows, and sums a one-bucket batch per column: the
    # rows and the rollup are what each record says.
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    conn.execute("BEGIN")
    assert store_ledger_sql.write(conn, records) == []
    conn.execute("COMMIT")
    got = conn.execute(f"SELECT {store_ledger_sql._RAW_COLUMNS} FROM usage ORDER BY rowid")
    assert [tuple(row) for row in got] == [
        (*r[:16], int(r.stream), int(r.estimated), *r[18:]) for r in records
    ]
    rollup = conn.execute(f"SELECT {', '.join(SUMS)}, reasoning_tokens, cost_usd FROM usage_hourly")
    assert [tuple(row) for row in rollup] == [
        (
            len(records),
            sum(r.outcome == "error" for r in records),
            sum(r.prompt_tokens for r in records),
            sum(r.completion_tokens for r in records),
            sum(r.cached_tokens for r in records),
            sum(r.reasoning_tokens for r in records),
            sum((r.cost_usd for r in records), 0.0),
        )
    ]


# --- schema ------------------------------------------------------------------------------------


async def test_a_version_4_database_is_migrated_and_keeps_its_jobs(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in (1, 2, 3, 4):
        for statement in store_schema._MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute(
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES ('job_v4', 'a', 'req_a', 'chat', x'7b7d', 'queued',"
        " ?, ?, ?)",
        (T0, T0, T0),
    )
    conn.commit()
    conn.close()
    store = make_store(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        job = await store.get("job_v4", "a")
        store.record(rec())
        await store.sync_ledger()
        versions = await store._call(
            lambda c: [v for (v,) in c.execute("SELECT version FROM schema_version")]
        )
        nursery.cancel_scope.cancel()
    assert versions == list(range(1, SCHEMA_VERSION + 1)) == [1, 2, 3, 4, 5, 6, 7]
    assert job is not None
    assert [count(store.path, t) for t in ("usage", "usage_hourly", "usage_daily")] == [1, 1, 1]


# --- retention ---------------------------------------------------------------------------------


async def test_each_table_is_swept_after_its_retention(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    clock = Clock()
    store = make_store(tmp_path, clock, retention_days=1, hourly_retention_days=3,
                       daily_retention_days=10)  # fmt: skip
    await nursery.start(store.run)
    store.record(rec(T0))
    await store.sync_ledger()
    raw_due = T0 + DAY + store_ledger_sql.RAW_SWEEP_SLACK_S
    assert store._sweep_at == raw_due  # the first record rang the sweeper
    tables = ("usage", "usage_hourly", "usage_daily")

    async def sweep_at(now: float) -> tuple[list[int], float | None]:
        clock.now = now
        _, next_at = await store.sweep(now)
        return [count(store.path, t) for t in tables], next_at

    day_start = T0 - 8 * HOUR
    assert await sweep_at(T0 + 1) == ([1, 1, 1], raw_due)
    assert await sweep_at(raw_due) == ([0, 1, 1], T0 + 3 * DAY)
    assert await sweep_at(T0 + 3 * DAY) == ([0, 0, 1], day_start + 10 * DAY)
    assert await sweep_at(day_start + 10 * DAY) == ([0, 0, 0], None)


async def test_a_big_sweep_is_cut_into_batches(
    tmp_path: Path, nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(store_ledger_sql, "SWEEP_BATCH", 10)
    store = make_store(tmp_path, retention_days=1)
    await nursery.start(store.run)
    for i in range(25):
        store.record(rec(T0 + i))
    await store.sync_ledger()
    now = T0 + 2 * DAY
    passes = []
    while True:
        deleted, next_at = await store.sweep(now)
        passes.append(deleted)
        if next_at != now:
            break
    assert passes == [10, 10, 5]
    assert count(store.path, "usage") == 0


# --- the pending buffer ------------------------------------------------------------------------


async def test_the_buffer_is_bounded_and_drops_the_oldest(
    tmp_path: Path, events: list[tuple[str, dict[str, Any]]]
) -> None:
    store = make_store(tmp_path)
    store._ledger.max_pending = 5
    for i in range(12):  # the store is not open yet: nothing can be written
        store.record(rec(T0 + i, request_id=f"req_{i}"))
    assert (store.stats.ledger_recorded, store.stats.ledger_dropped, len(store._ledger)) == (
        12,
        7,
        5,
    )
    assert events.count(("ledger.dropped", {"count": 1, "reason": "buffer_full"})) == 7
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)  # what is pending is written once the store opens
        await store.sync_ledger()
        nursery.cancel_scope.cancel()
    conn = sqlite3.connect(store.path)
    ids = [i for (i,) in conn.execute("SELECT request_id FROM usage ORDER BY at")]
    conn.close()
    assert ids == [f"req_{i}" for i in range(7, 12)]


async def test_pending_records_are_written_on_shutdown(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        for i in range(5000):
            store.record(rec(T0 + i))
        nursery.cancel_scope.cancel()  # before the writer has had a turn
    assert not store.is_open
    assert store.stats.ledger_written == 5000
    assert count(store.path, "usage") == 5000


# --- reading -----------------------------------------------------------------------------------


@pytest.fixture
async def filled(store: Store) -> Store:
    for r in (
        rec(T0 + 10, tenant="a", key_id="k1", model="fast", cost_usd=0.5),
        rec(T0 + 20, tenant="a", key_id="k2", model="smart", cost_usd=1.0, outcome="error"),
        rec(T0 + HOUR + 5, tenant="a", key_id="k1", model="fast", cost_usd=0.25),
        rec(T0 + DAY + 5, tenant="b", key_id="k3", model="fast", cost_usd=2.0),
    ):
        store.record(r)
    await store.sync_ledger()
    return store


async def test_usage_totals_group_by_and_granularity(filled: Store) -> None:
    everything = await filled.usage_totals(since=T0 - DAY, until=T0 + 2 * DAY, group_by=())
    assert len(everything) == 1
    assert everything[0]["requests"] == 4
    assert everything[0]["errors"] == 1
    assert everything[0]["cost_usd"] == pytest.approx(3.75)
    by_tenant = await filled.usage_totals(
        since=T0 - DAY, until=T0 + 2 * DAY, group_by=["tenant"], granularity="day"
    )
    day = store_ledger_sql.bucket_start(T0, DAY)
    assert [(r["bucket_start"], r["tenant"], r["requests"]) for r in by_tenant] == [
        (day, "a", 3),
        (day + DAY, "b", 1),
    ]
    hourly = await filled.usage_totals(
        since=T0, until=T0 + 2 * HOUR, group_by=["model", "key_id"], granularity="hour",
        tenant="a",
    )  # fmt: skip
    assert [(r["bucket_start"], r["key_id"], r["model"], r["requests"]) for r in hourly] == [
        (T0, "k1", "fast", 1),
        (T0, "k2", "smart", 1),
        (T0 + HOUR, "k1", "fast", 1),
    ]
    assert set(hourly[0]) == {"bucket_start", "key_id", "model", *SUMS, "reasoning_tokens",
                              "cost_usd"}  # fmt: skip
    assert await filled.usage_totals(since=T0 + 9 * DAY, until=T0 + 10 * DAY, group_by=()) == []
    with pytest.raises(InvalidParam, match="endpoint"):
        await filled.usage_totals(since=T0, until=T0 + DAY, group_by=["endpoint"])


async def test_spend_is_exact_from_any_time(filled: Store) -> None:
    assert await filled.spend("a", None, T0) == (pytest.approx(1.75), 45)
    assert await filled.spend("a", "k1", T0) == (pytest.approx(0.75), 30)
    # not on the hour: the raw records before the boundary, then the hourly rollup
    assert await filled.spend("a", None, T0 + 15) == (pytest.approx(1.25), 30)
    assert await filled.spend("a", None, T0 + HOUR + 6) == (0.0, 0)
    assert await filled.spend("nobody", None, T0) == (0.0, 0)


def test_the_ledger_section_is_validated_and_documented() -> None:
    with pytest.raises(ConfigError, match=r"ledger\.hourly_retention_days"):
        config_module.structure({"ledger": {"hourly_retention_days": 0}}, "t.toml")
    shipped = config_module.load(Path(__file__).parents[2] / "config.toml", {})
    assert shipped.ledger == LedgerConfig() == LedgerConfig(True, 30, 400, 1830, 1.0)


async def test_a_record_waits_for_the_flush_interval_not_a_commit_of_its_own(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """One record alone rings nobody: the flush timer writes it (one commit per interval,
    not per request)."""
    store = make_store(tmp_path)
    store.ledger_config = LedgerConfig(flush_interval_s=0.05)
    await nursery.start(store.run)
    store.record(rec())
    assert store.stats.ledger_written == 0  # not rung: waiting for the timer
    with trio.fail_after(5):
        while store.stats.ledger_written < 1:
            await trio.sleep(0.01)  # the writer's thread commits; no event to await here
    assert count(store.path, "usage") == 1
