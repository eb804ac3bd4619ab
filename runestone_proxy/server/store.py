"""The durable store: one database, one connection, one thread. It holds the overflow
queue's jobs, the stored Responses (conversation state, gateway/responses_store.py), the
usage ledger (gateway/ledger.py; its buffer, SQL and reads are in :mod:`.store_ledger`) and
the API keys made at run time (gateway/api_keys.py; :mod:`.store_keys`).

The database is the backend's (a strategy, :mod:`.store_db`): SQLite by default
(:mod:`.store_sqlite`, one host) or PostgreSQL (:mod:`.store_pg`, one queue shared by a
fleet of gateways), chosen by ``[overflow] backend``. This module is the same for both: it
owns the database's lifecycle and the way in: every operation is a plain function of
:mod:`runestone_proxy.server.store_sql` run on the worker thread, the writing ones inside
one transaction (``BEGIN IMMEDIATE`` or ``BEGIN`` ... ``COMMIT``). Everything above this
module speaks :mod:`runestone_proxy.errors`: the driver's exceptions are mapped here, once
(to 503 ``ServiceUnavailable``: "database is locked", a lock timeout, disk full, I/O
errors, a lost connection), and so are the ones binding a value raises (``ValueError`` such
as ``UnicodeEncodeError``, ``OverflowError``, PostgreSQL's ``DataError``: 500, the value
cannot be stored), so a write that fails never escapes as a foreign exception and takes a
caller's task (the drainer's) down.

How this works
--------------
* **One connection, serialised.** The connection is used only through
  :meth:`Store._call`, i.e. ``trio.to_thread.run_sync`` behind a ``CapacityLimiter(1)``:
  one database call at a time, never on the event loop. (Tests on a ``MockClock`` pass
  ``inline=True``: calls then run on the loop's thread, so the mock clock cannot jump ahead
  while a worker thread is busy.) A connection the backend reports broken (PostgreSQL
  restarted) is replaced on the next call.
* **Durable.** A commit returns only once it is on disk (SQLite: WAL with
  ``synchronous=FULL``; PostgreSQL: ``synchronous_commit``), so an acknowledged (202) job
  survives a crash or a power cut.
* **Group commit.** ``enqueue`` does not write itself: it hands its job to the writer task
  over a channel and waits. The writer takes everything pending (up to
  ``group_commit_max_batch``), commits it in ONE transaction (one fsync), then wakes each
  caller with its own answer (the job, its idempotent twin, or 429 past the tenant's cap).
  One caller alone is committed at once, with no artificial delay; under load, the jobs
  that arrive while a commit is in flight form the next group. Saving and deleting a
  stored Response take the same way (one writer, shared commits, no fsync of their own),
  and so do usage records: ``record`` only buffers them and rings the writer.
* **Its parts.** The jobs' other operations (claims, outcomes, webhooks, the sweep, reads)
  are :class:`~.store_jobs.JobsSide`, stored Responses :class:`~.store_responses.ResponsesSide`,
  the usage ledger :class:`~.store_ledger.LedgerSide`, API keys
  :class:`~.store_keys.KeysSide`: bases of :class:`Store`, which owns the fields, the
  connection and the writer they all go through.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
import structlog
import trio

from runestone_proxy.config import Config, OverflowConfig, TenantConfig
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import GatewayError, RateLimited, ServiceUnavailable
from runestone_proxy.gateway.ledger import UsageRow
from runestone_proxy.gateway.overflow import Enqueued, NewJob
from runestone_proxy.gateway.responses_store import StoredResponse
from runestone_proxy.server import store_ledger_sql as ledger_sql
from runestone_proxy.server import store_sql as sql
from runestone_proxy.server.store_db import Backend, Db
from runestone_proxy.server.store_jobs import JobsSide
from runestone_proxy.server.store_keys import KeysSide
from runestone_proxy.server.store_ledger import PASS_MAX, LedgerBuffer, LedgerSide
from runestone_proxy.server.store_responses import ResponsesSide
from runestone_proxy.server.store_sqlite import SqliteBackend
from runestone_proxy.server.store_values import (
    RECORD_OVERHEAD_BYTES,
    Answer,
    Barrier,
    Pending,
    Schedule,
    StoreStats,
    Wakeup,
    Write,
    resolve_path,
)

__all__ = ["RECORD_OVERHEAD_BYTES", "Schedule", "Store", "StoreStats", "Wakeup", "resolve_path"]

log = structlog.get_logger("runestone.store")
T = TypeVar("T")

#: On a shared database, how often the drainer's claim and webhook loops look again: other
#: gateways' enqueues, retries and expired leases ring no bell in this process.
SHARED_POLL_S = 1.0


def as_backend(where: Backend | Path) -> Backend:
    """A path is an SQLite database (as the store was first constructed)."""
    return SqliteBackend(where) if isinstance(where, Path) else where


def backend_from_config(
    config: OverflowConfig, env: Mapping[str, str], *, shared: bool = False
) -> Backend:
    """``[overflow] backend``: the SQLite file (``database``) or PostgreSQL (``url``, which
    ``RUNESTONE_OVERFLOW_URL`` overrides when the config is loaded). ``shared``: other
    processes use the same SQLite file (``server.workers`` > 1)."""
    if config.backend == "sqlite":
        return SqliteBackend(resolve_path(config.database, env), shared=shared)
    assert config.url is not None  # OverflowConfig refuses postgres without a url
    try:
        from runestone_proxy.server.store_pg import PgBackend
    except ImportError as exc:  # the driver is an extra: pip install 'runestone-proxy[postgres]'
        raise ServiceUnavailable(
            '[overflow] backend = "postgres" needs psycopg: pip install '
            f"'runestone-proxy[postgres]' ({exc})"
        ) from exc
    return PgBackend(config.url)


@attrs.define(eq=False)
class Store(JobsSide, ResponsesSide, LedgerSide, KeysSide):
    #: Where the database lives (a ``Path`` is an SQLite file).
    backend: Backend = attrs.field(converter=as_backend)
    config: OverflowConfig
    tenants: Mapping[str, TenantConfig] = attrs.Factory(dict)
    inline: bool = False
    #: A stored Response's bound (``upstream.max_response_bytes`` + the overhead).
    max_record_bytes: int = 32 * 1024 * 1024 + RECORD_OVERHEAD_BYTES
    #: Wall clock for retention on reads; tests pass their own.
    clock: Callable[[], float] = time.time
    ledger_config: LedgerConfig = attrs.Factory(LedgerConfig)
    #: Rung whenever an enqueue created a job; the drainer waits on it.
    wakeup: Wakeup = attrs.Factory(Wakeup)
    #: Rung when a saved Response falls due for sweeping before ``_sweep_at``.
    sweep_due: Wakeup = attrs.Factory(Wakeup)
    #: Rung (on a shared database) for the drainer's webhook loop.
    webhooks_due: Wakeup = attrs.Factory(Wakeup)
    stats: StoreStats = attrs.Factory(StoreStats)
    _ledger: LedgerBuffer = attrs.field(
        init=False, default=attrs.Factory(lambda s: LedgerBuffer(s.stats), takes_self=True)
    )
    _db: Db | None = attrs.field(default=None, repr=False)
    _limiter: trio.CapacityLimiter = attrs.Factory(lambda: trio.CapacityLimiter(1))
    #: Items for the writer; None only rings it (usage records are pending).
    _send: trio.MemorySendChannel[Pending | None] | None = attrs.field(default=None, repr=False)
    _last_tenant: str | None = None
    #: When the last sweep said the next one is due (None: nothing to sweep).
    _sweep_at: float | None = None

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str], *, inline: bool = False) -> Store:
        # Workers share one SQLite file: a sibling's enqueue rings no bell here, so poll.
        backend = backend_from_config(config.overflow, env, shared=config.server.workers != 1)
        cap = config.upstream.max_response_bytes + RECORD_OVERHEAD_BYTES
        tenants = dict(config.tenants)
        return cls(backend, config.overflow, tenants, inline, cap, ledger_config=config.ledger)

    @property
    def path(self) -> Path:
        """The SQLite file (an SQLite store only)."""
        if not isinstance(self.backend, SqliteBackend):
            raise AttributeError("a PostgreSQL store has no path")
        return self.backend.path

    def apply_config(self, config: Config) -> None:
        """Reload hook: new caps and timings (a new database or backend needs a restart)."""
        self.config = config.overflow
        self.tenants = dict(config.tenants)
        self.ledger_config = config.ledger

    def max_queued(self, tenant: str) -> int:
        return self.tenants.get(tenant, TenantConfig()).max_queued_jobs

    @property
    def is_open(self) -> bool:
        return self._send is not None

    # --- lifecycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, report started, run the group-commit writer until cancelled,
        then write the usage records still pending and close. Opening fails with
        ``ServiceUnavailable`` (naming the path or the URL, without its password)."""
        self._db = await self._call_raw(self.backend.connect)
        size = self.config.group_commit_max_batch
        send, receive = trio.open_memory_channel[Pending | None](size)
        self._send = send
        try:
            log.info("store.open", where=self.backend.where)
            task_status.started()
            if self._ledger:
                send.send_nowait(None)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._flush_ledger_every)
                if self.backend.shared:
                    nursery.start_soon(self._poll_shared)
                await self._writer(receive)
        finally:
            self._send = None  # new calls fail fast with ServiceUnavailable
            with trio.CancelScope(shield=True):
                await self._flush_ledger()
                db, self._db = self._db, None
                if db is not None:
                    await self._call_raw(db.close)  # after the call in flight, if any

    async def _flush_ledger_every(self) -> None:
        """Ring the writer for the usage records waiting, once per ``flush_interval_s``."""
        while True:
            await trio.sleep(self.ledger_config.flush_interval_s)
            if self._ledger and not self._ledger.rung:
                self._ring()

    async def _poll_shared(self) -> None:
        """Ring the drainer's claim and webhook loops every :data:`SHARED_POLL_S`: jobs
        another gateway queued or let expire, and webhooks it left pending, are ours to run
        too. (One cheap query per loop per second; LISTEN/NOTIFY would not cover a dead
        gateway's expired leases.)"""
        while True:
            await trio.sleep(SHARED_POLL_S)
            self.wakeup.set()
            self.webhooks_due.set()

    def _sweep_by(self, due: float | None) -> None:
        """Something falls due for sweeping at ``due``: ring ``sweep_due`` if that is before
        what the last sweep reported."""
        if due is not None and (self._sweep_at is None or due < self._sweep_at):
            self._sweep_at = due
            self.sweep_due.set()

    # --- the one way in ----------------------------------------------------------------------

    async def _call_raw(self, fn: Callable[[], T]) -> T:
        if self.inline:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _call(
        self,
        fn: Callable[[Db], T],
        *,
        write: bool = False,
        committed: Callable[[], object] | None = None,
    ) -> T:
        """Run ``fn(db)`` on the worker thread (in a transaction if ``write``), mapping the
        driver's errors to ``ServiceUnavailable`` (503) or, for a value it cannot store, a
        500 ``GatewayError``. ``committed`` runs on the worker thread once the transaction
        is committed (not if it failed)."""
        if self._db is None:
            raise ServiceUnavailable("The job store is not open.")

        def guarded() -> T:
            db = self._db
            if db is None:
                raise ServiceUnavailable("The job store is not open.")
            if db.broken:  # the connection was lost: a new one (or a 503 naming why)
                log.warning("store.reconnect", where=self.backend.where)
                db.close()
                self._db = db = self.backend.connect()
            try:
                if not write:
                    return fn(db)
                db.begin()
                result = fn(db)
                db.commit()
                self.stats.transactions += 1
                if committed is not None:
                    committed()
                return result
            except db.value_errors as exc:  # a value the database refused
                log.error("store.error", error=str(exc), kind=type(exc).__name__)
                raise GatewayError(f"The job store cannot store a value: {exc}") from exc
            except db.Error as exc:
                log.error("store.error", error=str(exc), kind=type(exc).__name__)
                raise ServiceUnavailable(f"The job store is unavailable: {exc}") from exc
            except (ValueError, OverflowError) as exc:  # a value the driver cannot bind
                log.exception("store.error", kind=type(exc).__name__)
                raise GatewayError(f"The job store cannot store a value: {exc}") from exc
            finally:
                if not db.broken and db.in_transaction:  # failed mid-transaction: undo it all
                    try:
                        db.rollback()
                    except db.Error:
                        log.error("store.rollback.failed")

        return await self._call_raw(guarded)

    # --- enqueue (group commit) --------------------------------------------------------------

    async def enqueue(self, job: NewJob, now: float | None = None) -> Enqueued:
        """Commit ``job`` durably, or find its idempotent twin. Raises ``RateLimited`` (429)
        past the tenant's ``max_queued_jobs``, ``ServiceUnavailable`` if the store fails.

        A caller cancelled after handing its job over may still see it committed."""
        answer = await self._submit(job, self.clock() if now is None else now)
        assert isinstance(answer, Enqueued)
        return answer

    async def _submit(self, item: Write, now: float) -> Answer:
        """Hand ``item`` to the writer and wait for its group's commit."""
        if self._send is None:
            raise ServiceUnavailable("The job store is not open.")
        pending = Pending(item, now)
        await self._send.send(pending)
        await pending.done.wait()
        assert pending.answer is not None
        if isinstance(pending.answer, GatewayError):
            raise pending.answer
        return pending.answer

    async def _writer(self, receive: trio.MemoryReceiveChannel[Pending | None]) -> None:
        limit = self.config.group_commit_max_batch
        async for first in receive:
            batch = [] if first is None else [first]
            while len(batch) < limit:
                try:
                    item = receive.receive_nowait()
                except trio.WouldBlock:
                    break
                if item is not None:
                    batch.append(item)
            records = self._ledger.take()
            if not batch and not records:
                continue
            answers: list[Answer | GatewayError]
            count, due = len(records), ledger_sql.first_due(records, self.ledger_config)
            try:
                # Once committed the records are freed on the worker thread, not on the event
                # loop after the next pass: ~6 fewer cache misses a request on the loop
                # (README, "Usage ledger"). A failed pass keeps them for put_back.
                answers, refused = await self._call(
                    self._batch_writer(batch, records), write=True, committed=records.clear
                )
            except GatewayError as exc:
                answers = [exc] * len(batch)
                self._ledger.put_back(records)  # retried with the next write or flush
            except BaseException:  # cancelled before the call ran: shutdown writes them
                self._ledger.put_back(records)
                raise
            else:
                self.stats.enqueue_batches += bool(batch)
                self._ledger_counted(count, refused, due)
            for pending, answer in zip(batch, answers, strict=True):
                pending.answer = answer
                pending.done.set()
            if any(isinstance(a, Enqueued) and a.created for a in answers):
                self.wakeup.set()
            if len(self._ledger) >= PASS_MAX and not self._ledger.rung:
                self._ring()  # more than a pass's worth waits (the rest: the flush timer)

    def _batch_writer(
        self, batch: list[Pending], records: list[UsageRow]
    ) -> Callable[[Db], tuple[list[Answer | GatewayError], list[UsageRow]]]:
        def write(conn: Db) -> tuple[list[Answer | GatewayError], list[UsageRow]]:
            # No other gateway enqueues for these tenants until COMMIT: their caps and
            # Idempotency-Keys are counted and looked up race-free (SQLite: a no-op).
            conn.lock_tenants(sorted({p.item.tenant for p in batch if isinstance(p.item, NewJob)}))
            active: dict[str, int] = {}  # tenant -> queued + running, kept current in the batch
            answers = [self._write_one(conn, p, active) for p in batch]
            self.stats.enqueued += sum(isinstance(a, Enqueued) and a.created for a in answers)
            return answers, ledger_sql.write(conn, records)  # under its own savepoint

        return write

    def _write_one(
        self, conn: Db, pending: Pending, active: dict[str, int]
    ) -> Answer | GatewayError:
        item = pending.item
        if isinstance(item, NewJob):
            return self._enqueue_one(conn, item, pending.now, active)
        if isinstance(item, StoredResponse):
            sql.save_response(conn, item)
            return True
        if isinstance(item, Barrier):
            return True
        since = pending.now - self.config.retention_s
        return sql.delete_response(conn, item.tenant, item.id, since)

    def _enqueue_one(
        self, conn: Db, job: NewJob, now: float, active: dict[str, int]
    ) -> Enqueued | GatewayError:
        if job.tenant not in active:
            active[job.tenant] = sql.active_count(conn, job.tenant)
        if job.idempotency_key is not None:
            since = now - self.config.idempotency_window_s
            twin = sql.find_idempotent(conn, job.tenant, job.idempotency_key, since)
            if twin is not None:
                return Enqueued(twin, False, active[job.tenant])
        cap = self.max_queued(job.tenant)
        if active[job.tenant] >= cap:
            return RateLimited(
                f"Tenant '{job.tenant}' already has {active[job.tenant]} unfinished jobs, the "
                f"most it may have ({cap}). Try again once some have finished.",
                code="too_many_queued_jobs",
                retry_after_s=self.config.backoff_base_s,
            )
        stored = sql.insert(conn, job, now)
        active[job.tenant] += 1
        return Enqueued(stored, True, active[job.tenant])
