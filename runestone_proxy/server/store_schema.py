"""The store's schema: the ``jobs`` and ``responses`` tables, their migrations, and how a row
is written and read back. Synchronous ``sqlite3`` on a connection the caller owns
(:mod:`.store`); the queries are in :mod:`.store_sql`.

Text is made storable on the way in (:func:`storable`: a lone surrogate, which a JSON
``\\ud800`` escape can carry, cannot be encoded as UTF-8) and read back leniently (the store
sets a ``text_factory`` that decodes invalid UTF-8 with ``backslashreplace``), so no job's
text can make a write or a read raise.

``schema_version`` holds the version a database was written with: a newer one than this
code knows is refused rather than misread; older ones are migrated forward one step at a
time in ``_MIGRATIONS`` (one transaction each).

One row per job::

    id TEXT PK              job_<hex>
    tenant, request_id, endpoint
    body BLOB               the request JSON; 'sha256:<hex>' once the job ends (redaction)
    webhook_url, idempotency_key     unique per tenant (partial index, keys only)
    status                  queued | running | succeeded | failed | dead (gateway/overflow.py)
    attempts, lease_token, lease_expires_at, next_attempt_at
    claims                  claims since an outcome was last recorded (v2)
    headers TEXT            forwarded client headers, JSON [[name, value], ...] of latin-1
                            strings, or NULL (none, or the job has ended) (v3)
    created_at, updated_at, finished_at             unix seconds (REAL)
    result BLOB, result_status INT, last_error      the OpenAI body, or the error envelope
    webhook_status, webhook_attempts, webhook_next_at   none | pending | delivered | failed

One row per stored Response (v4; gateway/responses_store.py), keyed by tenant and id::

    tenant TEXT, id TEXT    PRIMARY KEY (tenant, id): another tenant's id is not found
    created_at REAL         unix seconds; the retention sweep reads it (index)
    input_items BLOB        JSON array: the whole input the response answered
    response BLOB           JSON object: the Response as the client got it

The usage ledger (v5; gateway/ledger.py, SQL in :mod:`.store_ledger`): one ``usage`` row
per :class:`UsageRecord` (every field; ``at`` REAL unix seconds, booleans as 0/1; indexed
on ``at`` only since v7), and two rollups, ``usage_hourly`` and ``usage_daily``,
one row per (bucket_start, tenant, key_id, model, provider) with the sums of requests,
errors, the four token counts and cost_usd, kept current in the raw insert's transaction.
``bucket_start`` is the UTC hour or day start (unix seconds).

API keys made at run time (v6; gateway/api_keys.py, SQL in :mod:`.store_keys_sql`), one
row per key, never its secret::

    id TEXT PK              key_<16 hex>: public, stable across rotations
    tenant, name
    sha256 TEXT UNIQUE      hex digest of the current secret; mask: sk-...abcd
    created_at, updated_at, revoked_at     unix seconds (REAL); revoked_at NULL: in force
    previous_sha256, previous_mask, previous_expires_at
                            the secret a rotation replaced, valid until previous_expires_at
    rpm, rph, tpm, max_concurrent, budget_tokens_day  INTEGER; budget_usd_day,
    budget_usd_month REAL    NULL: no such limit

``api_keys_version`` holds one row, ``version``, bumped in the transaction of every change:
every process polls it (cheap) to know when to reload the keys.

v7 drops the raw ledger's ``usage_tenant_at`` index: every insert paid for it (~0.35 us of
~2.1 us per record) and no hot read needs it. Each query on ``usage`` bounds ``at``
(``usage_at`` serves it): the retention sweep, a report's raw segments (a partial hour at a
report's edges) and ``spend()``'s raw part (less than an hour, and none for budgets, which
ask from a day or month start, on the hour); a tenant filter is checked on those rows.
"""

from __future__ import annotations

import json
import sqlite3

from runestone_proxy.gateway.overflow import Job, JobStatus, WebhookStatus
from runestone_proxy.gateway.responses_store import StoredResponse

__all__ = [
    "SCHEMA_VERSION",
    "decode_headers",
    "decode_text",
    "encode_headers",
    "job_from_row",
    "migrate",
    "response_from_row",
    "storable",
]

SCHEMA_VERSION = 7

Headers = tuple[tuple[bytes, bytes], ...]

_V1 = (
    """CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        request_id TEXT NOT NULL,
        endpoint TEXT NOT NULL,
        body BLOB NOT NULL,
        webhook_url TEXT,
        idempotency_key TEXT,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        lease_token TEXT,
        lease_expires_at REAL,
        next_attempt_at REAL NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        finished_at REAL,
        result BLOB,
        result_status INTEGER,
        last_error TEXT,
        webhook_status TEXT NOT NULL DEFAULT 'none',
        webhook_attempts INTEGER NOT NULL DEFAULT 0,
        webhook_next_at REAL
    )""",
    "CREATE UNIQUE INDEX jobs_idempotency ON jobs (tenant, idempotency_key)"
    " WHERE idempotency_key IS NOT NULL",
    "CREATE INDEX jobs_tenant ON jobs (tenant, status, created_at)",
    "CREATE INDEX jobs_due ON jobs (status, next_attempt_at)",
    "CREATE INDEX jobs_lease ON jobs (status, lease_expires_at)",
    "CREATE INDEX jobs_webhook ON jobs (webhook_status, webhook_next_at)",
    "CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL",
)

_V2 = ("ALTER TABLE jobs ADD COLUMN claims INTEGER NOT NULL DEFAULT 0",)

#: Jobs queued before v3 have NULL: they run without forwarded headers, as they did.
_V3 = ("ALTER TABLE jobs ADD COLUMN headers TEXT",)

#: Stored Responses (conversation state), beside the jobs.
_V4 = (
    """CREATE TABLE responses (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at REAL NOT NULL,
        input_items BLOB NOT NULL,
        response BLOB NOT NULL,
        PRIMARY KEY (tenant, id)
    )""",
    "CREATE INDEX responses_created ON responses (created_at)",
)


def _rollup(table: str) -> str:
    return f"""CREATE TABLE {table} (
        bucket_start REAL NOT NULL,
        tenant TEXT NOT NULL,
        key_id TEXT NOT NULL,
        model TEXT NOT NULL,
        provider TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        prompt_tokens INTEGER NOT NULL DEFAULT 0,
        completion_tokens INTEGER NOT NULL DEFAULT 0,
        cached_tokens INTEGER NOT NULL DEFAULT 0,
        reasoning_tokens INTEGER NOT NULL DEFAULT 0,
        cost_usd REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (bucket_start, tenant, key_id, model, provider)
    )"""


#: The usage ledger: raw records and their hourly and daily rollups.
_V5 = (
    """CREATE TABLE usage (
        at REAL NOT NULL,
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
        cost_usd REAL NOT NULL,
        status INTEGER NOT NULL,
        outcome TEXT NOT NULL,
        stream INTEGER NOT NULL,
        estimated INTEGER NOT NULL,
        latency_ms REAL NOT NULL,
        ttfb_ms REAL
    )""",
    "CREATE INDEX usage_at ON usage (at)",
    "CREATE INDEX usage_tenant_at ON usage (tenant, at)",
    _rollup("usage_hourly"),
    _rollup("usage_daily"),
)

#: API keys made at run time, and the version every process polls.
_V6 = (
    """CREATE TABLE api_keys (
        id TEXT PRIMARY KEY,
        tenant TEXT NOT NULL,
        name TEXT NOT NULL DEFAULT '',
        sha256 TEXT NOT NULL UNIQUE,
        mask TEXT NOT NULL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL,
        revoked_at REAL,
        previous_sha256 TEXT,
        previous_mask TEXT,
        previous_expires_at REAL,
        rpm INTEGER,
        rph INTEGER,
        tpm INTEGER,
        max_concurrent INTEGER,
        budget_usd_day REAL,
        budget_usd_month REAL,
        budget_tokens_day INTEGER
    )""",
    "CREATE INDEX api_keys_tenant ON api_keys (tenant, created_at)",
    "CREATE TABLE api_keys_version (version INTEGER NOT NULL)",
    "INSERT INTO api_keys_version (version) VALUES (0)",
)

#: The raw ledger's (tenant, at) index goes: it cost every insert and served no hot read (the
#: module docstring says which index each query on ``usage`` uses).
_V7 = ("DROP INDEX IF EXISTS usage_tenant_at",)

#: version reached -> the statements that reach it from the version before.
_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: _V1,
    2: _V2,
    3: _V3,
    4: _V4,
    5: _V5,
    6: _V6,
    7: _V7,
}


def _version(conn: sqlite3.Connection) -> int:
    found: int = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
    return found


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema up to :data:`SCHEMA_VERSION`; returns the version found on disk.

    Raises ``sqlite3.DatabaseError`` for a database written by a newer Runestone."""
    conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
    found = _version(conn)
    if found > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(
            f"schema version {found} is newer than this Runestone knows ({SCHEMA_VERSION})"
        )
    for version in range(found + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Several processes may open one new file at once (server.workers > 1): what we
            # read above may be stale, so look again now that the write lock is ours.
            if _version(conn) < version:
                for statement in _MIGRATIONS[version]:
                    conn.execute(statement)
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return found


def job_from_row(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        tenant=row["tenant"],
        request_id=row["request_id"],
        endpoint=row["endpoint"],
        body=bytes(row["body"]),
        webhook_url=row["webhook_url"],
        idempotency_key=row["idempotency_key"],
        status=JobStatus(row["status"]),
        attempts=row["attempts"],
        lease_token=row["lease_token"],
        lease_expires_at=row["lease_expires_at"],
        next_attempt_at=row["next_attempt_at"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        finished_at=row["finished_at"],
        result=None if row["result"] is None else bytes(row["result"]),
        result_status=row["result_status"],
        last_error=row["last_error"],
        webhook_status=WebhookStatus(row["webhook_status"]),
        webhook_attempts=row["webhook_attempts"],
        webhook_next_at=row["webhook_next_at"],
        claims=row["claims"],
        headers=decode_headers(row["headers"]),
    )


def response_from_row(row: sqlite3.Row) -> StoredResponse:
    return StoredResponse(
        id=row["id"],
        tenant=row["tenant"],
        created_at=row["created_at"],
        input_items=bytes(row["input_items"]),
        response=bytes(row["response"]),
    )


def encode_headers(headers: Headers) -> str | None:
    """The ``headers`` column: ``[[name, value], ...]`` with each byte string as latin-1
    text (every byte maps to one code point, so it round-trips), JSON with ASCII escapes
    (always storable); NULL for none."""
    if not headers:
        return None
    pairs = [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
    return json.dumps(pairs, separators=(",", ":"))


def decode_headers(text: str | None) -> Headers:
    """:func:`encode_headers` read back. Lenient like the rest of the row: a value this code
    did not write (not JSON, not pairs of strings, a code point past latin-1) reads as no
    headers rather than making the row, and every claim that reads it, fail."""
    if text is None:
        return ()
    try:
        pairs = json.loads(text)
        if not isinstance(pairs, list) or not all(
            isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)
            for pair in pairs
        ):
            return ()
        return tuple((name.encode("latin-1"), value.encode("latin-1")) for name, value in pairs)
    except (ValueError, RecursionError):  # not JSON; past latin-1 (UnicodeEncodeError)
        return ()


def storable(text: str | None) -> str | None:
    """``text`` as either database can store it: UTF-8-encodable (a lone surrogate becomes
    the six characters ``\\ud800``) and without NUL (PostgreSQL's text cannot hold one: it
    becomes the four characters ``\\x00``). ASCII without NUL, the usual case, is returned
    as it is."""
    if text is None or (text.isascii() and "\x00" not in text):
        return text
    return text.encode("utf-8", "backslashreplace").decode("utf-8").replace("\x00", "\\x00")


def decode_text(data: bytes) -> str:
    """The connection's ``text_factory``: a TEXT value that is not valid UTF-8 (written by
    something else) is read with ``backslashreplace`` instead of failing the whole query."""
    return data.decode("utf-8", "backslashreplace")
