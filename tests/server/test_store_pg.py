"""The store on PostgreSQL: what only it has (placeholders, migrations under a lock, a lock
timeout, a lost connection) and what several gateways on one database must get right:
no job claimed twice, the per-tenant cap and Idempotency-Keys exact across them, each
webhook handed to one of them.

Test rules: a real server per session (``conftest.pg``), a fresh database per test; several
stores on one database stand for several gateways; time is passed in explicitly.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
import trio
from pg_server import PgServer
from store_db_helpers import StoreDb

from runestone_proxy.config import Config, OverflowConfig, TenantConfig
from runestone_proxy.errors import RateLimited, ServiceUnavailable
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.gateway.overflow import JobStatus, NewJob, WebhookStatus
from runestone_proxy.server import store_pg_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_pg import PgBackend, translate

BODY = b'{"model":"mock-1","messages":[{"role":"user","content":"hi"}]}'
RESULT = b'{"id":"chatcmpl-1"}'
T0 = 1_000_000.0


def new(tenant: str = "a", **kw: object) -> NewJob:
    return NewJob(tenant, f"req_{tenant}", "chat", BODY, **kw)  # type: ignore[arg-type]


@pytest.fixture
def pgdb(pg: PgServer) -> StoreDb:
    return StoreDb("postgres", pg.directory, pg.create_database())


def make(pgdb: StoreDb, **overflow: object) -> Store:
    config = Config(
        overflow=pgdb.overflow(**overflow),
        tenants={"capped": TenantConfig(max_queued_jobs=5)},
    )
    return Store.from_config(config, env={})


@pytest.fixture
async def fleet(pgdb: StoreDb, nursery: trio.Nursery) -> AsyncIterator[list[Store]]:
    """Three stores on one database: three gateways."""
    stores = [make(pgdb) for _ in range(3)]
    for store in stores:
        await nursery.start(store.run)
    return stores


def test_placeholders_are_translated_outside_quoted_text() -> None:
    assert translate("SELECT * FROM t WHERE a = ? AND b = :now") == (
        "SELECT * FROM t WHERE a = %s AND b = %(now)s"
    )
    assert translate("SELECT 'a:b ? 100%' || x FROM t WHERE y LIKE ?") == (
        "SELECT 'a:b ? 100%' || x FROM t WHERE y LIKE %s"
    )
    assert translate("SELECT 5 % 2") == "SELECT 5 %% 2"


async def test_opens_at_the_schema_version_with_a_durable_commit(pgdb: StoreDb) -> None:
    store = make(pgdb)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        assert await store._call(lambda c: c.execute("SHOW synchronous_commit").fetchone()[0]) == (
            "on"
        )
        nursery.cancel_scope.cancel()
    versions = [r["version"] for r in pgdb.rows("SELECT version FROM schema_version")]
    assert versions == list(range(1, store_pg_schema.SCHEMA_VERSION + 1))


def test_gateways_starting_together_migrate_once(pgdb: StoreDb) -> None:
    assert pgdb.url is not None
    backend = PgBackend(pgdb.url)
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def connect() -> None:
        start.wait()
        try:
            backend.connect().close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=connect) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert pgdb.count("schema_version") == store_pg_schema.SCHEMA_VERSION


async def test_an_unreachable_server_is_a_503_naming_it_without_the_password(
    pg: PgServer,
) -> None:
    with trio.socket.socket() as s:  # a port nothing listens on
        await s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql://runestone:hunter2@127.0.0.1:{port}/nope?connect_timeout=2"
    store = Store.from_config(Config(overflow=OverflowConfig(backend="postgres", url=url)), {})
    with pytest.raises(ServiceUnavailable, match=rf"127\.0\.0\.1:{port}/nope") as info:
        await store.run()
    assert "hunter2" not in info.value.message


async def test_a_lock_held_too_long_is_a_503_and_the_store_recovers(
    pgdb: StoreDb, nursery: trio.Nursery
) -> None:
    store = make(pgdb)
    await nursery.start(store.run)
    await store._call(lambda c: c.execute("SET lock_timeout = 50"))
    assert pgdb.url is not None
    with psycopg.connect(pgdb.url) as other:  # a transaction: the lock is held until exit
        other.execute("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(ServiceUnavailable, match="lock") as info:
            await store.enqueue(new(), now=T0)
        assert info.value.http_status == 503
    assert (await store.enqueue(new(), now=T0)).created


async def test_a_lost_connection_is_a_503_then_a_new_one(
    pgdb: StoreDb, nursery: trio.Nursery
) -> None:
    store = make(pgdb)
    await nursery.start(store.run)
    await store.enqueue(new(), now=T0)
    pgdb.rows(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
        " WHERE datname = current_database() AND pid <> pg_backend_pid()"
    )
    with pytest.raises(ServiceUnavailable):
        await store.counts()
    assert await store.counts() == {"queued": 1}  # reconnected
    assert (await store.enqueue(new(), now=T0)).created


# --- several gateways on one database ---------------------------------------------------------


async def test_no_job_is_claimed_twice_across_gateways(fleet: list[Store]) -> None:
    total = 60
    for i in range(total):
        await fleet[i % 3].enqueue(new(f"t{i % 4}"), now=T0)
    claimed: list[str] = []

    async def drain(store: Store) -> None:
        while job := await store.claim([f"t{i}" for i in range(4)], 60, T0):
            claimed.append(job.id)

    async with trio.open_nursery() as nursery:
        for store in fleet:
            nursery.start_soon(drain, store)
    assert len(claimed) == total
    assert len(set(claimed)) == total
    assert await fleet[0].counts() == {"running": total}


async def test_the_per_tenant_cap_is_exact_across_gateways(fleet: list[Store]) -> None:
    outcomes: Counter[str] = Counter()

    async def one(store: Store) -> None:
        try:
            await store.enqueue(new("capped"), now=T0)
            outcomes["created"] += 1
        except RateLimited:
            outcomes["refused"] += 1

    async with trio.open_nursery() as nursery:
        for i in range(30):
            nursery.start_soon(one, fleet[i % 3])
    assert outcomes == {"created": 5, "refused": 25}
    assert await fleet[1].counts() == {"queued": 5}


async def test_an_idempotency_key_makes_one_job_across_gateways(fleet: list[Store]) -> None:
    ids: list[str] = []

    async def one(store: Store) -> None:
        ids.append((await store.enqueue(new("a", idempotency_key="once"), now=T0)).job.id)

    async with trio.open_nursery() as nursery:
        for i in range(12):
            nursery.start_soon(one, fleet[i % 3])
    assert len(ids) == 12
    assert len(set(ids)) == 1


async def test_each_webhook_goes_to_one_gateway_until_its_lease_ends(fleet: list[Store]) -> None:
    for i in range(10):
        await fleet[0].enqueue(new(f"t{i}", webhook_url="http://127.0.0.1:9/hook"), now=T0)
    for i in range(10):
        job = await fleet[0].claim([f"t{i}"], 60, T0)
        assert job is not None
        assert job.lease_token is not None
        assert await fleet[0].complete(job.id, job.lease_token, RESULT, 200, T0)
    taken: list[str] = []

    async def take(store: Store) -> None:
        due, _ = await store.due_webhooks(T0 + 1, 4)
        taken.extend(j.id for j in due)

    for _ in range(2):
        async with trio.open_nursery() as nursery:
            for store in fleet:
                nursery.start_soon(take, store)
    assert len(taken) == 10
    assert len(set(taken)) == 10
    # Nobody records an outcome (the gateways died): after the lease, due again.
    lease = fleet[0].config.webhook_timeout_s + 30
    assert await fleet[1].due_webhooks(T0 + 2, 20) == ([], T0 + 1 + lease)
    again, _ = await fleet[2].due_webhooks(T0 + 1 + lease, 20)
    assert len(again) == 10
    await fleet[2].webhook_attempted(again[0].id, WebhookStatus.DELIVERED, None)
    done = await fleet[0].get(again[0].id, again[0].tenant)
    assert done is not None
    assert (done.status, done.webhook_status) == (JobStatus.SUCCEEDED, WebhookStatus.DELIVERED)


async def test_a_stale_gateway_cannot_settle_a_job_another_claimed(fleet: list[Store]) -> None:
    await fleet[0].enqueue(new("a"), now=T0)
    first = await fleet[0].claim(["a"], 10, T0)
    assert first is not None
    assert first.lease_token is not None
    second = await fleet[1].claim(["a"], 10, T0 + 11)  # the first gateway's lease ran out
    assert second is not None
    assert second.lease_token is not None
    results = await _concurrently(
        lambda: fleet[0].complete(first.id, first.lease_token or "", b'{"stale":1}', 200, T0 + 12),
        lambda: fleet[1].complete(second.id, second.lease_token or "", RESULT, 200, T0 + 12),
    )
    assert results == [False, True]
    done = await fleet[2].get(first.id, "a")
    assert done is not None
    assert done.result == RESULT


async def _concurrently(*calls: Callable[[], object]) -> list[object]:
    results: list[object] = [None] * len(calls)

    async def one(i: int) -> None:
        results[i] = await calls[i]()  # type: ignore[misc]

    async with trio.open_nursery() as nursery:
        for i in range(len(calls)):
            nursery.start_soon(one, i)
    return results


async def test_the_ledger_and_its_rollups_are_written_across_gateways(
    fleet: list[Store], pgdb: StoreDb
) -> None:
    """Two gateways' records in one hour add up in one rollup row (the upsert's old value
    named by its table: PostgreSQL refuses a bare column there as ambiguous)."""
    hour = 1_800_000_000.0  # on the hour

    def record(at: float, tokens: int) -> UsageRecord:
        return UsageRecord(
            at, "req_1", "a", "k1", "chat", "fast", "openai", "gpt-4o-mini", 1,
            tokens, 1, 0, 0, 0.25, 200, "ok", False, False, 12.5,
        )  # fmt: skip

    with trio.fail_after(10):
        for i, store in enumerate(fleet[:2]):
            store.record(record(hour + 10 + i, 10 * (i + 1)))
            store.record(record(hour + 20 + i, 100))
            await store.sync_ledger()
    assert fleet[0].stats.ledger_written + fleet[1].stats.ledger_written == 4
    assert fleet[0].stats.ledger_dropped + fleet[1].stats.ledger_dropped == 0
    for table in ("usage_hourly", "usage_daily"):
        rows = pgdb.rows(f"SELECT requests, prompt_tokens, cost_usd FROM {table}")
        assert rows == [{"requests": 4, "prompt_tokens": 230, "cost_usd": 1.0}]
    assert pgdb.count("usage") == 4
