"""The durable store's tests run against both backends: every test that takes ``db`` runs
once on SQLite (a file in ``tmp_path``) and once on PostgreSQL (a real server started once
per session by :mod:`pg_server`, a fresh database per test). ``db.overflow(**fields)`` is the
``[overflow]`` table pointing at this test's database; ``db.rows(sql)`` reads it behind the
store's back (``?`` placeholders on both).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pg_server
import pytest
from store_db_helpers import StoreDb


@pytest.fixture(scope="session")
def pg() -> Iterator[pg_server.PgServer]:
    if pg_server.pg_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    with pg_server.running() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> StoreDb:
    path = tmp_path / "jobs.sqlite3"
    if request.param == "sqlite":
        return StoreDb("sqlite", path)
    server: pg_server.PgServer = request.getfixturevalue("pg")
    return StoreDb("postgres", path, server.create_database())
