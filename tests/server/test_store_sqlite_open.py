"""Opening the SQLite store while a sibling worker holds the new file's lock."""

from __future__ import annotations

import sqlite3
from typing import Any

import pytest

from runestone_proxy.server import store_sqlite


class _Locked:
    """A connection whose switch to WAL is refused ``database is locked`` ``times`` times."""

    def __init__(self, times: int, error: str = "database is locked") -> None:
        self.times = times
        self.error = error
        self.tries = 0

    def execute(self, sql: str) -> Any:
        assert sql == "PRAGMA journal_mode=WAL"
        self.tries += 1
        if self.tries <= self.times:
            raise sqlite3.OperationalError(self.error)
        return self

    def fetchone(self) -> tuple[str]:
        return ("wal",)


def test_the_switch_to_wal_is_tried_again_while_a_sibling_holds_the_lock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_sqlite.time, "sleep", lambda _s: None)
    conn = _Locked(times=3)
    assert store_sqlite._wal(conn) == "wal"  # type: ignore[arg-type]
    assert conn.tries == 4


def test_other_errors_and_a_lock_that_never_goes_are_raised(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(store_sqlite.time, "sleep", lambda _s: None)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        store_sqlite._wal(_Locked(times=1, error="disk I/O error"))  # type: ignore[arg-type]
    forever = _Locked(times=10**6)
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        store_sqlite._wal(forever)  # type: ignore[arg-type]
    assert forever.tries == store_sqlite._WAL_TRIES
