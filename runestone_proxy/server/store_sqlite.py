"""The durable store on SQLite (the embedded default: one file, one host): the
:class:`~.store_db.Backend` that opens it and the :class:`~.store_db.Db` it returns.

* **Durable.** WAL journal with ``synchronous=FULL``: a commit returns only once the WAL is
  fsynced, so an acknowledged (202) job survives a crash or a power cut.
* **One writer.** Write transactions start with ``BEGIN IMMEDIATE`` (the write lock taken
  at once, not on the first write), and ``busy_timeout`` bounds the wait for it; another
  process holding it longer is a 503 (``database is locked``).
* **Path.** A relative ``overflow.database`` lives under ``$RUNESTONE_STATE_DIR`` (systemd
  ``StateDirectory=``) when set, else the working directory (:func:`.store_values.resolve_path`).

The connection is ``sqlite3.Connection`` itself (a subclass adding the few members the
store's SQL reads), so the SQL functions cost nothing extra on SQLite.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path

import attrs

from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.server import store_schema as schema
from runestone_proxy.server.store_db import SQLITE, Dialect

__all__ = ["SqliteBackend", "SqliteDb"]


class SqliteDb(sqlite3.Connection):
    """``sqlite3.Connection`` as a :class:`~.store_db.Db`."""

    dialect: Dialect = SQLITE
    #: ``sqlite3`` raises ``ValueError``/``OverflowError`` (mapped by the store) for a value
    #: it cannot bind; none of its own errors means that.
    value_errors: tuple[type[Exception], ...] = ()
    broken = False

    def begin(self) -> None:
        self.execute("BEGIN IMMEDIATE")

    def begin_read(self) -> None:
        """A deferred ``BEGIN``: the first read takes the WAL snapshot the rest see, and
        no write lock is ever asked for (the writer and this reader never wait on each
        other)."""
        self.execute("BEGIN")

    def lock_tenants(self, tenants: Sequence[str]) -> None:
        """Nothing: ``BEGIN IMMEDIATE`` already keeps every other writer out."""


@attrs.frozen
class SqliteBackend:
    path: Path
    #: Several processes on this file (``server.workers`` > 1): the drainer polls, as on a
    #: shared PostgreSQL. One gateway alone: every change rings its own bells.
    shared: bool = False

    @property
    def where(self) -> str:
        return str(self.path)

    def connect(self) -> SqliteDb:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(
                self.path, check_same_thread=False, isolation_level=None, factory=SqliteDb
            )
            conn.row_factory = sqlite3.Row
            conn.text_factory = schema.decode_text
            # The timeout first: switching a new file to WAL takes a lock that a sibling
            # worker opening the same file at the same moment may hold.
            conn.execute("PRAGMA busy_timeout=5000")
            mode = _wal(conn)
            if mode != "wal":
                raise sqlite3.OperationalError(f"journal_mode is {mode}, not wal")
            conn.execute("PRAGMA synchronous=FULL")
            schema.migrate(conn)
        except (OSError, sqlite3.Error) as exc:
            raise ServiceUnavailable(f"The job store {self.path} cannot be opened: {exc}") from exc
        return conn

    def read_connection(self) -> SqliteDb:
        """``mode=ro``: SQLite itself refuses every write on it, and a missing file is an
        error rather than a new empty database."""
        try:
            uri = f"{self.path.absolute().as_uri()}?mode=ro"
            conn = sqlite3.connect(uri, uri=True, isolation_level=None, factory=SqliteDb)
            conn.row_factory = sqlite3.Row
            conn.text_factory = schema.decode_text
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise ServiceUnavailable(f"The job store {self.path} cannot be read: {exc}") from exc
        return conn


#: Tries of the switch to WAL while a sibling holds the new file's lock (50 ms apart).
_WAL_TRIES = 100


def _wal(conn: sqlite3.Connection) -> str:
    """``PRAGMA journal_mode=WAL``, retried while the file is locked: SQLite answers the
    switch ``database is locked`` at once, without its busy handler, while another
    connection (a sibling worker creating or migrating the same new file) holds the lock.
    WAL mode is persistent, so once the sibling has switched, the next try just reads it."""
    for _ in range(_WAL_TRIES - 1):
        try:
            mode: str = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            return mode
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc):
                raise
            time.sleep(0.05)  # on the store's worker thread, never the event loop
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    return mode
