"""What the durable store asks of a database: the seam between :class:`~.store.Store` (group
commit, channels, error mapping) and the backend it runs on, SQLite (:mod:`.store_sqlite`,
embedded, one host) or PostgreSQL (:mod:`.store_pg`, one queue for a fleet).

A backend is a strategy with one job, :meth:`Backend.connect`: open, migrate and return a
:class:`Db`, the connection the store's plain SQL functions (:mod:`.store_sql`,
:mod:`.store_ledger_sql`) take. Those functions are written once, in the SQL both databases
speak (``?`` and ``:name`` placeholders, ``ON CONFLICT ... DO UPDATE``, ``CASE``); where the
two differ in a fragment, the function reads it from :attr:`Db.dialect`:

=============  ==================  ===========================================================
fragment       SQLite              PostgreSQL
=============  ==================  ===========================================================
lock_row       (nothing)           ``FOR UPDATE``: a row read then written stays ours until
                                   COMMIT (SQLite: ``BEGIN IMMEDIATE`` already excludes every
                                   other writer)
skip_locked    (nothing)           ``FOR UPDATE SKIP LOCKED``: a claim passes over the rows
                                   another gateway is claiming instead of waiting for them
row_id         ``rowid``           ``ctid``: a physical row, for batched deletes
=============  ==================  ===========================================================

and what differs in behaviour is a method of the :class:`Db` (``begin``: ``BEGIN IMMEDIATE``
vs ``BEGIN``; ``begin_read``: a snapshot; ``lock_tenants``: nothing vs advisory locks that
make the per-tenant cap exact across gateways). Every call on the store's connection happens
on the store's one worker thread; a long read (a usage report) takes a connection of its own
(:meth:`Backend.read_connection`) so that it never holds up the writer.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import attrs

__all__ = ["POSTGRES", "SQLITE", "Backend", "Db", "Dialect"]


@attrs.frozen
class Dialect:
    """The SQL fragments in which SQLite and PostgreSQL differ (see the module's table)."""

    name: str
    lock_row: str
    skip_locked: str
    row_id: str


SQLITE = Dialect("sqlite", lock_row="", skip_locked="", row_id="rowid")
POSTGRES = Dialect(
    "postgres", lock_row=" FOR UPDATE", skip_locked=" FOR UPDATE SKIP LOCKED", row_id="ctid"
)


class Db(Protocol):
    """One open connection (DB-API shaped, as ``sqlite3.Connection`` is): rows read by
    column name or position; ``execute`` returns a cursor with ``fetchone``, ``fetchall``,
    ``rowcount`` and iteration."""

    @property
    def dialect(self) -> Dialect: ...

    @property
    def Error(self) -> type[Exception]:  # the DB-API name
        """The driver's base exception: every failure of the database is one."""

    @property
    def value_errors(self) -> tuple[type[Exception], ...]:
        """Failures that mean "this value cannot be stored" (500), not "unavailable" (503)."""

    @property
    def in_transaction(self) -> bool: ...

    @property
    def broken(self) -> bool:
        """The connection is lost (server restarted, network cut): open a new one."""

    def execute(self, sql: str, parameters: Any = (), /) -> Any: ...

    def executemany(self, sql: str, seq_of_parameters: Iterable[Any], /) -> Any: ...

    def begin(self) -> None:
        """Start a write transaction."""

    def begin_read(self) -> None:
        """Start a read-only transaction that sees one snapshot, taken by its first
        statement (SQLite: a deferred ``BEGIN`` in WAL; PostgreSQL: ``REPEATABLE READ READ
        ONLY``), so that statement is the moment every later read is as of."""

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def lock_tenants(self, tenants: Sequence[str]) -> None:
        """Until COMMIT, no other gateway enqueues for ``tenants`` (sorted: no deadlock)."""

    def close(self) -> None: ...


class Backend(Protocol):
    """Where the store lives, and how to open it."""

    @property
    def shared(self) -> bool:
        """Other gateways write the same database (their enqueues and expired leases ring
        no bell here: the store looks every ``SHARED_POLL_S``)."""

    @property
    def where(self) -> str:
        """For logs and errors: the path, or the URL without its password."""

    def connect(self) -> Db:
        """Open, bring the schema up to date, return the connection. Raises
        ``ServiceUnavailable`` naming :attr:`where`. Runs on the store's worker thread."""

    def read_connection(self) -> Db:
        """A new connection for one long read, apart from the store's (closed by the
        caller): read-only where the backend can say so, never migrating, never creating
        the database. Raises ``ServiceUnavailable`` naming :attr:`where`. Blocking: call it
        off the event loop."""
