"""The durable store's schema on PostgreSQL: the same tables as SQLite's
(:mod:`.store_schema` describes every column), in PostgreSQL's types, versioned on their own.

Types: text stays ``TEXT`` (what the store writes is made storable first:
:func:`.store_schema.storable`), blobs are ``BYTEA``, unix times ``DOUBLE PRECISION``
(read back exactly), counters ``INTEGER``, and the rollups' sums ``BIGINT`` (a busy day's
tokens pass 2**31).

Migrations: ``schema_version`` holds the versions applied. The gateway migrates at start,
in ONE transaction under a transaction-level advisory lock, so several gateways starting at
once against the same database take turns: the first creates or upgrades, the others find
it done. PostgreSQL's DDL is transactional, so a failed migration leaves nothing behind. A
database written by a newer Runestone is refused rather than misread. Versions here are
PostgreSQL's own: v1 is SQLite's v5 in one step; v2 adds the run-time API keys (SQLite's
v6: ``api_keys`` and ``api_keys_version``); v3 drops the raw ledger's ``usage_tenant_at``
index (SQLite's v7, which says why).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runestone_proxy.server.store_db import Db

__all__ = ["MIGRATION_LOCK", "SCHEMA_VERSION", "SchemaTooNew", "migrate"]

SCHEMA_VERSION = 3

#: ``pg_advisory_xact_lock(MIGRATION_LOCK)``: one gateway migrates at a time. ('RUNS')
MIGRATION_LOCK = 0x52554E53


class SchemaTooNew(Exception):
    """The database was written by a newer Runestone."""


def _rollup(table: str) -> str:
    return f"""CREATE TABLE {table} (
        bucket_start DOUBLE PRECISION NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        requests BIGINT NOT NULL DEFAULT 0,
        errors BIGINT NOT NULL DEFAULT 0,
        prompt_tokens BIGINT NOT NULL DEFAULT 0,
        completion_tokens BIGINT NOT NULL DEFAULT 0,
        cached_tokens BIGINT NOT NULL DEFAULT 0,
        reasoning_tokens BIGINT NOT NULL DEFAULT 0,
        cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
        PRIMARY KEY (bucket_start, tenant, key_id, model, provider)
    )"""


_V1 = (
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        request_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        body BYTEA NOT NULL,
        webhook_url TEXT,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_token TEXT,
        lease_expires_at DOUBLE PRECISION,
        next_attempt_at DOUBLE PRECISION NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        finished_at DOUBLE PRECISION,
        result BYTEA,
        result_status INTEGER,
        last_error TEXT,
        webhook_status TEXT NOT NULL DEFAULT 'none',
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        webhook_next_at DOUBLE PRECISION,
        claims INTEGER NOT NULL DEFAULT 0,
        headers TEXT
    )""",
    "CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX jobs_tenant ON jobs (tenant, status, created_at)",
    "CREATE INDEX jobs_due ON jobs (status, next_attempt_at)",
    "CREATE INDEX jobs_lease ON jobs (status, lease_expires_at)",
    "CREATE INDEX jobs_webhook ON jobs (webhook_status, webhook_next_at)",
    "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
    """CREATE TABLE responses (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        input_items BYTEA NOT NULL,
        response BYTEA NOT NULL,
        PRIMARY KEY (tenant, id)
    )""",
    "CREATE INDEX responses_created ON responses (created_at)",
    """CREATE TABLE usage (
        at DOUBLE PRECISION NOT NULL,
        request_id TEXT NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        upstream_model TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        prompt_tokens INTEGER NOT NULL,
        completion_tokens INTEGER NOT NULL,
        cached_tokens INTEGER NOT NULL,
        reasoning_tokens INTEGER NOT NULL,
        cost_usd DOUBLE PRECISION NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        stream INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        latency_ms DOUBLE PRECISION NOT NULL,
        ttfb_ms DOUBLE PRECISION
    )""",
    "CREATE INDEX usage_at ON usage (at)",
    "CREATE INDEX usage_tenant_at ON usage (tenant, at)",
    _rollup("usage_hourly"),
    _rollup("usage_daily"),
)

#: API keys made at run time (SQLite's v6), and the version every gateway polls.
_V2 = (
    """CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        sha256 TEXT NOT NULL UNIQUE,
        mask TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL,
        updated_at DOUBLE PRECISION NOT NULL,
        revoked_at DOUBLE PRECISION,
        previous_sha256 TEXT,
        previous_mask TEXT,
        previous_expires_at DOUBLE PRECISION,
        rpm BIGINT,
        rph BIGINT,
        tpm BIGINT,
        max_concurrent BIGINT,
        budget_usd_day DOUBLE PRECISION,
        budget_usd_month DOUBLE PRECISION,
        budget_tokens_day BIGINT
    )""",
    "CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at)",
    "CREATE TABLE api_keys_version (version BIGINT NOT NULL)",
    "INSERT INTO api_keys_version (version) VALUES (0)",
)

#: The raw ledger's (tenant, at) index goes (SQLite's v7).
_V3 = ("DROP INDEX IF EXISTS usage_tenant_at",)

#: version reached -> the statements that reach it from the version before.
MIGRATIONS: dict[int, tuple[str, ...]] = {1: _V1, 2: _V2, 3: _V3}


def migrate(db: Db) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION` (one transaction, under the migration
    lock); returns the version found. Raises :class:`SchemaTooNew`."""
    db.begin()
    try:
        db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        found: int = db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        if found > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"schema version {found} is newer than this Runestone knows ({SCHEMA_VERSION})"
            )
        for version in range(found + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
        db.commit()
    except BaseException:
        db.rollback()
        raise
    return found
