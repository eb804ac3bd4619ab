"""The durable store: durability settings, group commit, claims and fairness, lease fencing,
recovery, idempotency, the per-tenant cap, redaction, webhooks state, sweeping, error mapping.

Test rules: a test that takes ``db`` runs on both backends (SQLite in ``tmp_path``, a fresh
PostgreSQL database: ``conftest.py``); the rest are SQLite's own (file, pragmas, its
migrations). The store runs on its real worker thread (``inline=False``) unless a test says
otherwise; time is passed in explicitly (``now=``), so nothing sleeps.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from store_db_helpers import StoreDb

from runestone_proxy.config import Config, OverflowConfig, TenantConfig
from runestone_proxy.errors import GatewayError, RateLimited, ServiceUnavailable
from runestone_proxy.gateway.overflow import JobStatus, NewJob, WebhookStatus, digest
from runestone_proxy.server import store_schema
from runestone_proxy.server.store import Store, resolve_path
from runestone_proxy.server.store_schema import SCHEMA_VERSION

BODY = b'{"model":"mock-1","messages":[{"role":"user","content":"a secret prompt"}]}'
RESULT = b'{"id":"chatcmpl-1","choices":[{"message":{"content":"a secret answer"}}]}'
ERROR = b'{"error":{"message":"upstream broke","type":"server_error","param":null,"code":"x"}}'
T0 = 1_000_000.0


def new(tenant: str = "a", **kw: object) -> NewJob:
    return NewJob(tenant, f"req_{tenant}", "chat", BODY, **kw)  # type: ignore[arg-type]


def make_store(where: Path | StoreDb, **overflow: Any) -> Store:
    """A store on ``where``: an SQLite file under that directory, or the test's database."""
    if isinstance(where, StoreDb):
        overflow_config = where.overflow(**overflow)
    else:
        overflow_config = OverflowConfig(database=str(where / "jobs.sqlite3"), **overflow)
    config = Config(overflow=overflow_config, tenants={"small": TenantConfig(max_queued_jobs=2)})
    return Store.from_config(config, env={})


@pytest.fixture
async def store(db: StoreDb, nursery: trio.Nursery) -> AsyncIterator[Store]:
    s = make_store(db)
    await nursery.start(s.run)
    return s


@pytest.fixture
async def sqlite_store(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Store]:
    s = make_store(tmp_path)
    await nursery.start(s.run)
    return s


def raw_rows(db: StoreDb) -> list[dict[str, Any]]:
    return db.rows("SELECT * FROM jobs")


# --- opening ----------------------------------------------------------------------------------


async def test_opens_in_wal_with_full_sync_and_a_schema_version(sqlite_store: Store) -> None:
    store = sqlite_store
    assert await store._call(lambda c: c.execute("PRAGMA journal_mode").fetchone()[0]) == "wal"
    assert await store._call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    version = await store._call(
        lambda c: c.execute("SELECT version FROM schema_version").fetchall()
    )
    assert [tuple(v) for v in version] == [(v,) for v in range(1, SCHEMA_VERSION + 1)]


async def test_reopening_keeps_jobs_and_a_newer_schema_is_refused(db: StoreDb) -> None:
    first = make_store(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await first.enqueue(new(), now=T0)
        nursery.cancel_scope.cancel()
    assert not first.is_open
    second = make_store(db)
    async with trio.open_nursery() as nursery:
        await nursery.start(second.run)
        assert await second.counts() == {"queued": 1}
        nursery.cancel_scope.cancel()
    db.rows("INSERT INTO schema_version VALUES (99)")
    with pytest.raises(ServiceUnavailable, match="newer"):
        await make_store(db).run()


async def test_an_unopenable_path_is_a_503_naming_it(tmp_path: Path) -> None:
    (tmp_path / "jobs.sqlite3").mkdir()
    with pytest.raises(ServiceUnavailable, match=r"jobs\.sqlite3"):
        await make_store(tmp_path).run()
    with pytest.raises(ServiceUnavailable):
        await make_store(tmp_path).enqueue(new())


def test_relative_paths_live_in_the_state_directory(tmp_path: Path) -> None:
    assert resolve_path("q.db", {"RUNESTONE_STATE_DIR": str(tmp_path)}) == tmp_path / "q.db"
    assert resolve_path("/abs/q.db", {"RUNESTONE_STATE_DIR": str(tmp_path)}) == Path("/abs/q.db")
    assert resolve_path("q.db", {}) == Path.cwd() / "q.db"


# --- enqueue and group commit -----------------------------------------------------------------


async def test_enqueue_commits_and_get_is_per_tenant(store: Store) -> None:
    enqueued = await store.enqueue(new("a"), now=T0)
    assert enqueued.created
    assert enqueued.queue_depth == 1
    job = enqueued.job
    assert (job.status, job.attempts, job.created_at) == (JobStatus.QUEUED, 0, T0)
    assert await store.get(job.id, "a") == job
    assert await store.get(job.id, "b") is None
    assert await store.get("job_nope", "a") is None
    assert store.stats.enqueue_batches == 1  # one caller: committed at once, alone


async def test_concurrent_enqueues_share_transactions(store: Store) -> None:
    count = 200
    ids: list[str] = []

    async def one(i: int) -> None:
        ids.append((await store.enqueue(new(f"t{i % 5}"), now=T0)).job.id)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(one, i)
    assert len(set(ids)) == count
    assert await store.counts() == {"queued": count}
    assert store.stats.enqueued == count
    assert store.stats.enqueue_batches < count / 4  # grouped, not one fsync per job
    assert store.stats.transactions == store.stats.enqueue_batches


async def test_a_failed_batch_fails_every_caller_and_writes_nothing(store: Store) -> None:
    job = new("a")
    await store.enqueue(job, now=T0)
    results: list[object] = []

    async def dup() -> None:  # the same primary key: the whole group rolls back
        try:
            results.append(await store.enqueue(attrs.evolve(job, request_id="again"), now=T0))
        except ServiceUnavailable as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(dup)
    assert all(isinstance(r, ServiceUnavailable) for r in results)
    assert await store.counts() == {"queued": 1}
    assert (await store.enqueue(new("a"), now=T0)).created  # and the store carries on


async def test_database_is_locked_maps_to_503_and_the_store_recovers(sqlite_store: Store) -> None:
    store = sqlite_store
    await store._call(lambda c: c.execute("PRAGMA busy_timeout=50"))
    other = sqlite3.connect(store.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(ServiceUnavailable, match="locked") as info:
            await store.enqueue(new(), now=T0)
        assert info.value.http_status == 503
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert (await store.enqueue(new(), now=T0)).created


# --- idempotency and the cap ------------------------------------------------------------------


async def test_an_idempotency_key_returns_the_same_job_within_the_window(store: Store) -> None:
    first = await store.enqueue(new("a", idempotency_key="k1"), now=T0)
    again = await store.enqueue(new("a", idempotency_key="k1"), now=T0 + 10)
    assert first.created
    assert not again.created
    assert again.job.id == first.job.id
    other_tenant = await store.enqueue(new("b", idempotency_key="k1"), now=T0 + 10)
    assert other_tenant.created
    assert other_tenant.job.id != first.job.id
    later = T0 + store.config.idempotency_window_s + 1
    fresh = await store.enqueue(new("a", idempotency_key="k1"), now=later)
    assert fresh.created
    assert fresh.job.id != first.job.id
    assert (await store.get(first.job.id, "a")).idempotency_key is None  # type: ignore[union-attr]


async def test_the_same_key_twice_in_one_group_makes_one_job(store: Store) -> None:
    jobs = []

    async def one() -> None:
        jobs.append(await store.enqueue(new("a", idempotency_key="same"), now=T0))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert len({e.job.id for e in jobs}) == 1
    assert sum(e.created for e in jobs) == 1


async def test_the_per_tenant_cap_answers_429(store: Store) -> None:
    await store.enqueue(new("small"), now=T0)
    await store.enqueue(new("small"), now=T0)
    with pytest.raises(RateLimited) as info:
        await store.enqueue(new("small"), now=T0)
    assert info.value.http_status == 429
    assert info.value.code == "too_many_queued_jobs"
    assert (await store.enqueue(new("other"), now=T0)).created  # other tenants unaffected
    job = await store.claim(["small"], 60, T0)
    assert job is not None
    await store.complete(job.id, job.lease_token or "", RESULT, 200, T0)
    assert (await store.enqueue(new("small"), now=T0)).created  # a finished job frees room


# --- claims, fencing, recovery ----------------------------------------------------------------


async def test_claim_leases_the_oldest_due_job(store: Store) -> None:
    older = (await store.enqueue(new("a"), now=T0)).job
    await store.enqueue(new("a"), now=T0 + 1)
    assert await store.claim(["b"], 60, T0 + 2) is None  # not a candidate with jobs
    job = await store.claim(["a", "b"], 60, T0 + 2)
    assert job is not None
    assert job.id == older.id
    assert (job.status, job.attempts, job.lease_expires_at) == (JobStatus.RUNNING, 1, T0 + 62)
    assert job.lease_token
    assert len(job.lease_token) == 32


async def test_claims_go_round_robin_across_tenants(store: Store) -> None:
    for i in range(4):
        await store.enqueue(new("a"), now=T0 + i)
    for i in range(2):
        await store.enqueue(new("b"), now=T0 + 10 + i)
    await store.enqueue(new("c"), now=T0 + 20)
    order = []
    while job := await store.claim(["a", "b", "c"], 60, T0 + 30):
        order.append(job.tenant)
    assert order == ["a", "b", "c", "a", "b", "a", "a"]


async def test_schedule_reports_due_jobs_and_the_next_deadline(store: Store) -> None:
    await store.enqueue(new("a"), now=T0)
    await store.enqueue(new("b"), now=T0)
    job = await store.claim(["a"], 60, T0)
    assert job is not None
    assert job.lease_token is not None
    assert await store.fail(job.id, job.lease_token, ERROR, 502, T0 + 30, T0)
    schedule = await store.schedule(T0)
    assert dict(schedule.due) == {"b": 1}
    assert schedule.next_at == T0 + 30
    assert schedule.depth == 1
    assert dict((await store.schedule(T0 + 30)).due) == {"a": 1, "b": 1}
    retried = await store.get(job.id, "a")
    assert retried is not None
    assert retried.body == BODY
    assert retried.attempts == 1
    assert retried.last_error == "upstream broke"


async def test_a_stale_run_cannot_settle_the_job(store: Store, db: StoreDb) -> None:
    await store.enqueue(new("a"), now=T0)
    first = await store.claim(["a"], 10, T0)
    assert first is not None
    assert first.lease_token is not None
    assert await store.claim(["a"], 10, T0 + 5) is None  # the lease still holds
    second = await store.claim(["a"], 10, T0 + 11)  # expired: claimed again, new token
    assert second is not None
    assert second.lease_token is not None
    assert second.id == first.id
    assert second.attempts == 2
    assert second.lease_token != first.lease_token
    assert not await store.complete(first.id, first.lease_token, b'{"stale":1}', 200, T0 + 12)
    assert not await store.fail(first.id, first.lease_token, ERROR, 500, None, T0 + 12)
    assert not await store.release(first.id, first.lease_token, T0 + 12)
    assert await store.complete(second.id, second.lease_token, RESULT, 200, T0 + 13)
    assert not await store.complete(second.id, second.lease_token, b'{"twice":1}', 200, T0 + 14)
    done = await store.get(first.id, "a")
    assert done is not None
    assert done.status is JobStatus.SUCCEEDED
    assert done.result == RESULT
    assert done.lease_token is None
    assert done.finished_at == T0 + 13
    assert [r["result"] for r in raw_rows(db)] == [RESULT]  # exactly one stored result


async def test_recover_requeues_only_expired_leases(store: Store) -> None:
    for tenant in ("a", "b"):
        await store.enqueue(new(tenant), now=T0)
    short = await store.claim(["a"], 10, T0)
    await store.claim(["b"], 1000, T0)
    assert short is not None
    assert await store.recover(T0 + 5) == 0
    assert await store.recover(T0 + 10) == 1
    back = await store.get(short.id, "a")
    assert back is not None
    assert back.status is JobStatus.QUEUED
    assert (back.lease_token, back.next_attempt_at, back.attempts) == (None, T0 + 10, 1)
    assert await store.counts() == {"queued": 1, "running": 1}


async def test_release_returns_the_job_without_counting_the_attempt(store: Store) -> None:
    await store.enqueue(new("a"), now=T0)
    job = await store.claim(["a"], 60, T0)
    assert job is not None
    assert job.lease_token is not None
    assert await store.release(job.id, job.lease_token, T0 + 1)
    back = await store.get(job.id, "a")
    assert back is not None
    assert (back.status, back.attempts) == (JobStatus.QUEUED, 0)


# --- redaction, webhooks, retention -----------------------------------------------------------


async def test_a_finished_job_keeps_only_a_digest_of_its_request(store: Store, db: StoreDb) -> None:
    await store.enqueue(new("a"), now=T0)
    await store.enqueue(new("b"), now=T0)
    for tenant, ok in (("a", True), ("b", False)):
        job = await store.claim([tenant], 60, T0)
        assert job is not None
        assert job.lease_token is not None
        if ok:
            assert await store.complete(job.id, job.lease_token, RESULT, 200, T0 + 1)
        else:
            assert await store.fail(job.id, job.lease_token, ERROR, 400, None, T0 + 1)
    rows = {r["tenant"]: r for r in raw_rows(db)}
    for row in rows.values():
        assert row["body"] == digest(BODY)
        assert b"secret prompt" not in row["body"]
    assert rows["b"]["status"] == "failed"
    assert rows["b"]["result"] == ERROR
    assert (rows["b"]["result_status"], rows["b"]["last_error"]) == (400, "upstream broke")


async def test_webhook_state_follows_the_job(store: Store) -> None:
    url = "http://127.0.0.1:1/hook"
    await store.enqueue(new("a", webhook_url=url), now=T0)
    await store.enqueue(new("b"), now=T0)
    for tenant in ("a", "b"):
        job = await store.claim([tenant], 60, T0)
        assert job is not None
        assert job.lease_token is not None
        assert job.webhook_status is WebhookStatus.NONE
        await store.complete(job.id, job.lease_token, RESULT, 200, T0 + 1)
    due, later = await store.due_webhooks(T0 + 1, 10)
    assert [j.tenant for j in due] == ["a"]
    assert later is None
    assert due[0].webhook_status is WebhookStatus.PENDING
    await store.webhook_attempted(due[0].id, WebhookStatus.PENDING, T0 + 5)
    assert await store.due_webhooks(T0 + 2, 10) == ([], T0 + 5)
    due, _ = await store.due_webhooks(T0 + 5, 10)
    assert due[0].webhook_attempts == 1
    await store.webhook_attempted(due[0].id, WebhookStatus.DELIVERED, None)
    assert await store.due_webhooks(T0 + 100, 10) == ([], None)
    delivered = await store.get(due[0].id, "a")
    assert delivered is not None
    assert delivered.webhook_status is WebhookStatus.DELIVERED


async def test_sweep_deletes_after_retention_but_not_before_the_webhook(db: StoreDb) -> None:
    store = make_store(db, retention_s=100.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        await store.enqueue(new("a"), now=T0)
        await store.enqueue(new("b", webhook_url="http://127.0.0.1:1/"), now=T0)
        await store.enqueue(new("c"), now=T0)  # never finishes: never swept
        for tenant in ("a", "b"):
            job = await store.claim([tenant], 60, T0)
            assert job is not None
            assert job.lease_token is not None
            await store.complete(job.id, job.lease_token, RESULT, 200, T0 + 10)
        assert await store.sweep(T0 + 50) == (0, T0 + 110)
        assert await store.sweep(T0 + 110) == (1, None)  # b waits for its webhook
        assert await store.counts() == {"succeeded": 1, "queued": 1}
        (hook,), _ = await store.due_webhooks(T0 + 110, 10)
        await store.webhook_attempted(hook.id, WebhookStatus.FAILED, None)
        assert await store.sweep(T0 + 111) == (1, None)
        assert await store.counts() == {"queued": 1}
        nursery.cancel_scope.cancel()


async def test_inline_mode_runs_on_the_loop_thread(tmp_path: Path) -> None:
    store = Store.from_config(
        Config(overflow=OverflowConfig(database=str(tmp_path / "i.db"))), env={}, inline=True
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        job = (await store.enqueue(new(), now=T0)).job
        assert json.loads((await store.get(job.id, "a")).body)["model"] == "mock-1"  # type: ignore[union-attr]
        nursery.cancel_scope.cancel()


# --- hostile text, claims without an outcome, dead jobs ------------------------------------------


async def test_a_version_1_database_is_migrated_and_its_jobs_kept(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in store_schema._MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    conn.execute(  # as version 1 wrote a job (the current insert names later columns)
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES ('job_v1', 'a', 'req_a', 'chat', ?, 'queued', ?, ?, ?)",
        (BODY, T0, T0, T0),
    )
    conn.commit()
    conn.close()
    store = make_store(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        job = await store.claim(["a"], 60, T0)
        nursery.cancel_scope.cancel()
    assert job is not None
    assert (job.attempts, job.claims) == (1, 1)


async def test_claims_count_until_an_outcome_is_recorded_then_the_job_is_buried(
    db: StoreDb, nursery: trio.Nursery
) -> None:
    store = make_store(db, max_claims=2)
    await nursery.start(store.run)
    hook = "http://127.0.0.1:9/hook"
    retried = (await store.enqueue(new("a"), now=T0)).job
    doomed = (await store.enqueue(new("b", webhook_url=hook), now=T0)).job
    first = await store.claim(["a"], 10, T0)
    assert first is not None
    assert first.id == retried.id
    assert first.lease_token is not None
    assert await store.fail(first.id, first.lease_token, ERROR, 500, T0 + 1, T0)  # recorded
    again = await store.claim(["a"], 10, T0 + 1)
    assert again is not None
    assert (again.attempts, again.claims) == (2, 1)  # the recorded retry reset the count
    assert again.lease_token is not None
    assert await store.release(again.id, again.lease_token, T0 + 2)  # given back
    back = await store.get(again.id, "a")
    assert back is not None
    assert (back.attempts, back.claims) == (1, 0)
    for at in (T0, T0 + 11):  # two claims, no outcome: the lease just expires
        claimed = await store.claim(["b"], 10, at)
        assert claimed is not None
        assert claimed.id == doomed.id
    assert await store.claim(["b"], 10, T0 + 22) is None  # buried, not claimed a third time
    dead = await store.get(doomed.id, "b")
    assert dead is not None
    assert (dead.status, dead.claims, dead.attempts) == (JobStatus.DEAD, 2, 2)
    assert (dead.result_status, dead.finished_at, dead.lease_token) == (500, T0 + 22, None)
    assert json.loads(dead.result or b"")["error"]["code"] == "job_dead"
    assert dead.body == digest(BODY)  # redacted like any finished job
    assert (dead.webhook_status, dead.webhook_next_at) == (WebhookStatus.PENDING, T0 + 22)
    assert store.stats.dead == 1
    assert await store.counts() == {"queued": 1, "dead": 1}


async def test_text_that_is_not_utf8_is_stored_and_read_back_escaped(sqlite_store: Store) -> None:
    store = sqlite_store
    job = (await store.enqueue(NewJob("a", "req-\ud800", "chat", BODY), now=T0)).job
    assert job.request_id == "req-\\ud800"
    claimed = await store.claim(["a"], 60, T0)
    assert claimed is not None
    assert claimed.lease_token is not None
    envelope = b'{"error":{"message":"model `\\udfff` not found","type":"x"}}'
    assert await store.fail(job.id, claimed.lease_token, envelope, 404, None, T0)
    await store._call(
        lambda c: c.execute("UPDATE jobs SET endpoint = CAST(x'ff63' AS TEXT)"), write=True
    )
    failed = await store.get(job.id, "a")
    assert failed is not None
    assert failed.last_error == "model `\\udfff` not found"
    assert failed.endpoint == "\\xffc"


async def test_a_value_the_database_cannot_store_is_a_gateway_error(store: Store) -> None:
    await store.enqueue(new("a"), now=T0)
    job = await store.claim(["a"], 60, T0)
    assert job is not None
    assert job.lease_token is not None
    with pytest.raises(GatewayError, match="cannot store a value"):
        await store.complete(job.id, job.lease_token, RESULT, 2**70, T0)
    with pytest.raises(GatewayError, match="cannot store a value"):
        await store.release("job-\ud800", job.lease_token, T0)
