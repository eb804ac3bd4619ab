"""API keys in the store (SQLite schema v6, PostgreSQL v2): each operation, the version every
change bumps (and only a change), conditional writes on a revoked key, the migrations
(SQLite from v5, PostgreSQL from v1), and two stores on one database (two processes, two
gateways) seeing each other's changes through the version.

Test rules: a test that takes ``db`` runs on both backends (SQLite in ``tmp_path``, a fresh
PostgreSQL database: ``conftest.py``); the store runs on its real worker thread; times are
passed in; nothing sleeps.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
import trio
from pg_server import PgServer
from store_db_helpers import StoreDb

from runestone_proxy.config import Config, OverflowConfig
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.gateway.api_key_values import KeySettings, StoredKey
from runestone_proxy.server import store_pg_schema, store_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_schema import SCHEMA_VERSION

T0 = 1_800_000_000.0


def make_store(where: Path | StoreDb) -> Store:
    """A store on an SQLite file, or on the test's database (either backend)."""
    if isinstance(where, StoreDb):
        overflow = where.overflow()
    else:
        overflow = OverflowConfig(database=str(where))
    return Store.from_config(Config(overflow=overflow), env={})


@pytest.fixture
async def store(db: StoreDb, nursery: trio.Nursery) -> Store:
    s = make_store(db)
    await nursery.start(s.run)
    return s


def key(n: int = 1, tenant: str = "acme", **settings: object) -> StoredKey:
    return StoredKey(
        id=f"key_{n:016x}",
        tenant=tenant,
        sha256=f"{n:064x}",
        mask=f"sk-...{n:04d}",
        created_at=T0 + n,
        updated_at=T0 + n,
        settings=KeySettings(**settings),  # type: ignore[arg-type]
    )


async def test_insert_get_list(store: Store) -> None:
    with trio.fail_after(10):
        assert await store.keys_version() == 0
        one = key(1, name="é bot", rpm=5, budget_usd_day=1.5)
        await store.insert_key(one)
        await store.insert_key(key(2, tenant="other"))
        assert await store.get_key(one.id) == one
        assert await store.get_key("key_ffffffffffffffff") is None
        assert [k.id for k in await store.list_keys(None)] == [key(1).id, key(2).id]
        assert [k.id for k in await store.list_keys("other")] == [key(2).id]
        assert await store.keys_version() == 2


async def test_update_revoke_rotate_bump_the_version_once_each(store: Store) -> None:
    with trio.fail_after(10):
        await store.insert_key(key(1, rpm=5))
        kid = key(1).id
        updated = await store.update_key(kid, KeySettings(name="x", tpm=9), T0 + 10)
        assert updated is not None
        assert updated.settings == KeySettings(name="x", tpm=9)
        assert updated.updated_at == T0 + 10
        assert updated.created_at == T0 + 1
        rotated = await store.rotate_key(kid, "ab" * 32, "sk-...new1", T0 + 99, T0 + 20)
        assert rotated is not None
        assert (rotated.sha256, rotated.mask) == ("ab" * 32, "sk-...new1")
        assert rotated.previous_sha256 == key(1).sha256
        assert (rotated.previous_mask, rotated.previous_expires_at) == (key(1).mask, T0 + 99)
        revoked = await store.revoke_key(kid, T0 + 30)
        assert revoked is not None
        assert revoked.revoked_at == T0 + 30
        assert await store.keys_version() == 4
        # A revoked key changes no more, and the refusals bump nothing.
        assert await store.update_key(kid, KeySettings(), T0 + 40) is None
        assert await store.rotate_key(kid, "cd" * 32, "m", T0 + 99, T0 + 40) is None
        assert await store.revoke_key(kid, T0 + 40) is None
        assert await store.update_key("key_0000000000000009", KeySettings(), T0) is None
        assert await store.keys_version() == 4
        version, loaded = await store.load_keys()
        assert (version, loaded) == (4, [])  # revoked keys are not loaded


async def test_a_second_store_on_the_database_sees_changes_by_version(
    db: StoreDb, nursery: trio.Nursery
) -> None:
    """Two processes (here two stores, two connections) share one database: a change by
    either bumps the version the other polls."""
    with trio.fail_after(10):
        gateway, cli = make_store(db), make_store(db)
        await nursery.start(gateway.run)
        await nursery.start(cli.run)
        before = await gateway.keys_version()
        await cli.insert_key(key(1))
        assert await gateway.keys_version() == before + 1
        version, loaded = await gateway.load_keys()
        assert version == before + 1
        assert [k.id for k in loaded] == [key(1).id]


async def test_the_secret_digest_is_unique(store: Store) -> None:
    with trio.fail_after(10):
        await store.insert_key(key(1))
        clash = StoredKey("key_00000000000000aa", "acme", key(1).sha256, "m", T0, T0, KeySettings())
        with pytest.raises(ServiceUnavailable, match="unavailable"):
            await store.insert_key(clash)
        assert await store.keys_version() == 1  # the failed insert's bump rolled back


async def test_migration_from_v5_keeps_the_jobs(tmp_path: Path, nursery: trio.Nursery) -> None:
    path = tmp_path / "v5.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for version in range(1, 6):
        conn.execute("BEGIN")
        for statement in store_schema._MIGRATIONS[version]:
            conn.execute(statement)
        conn.execute("INSERT INTO schema_version VALUES (?)", (version,))
        conn.execute("COMMIT")
    conn.execute(
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES ('job_v5', 'a', 'req', 'chat', x'7b7d', 'queued',"
        " ?, ?, ?)",
        (T0, T0, T0),
    )
    conn.close()
    with trio.fail_after(10):
        store = make_store(path)
        await nursery.start(store.run)
        assert await store.get("job_v5", "a") is not None
        assert await store.keys_version() == 0
        versions = await store._call(
            lambda c: [v for (v,) in c.execute("SELECT version FROM schema_version")]
        )
        assert versions == list(range(1, SCHEMA_VERSION + 1))
        await store.insert_key(key(1))
        assert [k.id for k in await store.list_keys("acme")] == [key(1).id]


async def test_postgres_migration_from_v1_keeps_the_jobs(
    pg: PgServer, nursery: trio.Nursery
) -> None:
    """A database a gateway of PostgreSQL schema v1 made (before run-time keys) gains the
    keys' tables at the next start, its jobs untouched."""
    db = StoreDb("postgres", pg.directory, pg.create_database())
    db.rows("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in store_pg_schema.MIGRATIONS[1]:
        db.rows(statement)
    db.rows("INSERT INTO schema_version (version) VALUES (1)")
    db.rows(
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES ('job_v1', 'a', 'req', 'chat', ?, 'queued', ?, ?, ?)",
        (b"{}", T0, T0, T0),
    )
    with trio.fail_after(10):
        store = make_store(db)
        await nursery.start(store.run)
        assert await store.get("job_v1", "a") is not None
        assert await store.keys_version() == 0
        versions = [r["version"] for r in db.rows("SELECT version FROM schema_version")]
        assert versions == list(range(1, store_pg_schema.SCHEMA_VERSION + 1))
        await store.insert_key(key(1, budget_tokens_day=2**40))
        assert await store.get_key(key(1).id) == key(1, budget_tokens_day=2**40)
