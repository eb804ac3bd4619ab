"""The forwarded client headers a job keeps (schema v3): stored with the job, read back as
sent, dropped once the job ends, the same for an idempotent replay, and the migration of a
version 2 database in place.

Test rules (as ``test_store.py``): every database lives in ``tmp_path``; the store runs on
its real worker thread; time is passed in explicitly, so nothing sleeps.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.config import Config, OverflowConfig
from runestone_proxy.gateway.overflow import JobStatus, NewJob
from runestone_proxy.server import store_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_schema import SCHEMA_VERSION, decode_headers, encode_headers

BODY = b'{"model":"claude-sonnet","max_tokens":64,"messages":[{"role":"user","content":"hi"}]}'
RESULT = b'{"id":"msg_1","type":"message","content":[]}'
HEADERS = (
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"claude-code-20250219,interleaved-thinking-2025-05-14"),
    (b"x-app", b"cli"),
    (b"x-claude-code-session-id", b'caf\xe9 "quoted" \\ \x7f'),  # any obs-text byte
)
T0 = 1_000_000.0


def new(tenant: str = "a", **kw: object) -> NewJob:
    return NewJob(tenant, f"req_{tenant}", "messages", BODY, **kw)  # type: ignore[arg-type]


def make_store(tmp_path: Path, **overflow: object) -> Store:
    database = str(tmp_path / "jobs.sqlite3")
    config = Config(overflow=OverflowConfig(database=database, **overflow))  # type: ignore[arg-type]
    return Store.from_config(config, env={})


@pytest.fixture
async def store(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Store]:
    s = make_store(tmp_path)
    await nursery.start(s.run)
    return s


def raw_headers(store: Store) -> dict[str, str | None]:
    """job id -> its ``headers`` column as stored."""
    conn = sqlite3.connect(store.path)
    try:
        return dict(conn.execute("SELECT id, headers FROM jobs").fetchall())
    finally:
        conn.close()


# --- the column's codec ---------------------------------------------------------------------


def test_headers_are_stored_as_json_pairs_of_latin1_text_or_null() -> None:
    assert encode_headers(()) is None
    assert decode_headers(None) == ()
    text = encode_headers(((b"anthropic-beta", b"a,b"), (b"x-app", b"\xe9")))
    assert text == '[["anthropic-beta","a,b"],["x-app","\\u00e9"]]'
    assert text is not None
    assert text.isascii()  # always storable


@given(st.lists(st.tuples(st.binary(min_size=1, max_size=40), st.binary(max_size=200)), max_size=8))
def test_any_header_bytes_round_trip(pairs: list[tuple[bytes, bytes]]) -> None:
    headers = tuple(pairs)
    assert decode_headers(encode_headers(headers)) == headers


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "{}",
        '{"anthropic-beta": "x"}',  # an object: its keys are not pairs
        '["ab"]',  # a two-character string is not a pair
        '[["a", "b", "c"]]',
        '[["a", 1]]',
        '[["anthropic-beta", "\\u0100"]]',  # past latin-1: not bytes this code wrote
        "[" * 100_000,
    ],
)
def test_a_headers_value_this_code_did_not_write_reads_as_none(text: str) -> None:
    assert decode_headers(text) == ()


# --- through the store ----------------------------------------------------------------------


async def test_a_job_keeps_its_headers_until_it_ends(store: Store) -> None:
    done = (await store.enqueue(new("a", headers=HEADERS), now=T0)).job
    failed = (await store.enqueue(new("b", headers=HEADERS), now=T0)).job
    bare = (await store.enqueue(new("c"), now=T0)).job
    assert done.headers == HEADERS
    assert bare.headers == ()
    assert raw_headers(store)[bare.id] is None
    got = await store.get(done.id, "a")
    assert got is not None
    assert got.headers == HEADERS
    for tenant in ("a", "b"):
        claimed = await store.claim([tenant], 60, T0)
        assert claimed is not None
        assert claimed.headers == HEADERS  # what the runner forwards
        assert claimed.lease_token is not None
        if tenant == "a":
            assert await store.complete(claimed.id, claimed.lease_token, RESULT, 200, T0 + 1)
        else:
            error = b'{"error":{"message":"no"}}'
            assert await store.fail(claimed.id, claimed.lease_token, error, 400, None, T0 + 1)
    stored = raw_headers(store)
    assert (stored[done.id], stored[failed.id]) == (None, None)  # redacted with the body
    ended = await store.get(failed.id, "b")
    assert ended is not None
    assert (ended.status, ended.headers) == (JobStatus.FAILED, ())


async def test_a_retried_job_keeps_its_headers_and_a_buried_one_drops_them(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    store = make_store(tmp_path, max_claims=2)
    await nursery.start(store.run)
    job = (await store.enqueue(new("a", headers=HEADERS), now=T0)).job
    first = await store.claim(["a"], 10, T0)
    assert first is not None
    assert first.lease_token is not None
    error = b'{"error":{"message":"overloaded"}}'
    assert await store.fail(job.id, first.lease_token, error, 503, T0 + 1, T0)  # retry
    again = await store.claim(["a"], 10, T0 + 1)
    assert again is not None
    assert again.headers == HEADERS
    assert await store.claim(["a"], 10, T0 + 12) is not None  # no outcome: lease expired
    assert await store.claim(["a"], 10, T0 + 23) is None  # buried
    dead = await store.get(job.id, "a")
    assert dead is not None
    assert (dead.status, dead.headers) == (JobStatus.DEAD, ())
    assert raw_headers(store)[job.id] is None


async def test_an_idempotent_replay_answers_the_first_job_with_its_headers(store: Store) -> None:
    first = await store.enqueue(new("a", idempotency_key="k", headers=HEADERS), now=T0)
    other = ((b"anthropic-version", b"2023-06-01"),)
    again = await store.enqueue(new("a", idempotency_key="k", headers=other), now=T0 + 1)
    assert not again.created
    assert again.job.id == first.job.id
    assert again.job.headers == HEADERS  # the replay runs nothing and changes nothing


# --- migration ------------------------------------------------------------------------------


async def test_a_version_2_database_is_migrated_and_its_jobs_run_without_headers(
    tmp_path: Path,
) -> None:
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in (1, 2):
        for statement in store_schema._MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
    conn.execute(  # as version 2 wrote a job
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES ('job_v2', 'a', 'req_a', 'messages', ?, 'queued',"
        " ?, ?, ?)",
        (BODY, T0, T0, T0),
    )
    conn.commit()
    conn.close()
    store = make_store(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(store.run)
        versions = await store._call(
            lambda c: [v for (v,) in c.execute("SELECT version FROM schema_version")]
        )
        old = await store.claim(["a"], 60, T0)
        fresh = (await store.enqueue(new("a", headers=HEADERS), now=T0)).job
        nursery.cancel_scope.cancel()
    assert versions == list(range(1, SCHEMA_VERSION + 1))  # from 3 on: each migration
    assert old is not None
    assert (old.id, old.body, old.headers, old.attempts) == ("job_v2", BODY, (), 1)
    assert fresh.headers == HEADERS
