"""The API keys' SQL (SQLite schema v6, :mod:`.store_schema`; PostgreSQL v2,
:mod:`.store_pg_schema`): one plain function per operation.

Synchronous, on a connection the caller owns and inside the caller's transaction (the
writing ones bump ``api_keys_version`` in it, so a reader that sees the new version sees
the change). Plain parameterised SQL with ``?`` placeholders and nothing SQLite-only: the
same statements run on both backends through :class:`~.store_db.Db`. :mod:`.store_keys`
calls these; the rules (who may change what) are :mod:`runestone_proxy.gateway.api_keys`'.
"""

from __future__ import annotations

from typing import Any

from runestone_proxy.gateway.api_key_values import KeySettings, StoredKey
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_schema import storable

__all__ = [
    "get",
    "insert",
    "list_keys",
    "load",
    "revoke",
    "rotate",
    "update",
    "version",
]

_SETTINGS = (
    "name",
    "rpm",
    "rph",
    "tpm",
    "max_concurrent",
    "budget_usd_day",
    "budget_usd_month",
    "budget_tokens_day",
)
_COLUMNS = (
    "id",
    "tenant",
    "sha256",
    "mask",
    "created_at",
    "updated_at",
    "revoked_at",
    "previous_sha256",
    "previous_mask",
    "previous_expires_at",
    *_SETTINGS,
)
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM api_keys"
_BUMP = "UPDATE api_keys_version SET version = version + 1"


def _row(key: StoredKey) -> tuple[Any, ...]:
    s = key.settings
    return (
        key.id,
        storable(key.tenant),
        key.sha256,
        key.mask,
        key.created_at,
        key.updated_at,
        key.revoked_at,
        key.previous_sha256,
        key.previous_mask,
        key.previous_expires_at,
        storable(s.name),
        s.rpm,
        s.rph,
        s.tpm,
        s.max_concurrent,
        s.budget_usd_day,
        s.budget_usd_month,
        s.budget_tokens_day,
    )


def _key(row: Any) -> StoredKey:
    values = dict(zip(_COLUMNS, tuple(row), strict=True))
    settings = KeySettings(**{name: values.pop(name) for name in _SETTINGS})
    return StoredKey(**values, settings=settings)


def version(conn: Db) -> int:
    value: int = conn.execute("SELECT version FROM api_keys_version").fetchone()[0]
    return value


def insert(conn: Db, key: StoredKey) -> None:
    marks = ", ".join("?" * len(_COLUMNS))
    conn.execute(f"INSERT INTO api_keys ({', '.join(_COLUMNS)}) VALUES ({marks})", _row(key))
    conn.execute(_BUMP)


def get(conn: Db, key_id: str) -> StoredKey | None:
    row = conn.execute(f"{_SELECT} WHERE id = ?", (key_id,)).fetchone()
    return None if row is None else _key(row)


def list_keys(conn: Db, tenant: str | None) -> list[StoredKey]:
    """Every key (revoked ones too), oldest first; only ``tenant``'s if given."""
    if tenant is None:
        rows = conn.execute(f"{_SELECT} ORDER BY created_at, id").fetchall()
    else:
        rows = conn.execute(
            f"{_SELECT} WHERE tenant = ? ORDER BY created_at, id", (tenant,)
        ).fetchall()
    return [_key(r) for r in rows]


def load(conn: Db) -> tuple[int, list[StoredKey]]:
    """The version, then the keys not revoked: read in that order, the keys are at least as
    new as the version (a change in between is reloaded again at the next poll)."""
    seen = version(conn)
    rows = conn.execute(f"{_SELECT} WHERE revoked_at IS NULL").fetchall()
    return seen, [_key(r) for r in rows]


def update(conn: Db, key_id: str, settings: KeySettings, now: float) -> StoredKey | None:
    """Replace the key's settings, unless it is revoked (None: revoked or unknown)."""
    assignments = ", ".join(f"{name} = ?" for name in _SETTINGS)
    values = [getattr(settings, name) for name in _SETTINGS]
    values[0] = storable(values[0])
    cursor = conn.execute(
        f"UPDATE api_keys SET {assignments}, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
        (*values, now, key_id),
    )
    return _changed(conn, key_id, cursor.rowcount)


def revoke(conn: Db, key_id: str, now: float) -> StoredKey | None:
    """Revoke the key (None: unknown, or revoked already)."""
    cursor = conn.execute(
        "UPDATE api_keys SET revoked_at = ?, updated_at = ? WHERE id = ? AND revoked_at IS NULL",
        (now, now, key_id),
    )
    return _changed(conn, key_id, cursor.rowcount)


def rotate(
    conn: Db, key_id: str, sha256: str, mask: str, grace_end: float, now: float
) -> StoredKey | None:
    """Give the key a new secret; the current one stays valid until ``grace_end`` (the
    right-hand sides read the row as it was: standard SQL, SQLite and PostgreSQL alike)."""
    cursor = conn.execute(
        "UPDATE api_keys SET previous_sha256 = sha256, previous_mask = mask,"
        " previous_expires_at = ?, sha256 = ?, mask = ?, updated_at = ?"
        " WHERE id = ? AND revoked_at IS NULL",
        (grace_end, sha256, mask, now, key_id),
    )
    return _changed(conn, key_id, cursor.rowcount)


def _changed(conn: Db, key_id: str, count: int) -> StoredKey | None:
    if count == 0:
        return None
    conn.execute(_BUMP)
    return get(conn, key_id)
