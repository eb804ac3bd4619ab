"""The durable store's tests run against both backends: every test that takes ``db`` runs
once on SQLite (a file in ``tmp_path``) and once on PostgreSQL (a real server started once
per session: the ``pg`` fixture of ``tests/conftest.py``; a fresh database per test).
``db.overflow(**fields)`` is the ``[overflow]`` table pointing at this test's database;
``db.rows(sql)`` reads it behind the store's back (``?`` placeholders on both).
"""

from __future__ import annotations

from pathlib import Path

import pg_server
import pytest
from store_db_helpers import StoreDb


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> StoreDb:
    path = tmp_path / "jobs.sqlite3"
    if request.param == "sqlite":
        return StoreDb("sqlite", path)
    server: pg_server.PgServer = request.getfixturevalue("pg")
    return StoreDb("postgres", path, server.create_database())
