"""The durable store's test database, on either backend (the fixtures are in ``conftest.py``):
``db.overflow(**fields)`` is the ``[overflow]`` table pointing at this test's database;
``db.rows(sql)`` reads or writes it behind the store's back (``?`` placeholders on both).
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import attrs

from runestone_proxy.config import OverflowConfig


@attrs.define
class StoreDb:
    backend: str
    path: Path
    url: str | None = None

    def overflow(self, **fields: Any) -> OverflowConfig:
        if self.backend == "sqlite":
            return OverflowConfig(database=str(self.path), **fields)
        return OverflowConfig(backend="postgres", url=self.url, **fields)

    def rows(self, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        """Run ``sql`` on a connection of its own (committed); the rows as dicts."""
        if self.backend == "sqlite":
            conn = sqlite3.connect(self.path, isolation_level=None)
            conn.row_factory = sqlite3.Row
            try:
                return [dict(r) for r in conn.execute(sql, params).fetchall()]
            finally:
                conn.close()
        import psycopg
        from psycopg.rows import dict_row

        from runestone_proxy.server.store_pg import translate

        assert self.url is not None
        with psycopg.connect(self.url, autocommit=True, row_factory=dict_row) as conn:
            cursor = conn.execute(translate(sql), params)
            return cursor.fetchall() if cursor.description else []

    def count(self, table: str) -> int:
        return int(self.rows(f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])
