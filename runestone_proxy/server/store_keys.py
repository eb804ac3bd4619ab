"""The API keys' half of the durable store: :class:`KeysSide`, a base of
:class:`~runestone_proxy.server.store.Store` that makes it a
:class:`~runestone_proxy.gateway.api_keys.KeyAdminStore`. The SQL is in
:mod:`.store_keys_sql`; the table is described in :mod:`.store_schema` (v6).

Writes take the store's one way in (``Store._call(..., write=True)``: its worker thread,
one write transaction, the driver's errors mapped to 503), as the drainer's outcomes do;
they are rare (an admin's action), so they need no group commit. Another process (the CLI,
another worker, another gateway on the same PostgreSQL) writing at the same time waits on
the database's lock (SQLite's ``busy_timeout``, PostgreSQL's row lock), never on this one's
writer task.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from runestone_proxy.gateway.api_key_values import KeySettings, StoredKey
from runestone_proxy.server import store_keys_sql as sql
from runestone_proxy.server.store_db import Db

__all__ = ["KeysSide"]

T = TypeVar("T")


class KeysSide:
    """The keys' half of the store (a base of ``Store``, which owns the connection)."""

    if TYPE_CHECKING:

        async def _call(self, fn: Callable[[Db], T], *, write: bool = False) -> T: ...

    async def insert_key(self, key: StoredKey) -> None:
        await self._call(lambda c: sql.insert(c, key), write=True)

    async def list_keys(self, tenant: str | None) -> list[StoredKey]:
        return await self._call(lambda c: sql.list_keys(c, tenant))

    async def get_key(self, key_id: str) -> StoredKey | None:
        return await self._call(lambda c: sql.get(c, key_id))

    async def update_key(self, key_id: str, settings: KeySettings, now: float) -> StoredKey | None:
        return await self._call(lambda c: sql.update(c, key_id, settings, now), write=True)

    async def revoke_key(self, key_id: str, now: float) -> StoredKey | None:
        return await self._call(lambda c: sql.revoke(c, key_id, now), write=True)

    async def rotate_key(
        self, key_id: str, sha256: str, mask: str, grace_end: float, now: float
    ) -> StoredKey | None:
        return await self._call(
            lambda c: sql.rotate(c, key_id, sha256, mask, grace_end, now), write=True
        )

    async def keys_version(self) -> int:
        return await self._call(sql.version)

    async def load_keys(self) -> tuple[int, list[StoredKey]]:
        return await self._call(sql.load)
