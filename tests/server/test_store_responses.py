"""Stored Responses (schema v4): one contract suite run against every ``ResponseStore``
(the SQLite ``Store`` and the in-memory ``MemoryResponses``), then what only the SQLite
store does: group commit with enqueues, the sweep, the size cap, migration from v3.

Test rules: every database lives in ``tmp_path``; the SQLite store runs on its real worker
thread; time is a settable clock (``store.clock``) or passed in explicitly (``sweep(now)``),
so nothing sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import attrs
import pytest
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, OverflowConfig, UpstreamConfig
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.gateway.overflow import NewJob
from runestone_proxy.gateway.responses_store import MemoryResponses, ResponseStore, StoredResponse
from runestone_proxy.server import store_schema
from runestone_proxy.server.drainer import RESULT_OVERHEAD_BYTES
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_schema import SCHEMA_VERSION

T0 = 1_000_000.0
RETENTION_S = 100.0
INPUT = b'[{"type":"message","role":"user","content":[{"type":"input_text","text":"hi"}]}]'
RESPONSE = b'{"id":"resp_1","object":"response","output":[],"status":"completed"}'


@attrs.define
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


def record(rid: str = "resp_1", tenant: str = "a", at: float = T0, **kw: bytes) -> StoredResponse:
    return StoredResponse(
        rid, tenant, at, kw.get("input_items", INPUT), kw.get("response", RESPONSE)
    )


def make_store(tmp_path: Path, clock: Clock, **upstream: int) -> Store:
    config = Config(
        overflow=OverflowConfig(database=str(tmp_path / "s.sqlite3"), retention_s=RETENTION_S),
        upstream=UpstreamConfig(**upstream),
    )
    store = Store.from_config(config, env={})
    store.clock = clock
    return store


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def sqlite_store(tmp_path: Path, clock: Clock, nursery: trio.Nursery) -> Store:
    store = make_store(tmp_path, clock)
    await nursery.start(store.run)
    return store


@pytest.fixture(params=["sqlite", "memory"])
async def responses(
    request: pytest.FixtureRequest, tmp_path: Path, clock: Clock, nursery: trio.Nursery
) -> AsyncIterator[ResponseStore]:
    if request.param == "memory":
        yield MemoryResponses(max_bytes=1000, retention_s=RETENTION_S, clock=clock)
        return
    store = make_store(tmp_path, clock)
    store.max_record_bytes = 1000
    await nursery.start(store.run)
    yield store


@pytest.fixture
def events() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


# --- the contract, for every implementation -----------------------------------------------------


async def test_a_saved_response_reads_back_whole_for_its_tenant_only(
    responses: ResponseStore,
) -> None:
    await responses.save_response(record())
    assert await responses.get_response("a", "resp_1") == record()
    assert await responses.get_response("b", "resp_1") is None
    assert await responses.get_response("a", "resp_2") is None


async def test_the_same_id_in_two_tenants_is_two_records(responses: ResponseStore) -> None:
    await responses.save_response(record(response=b'{"n":1}'))
    await responses.save_response(record(tenant="b", response=b'{"n":2}'))
    a, b = await responses.get_response("a", "resp_1"), await responses.get_response("b", "resp_1")
    assert a is not None
    assert b is not None
    assert (a.response, b.response) == (b'{"n":1}', b'{"n":2}')


async def test_saving_again_replaces_the_record(responses: ResponseStore) -> None:
    await responses.save_response(record())
    await responses.save_response(record(response=b'{"again":true}'))
    again = await responses.get_response("a", "resp_1")
    assert again is not None
    assert again.response == b'{"again":true}'


async def test_delete_is_per_tenant_and_once(responses: ResponseStore) -> None:
    await responses.save_response(record())
    assert not await responses.delete_response("b", "resp_1")
    assert await responses.delete_response("a", "resp_1")
    assert not await responses.delete_response("a", "resp_1")
    assert await responses.get_response("a", "resp_1") is None


async def test_a_response_past_retention_is_gone_before_any_sweep(
    responses: ResponseStore, clock: Clock
) -> None:
    await responses.save_response(record(at=T0))
    clock.now = T0 + RETENTION_S - 1
    assert await responses.get_response("a", "resp_1") is not None
    clock.now = T0 + RETENTION_S
    assert await responses.get_response("a", "resp_1") is None
    assert not await responses.delete_response("a", "resp_1")


async def test_a_record_over_the_cap_is_not_stored_and_says_so(
    responses: ResponseStore, events: telemetry.Recorder
) -> None:
    exact = record(response=b"x" * (1000 - len(INPUT)))
    await responses.save_response(exact)
    assert await responses.get_response("a", "resp_1") == exact
    await responses.save_response(record("resp_2", response=b"x" * (1001 - len(INPUT))))
    assert await responses.get_response("a", "resp_2") is None
    assert events.named("responses.not_stored") == [
        {
            "tenant": "a",
            "response_id": "resp_2",
            "reason": "too_large",
            "size_bytes": 1001,
            "max_bytes": 1000,
        }
    ]


# --- the SQLite store -------------------------------------------------------------------------


def test_the_cap_is_a_job_results_cap(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock, max_response_bytes=5000)
    assert store.max_record_bytes == 5000 + RESULT_OVERHEAD_BYTES
    assert Store.from_config(Config(), env={}).max_record_bytes == (
        UpstreamConfig().max_response_bytes + RESULT_OVERHEAD_BYTES
    )


async def test_saves_share_group_commits_with_enqueues(sqlite_store: Store) -> None:
    count = 100

    async def save(i: int) -> None:
        await sqlite_store.save_response(record(f"resp_{i}", tenant=f"t{i % 3}"))

    async def enqueue(i: int) -> None:
        await sqlite_store.enqueue(NewJob("a", f"req_{i}", "chat", b"{}"), now=T0)

    async with trio.open_nursery() as nursery:
        for i in range(count):
            nursery.start_soon(save, i)
            nursery.start_soon(enqueue, i)
    stats = sqlite_store.stats
    assert (stats.responses_saved, stats.enqueued) == (count, count)
    assert stats.enqueue_batches < count / 2  # grouped: no fsync per save
    assert stats.transactions == stats.enqueue_batches
    for i in range(count):
        assert await sqlite_store.get_response(f"t{i % 3}", f"resp_{i}") is not None


async def test_deletes_go_through_the_writer(sqlite_store: Store) -> None:
    await sqlite_store.save_response(record())
    before = sqlite_store.stats.enqueue_batches
    assert await sqlite_store.delete_response("a", "resp_1")
    assert sqlite_store.stats.enqueue_batches == before + 1


async def test_the_sweep_deletes_responses_past_retention(sqlite_store: Store) -> None:
    await sqlite_store.save_response(record("resp_old", at=T0))
    await sqlite_store.save_response(record("resp_new", at=T0 + 50))
    assert await sqlite_store.sweep(T0 + 10) == (0, T0 + RETENTION_S)
    assert await sqlite_store.sweep(T0 + RETENTION_S) == (1, T0 + 50 + RETENTION_S)
    assert await sqlite_store.sweep(T0 + 50 + RETENTION_S) == (1, None)
    rows = await sqlite_store._call(
        lambda c: c.execute("SELECT COUNT(*) FROM responses").fetchone()
    )
    assert tuple(rows) == (0,)


async def test_a_save_rings_the_sweep_bell_when_it_falls_due_first(sqlite_store: Store) -> None:
    assert await sqlite_store.sweep(T0) == (0, None)
    await sqlite_store.save_response(record("resp_1", at=T0))
    with trio.move_on_after(5) as waited:
        await sqlite_store.sweep_due.wait()  # nothing was due: this one is, at T0 + retention
    assert not waited.cancelled_caught
    await sqlite_store.save_response(record("resp_2", at=T0 + 1))  # due later: no bell
    with trio.move_on_after(0) as idle:
        await sqlite_store.sweep_due.wait()
    assert idle.cancelled_caught
    assert await sqlite_store.sweep(T0) == (0, T0 + RETENTION_S)


async def test_a_closed_store_refuses_saves_with_503(tmp_path: Path, clock: Clock) -> None:
    store = make_store(tmp_path, clock)
    with pytest.raises(ServiceUnavailable):
        await store.save_response(record())
    with pytest.raises(ServiceUnavailable):
        await store.delete_response("a", "resp_1")


async def test_odd_text_in_ids_is_stored_and_found(sqlite_store: Store) -> None:
    odd = record("resp_\ud800", tenant="t\udfff")
    await sqlite_store.save_response(odd)
    found = await sqlite_store.get_response("t\udfff", "resp_\ud800")
    assert found is not None
    assert found.response == RESPONSE
    assert await sqlite_store.delete_response("t\udfff", "resp_\ud800")


async def test_a_version_3_database_is_migrated_and_keeps_its_jobs(
    tmp_path: Path, clock: Clock
) -> None:
    conn = sqlite3.connect(tmp_path / "s.sqlite3")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in (1, 2, 3):
        for statement in store_schema._MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute(  # as version 3 wrote a job
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, headers, status,"
        " next_attempt_at, created_at, updated_at)"
        " VALUES ('job_v3', 'a', 'req_a', 'chat', ?, NULL, 'queued', ?, ?, ?)",
        (b"{}", T0, T0, T0),
    )
    conn.commit()
    conn.close()
    store = make_store(tmp_path, clock)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        versions = await store._call(
            lambda c: [v for (v,) in c.execute("SELECT version FROM schema_version")]
        )
        job = await store.get("job_v3", "a")
        await store.save_response(record())
        saved = await store.get_response("a", "resp_1")
        nursery.cancel_scope.cancel()
    assert versions == list(range(1, SCHEMA_VERSION + 1))
    assert job is not None
    assert job.body == b"{}"
    assert saved == record()
