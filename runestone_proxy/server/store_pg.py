"""The durable store on PostgreSQL (``[overflow] backend = "postgres"``): one queue, one
ledger and one set of stored Responses shared by every gateway of a fleet. The
:class:`~.store_db.Backend` that opens it and the :class:`~.store_db.Db` adapter the
store's SQL runs on (the SQL is SQLite's, written once: :mod:`.store_db`).

How this works
--------------
* **Driver.** psycopg 3, synchronous, on the store's one worker thread exactly as
  ``sqlite3`` is (``trio.to_thread`` behind a ``CapacityLimiter(1)``): one connection per
  gateway. The store already funnels every write through one writer with group commit, and
  a claim is a short transaction, so a pool would add ordering questions and no
  throughput that matters here; other gateways are the concurrency, and PostgreSQL's row
  locks keep them apart.
* **Adapter.** :class:`PgDb` turns the shared SQL's ``?`` and ``:name`` placeholders into
  psycopg's ``%s`` and ``%(name)s`` (once per statement text, cached) and returns rows
  readable by name and position, as ``sqlite3.Row`` is.
* **Durable.** ``autocommit`` with explicit ``BEGIN``/``COMMIT``; ``COMMIT`` returns once
  the WAL is flushed (``synchronous_commit``, raised to ``on`` if the server says
  ``off``), so a 202 is only answered for a committed job. A ``COMMIT`` whose answer is
  lost with the connection is a 503 though it may have committed: the client's retry with
  its Idempotency-Key finds the job.
* **Across gateways.** Claims take rows with ``FOR UPDATE SKIP LOCKED`` (no two gateways
  claim one job, none waits for another's claim); settling locks the row from the fence
  check to the write; an enqueue takes a transaction-level advisory lock per tenant
  (sorted, so batches never deadlock) before counting ``max_queued_jobs`` and looking up
  Idempotency-Keys, so the cap and the keys are exact across the fleet; webhook deliveries
  are leased (:func:`.store_sql.due_webhooks`).
* **Time.** Times are the gateways' own clocks, as on SQLite (leases, retries and
  retention compare them): keep the hosts on NTP. Opening compares this host's clock with
  the server's and warns (``store.clock_skew``) past :data:`SKEW_WARN_S`.
* **Errors.** Every ``psycopg.Error`` is a 503 (``ServiceUnavailable``) but a
  ``DataError`` (a value PostgreSQL cannot store: an integer out of range), a 500, as
  SQLite's are. ``lock_timeout`` (5 s, like SQLite's ``busy_timeout``) bounds a wait for
  a lock. A lost connection is replaced on the next call.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import attrs
import psycopg
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus

from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.server import store_pg_schema as schema
from runestone_proxy.server.store_db import POSTGRES, Dialect

if TYPE_CHECKING:
    from psycopg.rows import RowMaker

__all__ = ["TENANT_LOCK", "PgBackend", "PgDb", "translate"]

log = structlog.get_logger("runestone.store")

#: ``pg_advisory_xact_lock(TENANT_LOCK, hashtext(tenant))``: one enqueue batch per tenant at a
#: time across the fleet. ('RUNE')
TENANT_LOCK = 0x52554E45
#: Warn when the server's clock and this host's differ by more than this (leases are
#: compared across hosts).
SKEW_WARN_S = 1.0
#: How long a statement waits for a lock before the call fails (503).
LOCK_TIMEOUT_MS = 5000

_TOKEN = re.compile(r"'(?:[^']|'')*'|\?|:([A-Za-z_]\w*)|%")


@functools.lru_cache(maxsize=1024)
def translate(sql: str) -> str:
    """``?`` -> ``%s``, ``:name`` -> ``%(name)s``, ``%`` -> ``%%``; quoted text untouched."""

    def one(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "?":
            return "%s"
        if token == "%":
            return "%%"
        if match.group(1) is not None:
            return f"%({match.group(1)})s"
        return token  # a quoted literal

    return _TOKEN.sub(one, sql)


class PgRow(tuple[Any, ...]):
    """A row read by position or by column name (as ``sqlite3.Row``)."""

    __slots__ = ()
    _index: ClassVar[dict[str, int]] = {}

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            return tuple.__getitem__(self, self._index[key])
        return tuple.__getitem__(self, key)

    def keys(self) -> list[str]:
        return list(self._index)


@functools.lru_cache(maxsize=256)
def _row_type(names: tuple[str, ...]) -> type[PgRow]:
    index = {name: i for i, name in enumerate(names)}
    return type("PgRow", (PgRow,), {"__slots__": (), "_index": index})


def _pg_row(cursor: Any) -> RowMaker[PgRow]:
    description = cursor.description
    row_type = _row_type(tuple(c.name for c in description) if description else ())
    return row_type


class PgDb:
    """A psycopg connection as a :class:`~.store_db.Db`."""

    dialect: Dialect = POSTGRES
    Error: type[Exception] = psycopg.Error
    value_errors: tuple[type[Exception], ...] = (psycopg.DataError,)

    def __init__(self, conn: psycopg.Connection[PgRow]) -> None:
        self._conn = conn

    def __repr__(self) -> str:
        return f"<PgDb {self._conn.info.host}:{self._conn.info.port}/{self._conn.info.dbname}>"

    @property
    def in_transaction(self) -> bool:
        return self._conn.info.transaction_status != TransactionStatus.IDLE

    @property
    def broken(self) -> bool:
        return self._conn.broken or self._conn.closed

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[PgRow]:
        return self._conn.execute(translate(sql), parameters)

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> psycopg.Cursor[PgRow]:
        cursor = self._conn.cursor()
        cursor.executemany(translate(sql), seq_of_parameters)
        return cursor

    def begin(self) -> None:
        self._conn.execute("BEGIN")

    def begin_read(self) -> None:
        """``REPEATABLE READ``: the snapshot is taken by the first statement and kept to
        the end (``READ COMMITTED``, the default, would take one per statement)."""
        self._conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

    def commit(self) -> None:
        self._conn.execute("COMMIT")

    def rollback(self) -> None:
        self._conn.execute("ROLLBACK")

    def lock_tenants(self, tenants: Sequence[str]) -> None:
        for tenant in tenants:
            self._conn.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s))", (TENANT_LOCK, tenant)
            )

    def close(self) -> None:
        self._conn.close()


@attrs.frozen
class PgBackend:
    url: str = attrs.field(repr=False)
    #: Wall clock compared with the server's at open.
    clock: Any = attrs.field(default=time.time, repr=False, eq=False)
    #: Several gateways share the database.
    shared = True

    @property
    def where(self) -> str:
        """``postgresql://user@host:port/db``, never the password."""
        try:
            info = conninfo_to_dict(self.url)
        except psycopg.Error:
            return "postgresql://(unparsable URL)"
        user = f"{info['user']}@" if info.get("user") else ""
        port = f":{info['port']}" if info.get("port") else ""
        return f"postgresql://{user}{info.get('host', '')}{port}/{info.get('dbname', '')}"

    def connect(self) -> PgDb:
        try:
            conn = psycopg.connect(self.url, autocommit=True, row_factory=_pg_row)
        except psycopg.Error as exc:
            raise ServiceUnavailable(f"The job store {self.where} cannot be opened: {exc}") from exc
        db = PgDb(conn)
        try:
            conn.execute(f"SET lock_timeout = {LOCK_TIMEOUT_MS}")
            if conn.execute("SHOW synchronous_commit").fetchone() == ("off",):
                log.warning("store.synchronous_commit", was="off", now="on")
                conn.execute("SET synchronous_commit = on")
            schema.migrate(db)
            self._check_clock(db)
        except (psycopg.Error, schema.SchemaTooNew) as exc:
            db.close()
            raise ServiceUnavailable(f"The job store {self.where} cannot be opened: {exc}") from exc
        return db

    def read_connection(self) -> PgDb:
        """A new connection of its own (the store's is busy with the writer), for one read;
        the schema is the store's to migrate, not this one's."""
        try:
            conn = psycopg.connect(self.url, autocommit=True, row_factory=_pg_row)
        except psycopg.Error as exc:
            raise ServiceUnavailable(f"The job store {self.where} cannot be read: {exc}") from exc
        return PgDb(conn)

    def _check_clock(self, db: PgDb) -> None:
        before = self.clock()
        row = db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())").fetchone()
        assert row is not None
        skew = float(row[0]) - (before + self.clock()) / 2
        if abs(skew) > SKEW_WARN_S:
            log.warning("store.clock_skew", skew_s=round(skew, 3), where=self.where)
