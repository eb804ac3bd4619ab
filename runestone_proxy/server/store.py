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
* **Stored Responses.** Bounded per record (``max_record_bytes``: the cap of a job's
  result; a larger one is not stored and says so with ``responses.not_stored``) and kept
  ``retention_s`` like finished jobs: reads hide an expired one at once (``clock``), the
  sweep deletes it. A save that is due for sweeping before anything the last sweep
  reported rings ``sweep_due`` (the drainer's sweep loop should wait on that bell).
* **Fair claims.** ``claim`` goes round-robin over the tenants the drainer says have
  capacity, starting after the tenant served last, and leases that tenant's oldest due job
  (on PostgreSQL passing over jobs another gateway is claiming: ``SKIP LOCKED``).
* **Webhooks** are claimed with a lease too (``due_webhooks``), so of several gateways on
  one database exactly one delivers each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TypeVar

import attrs
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, OverflowConfig, TenantConfig
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import GatewayError, RateLimited, ServiceUnavailable
from runestone_proxy.gateway.ledger import UsageRow
from runestone_proxy.gateway.overflow import Enqueued, Job, JobStatus, NewJob, WebhookStatus
from runestone_proxy.gateway.responses_store import StoredResponse, fits, report_not_stored
from runestone_proxy.server import store_ledger_sql as ledger_sql
from runestone_proxy.server import store_sql as sql
from runestone_proxy.server.store_db import Backend, Db
from runestone_proxy.server.store_keys import KeysSide
from runestone_proxy.server.store_ledger import PASS_MAX, LedgerBuffer, LedgerSide
from runestone_proxy.server.store_sqlite import SqliteBackend
from runestone_proxy.server.store_values import (
    RECORD_OVERHEAD_BYTES,
    Answer,
    Barrier,
    Delete,
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

#: A webhook delivery's lease beyond ``webhook_timeout_s`` (the POST is bounded by that).
WEBHOOK_LEASE_SLACK_S = 30.0
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
class Store(LedgerSide, KeysSide):
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

    # --- the one way in ----------------------------------------------------------------------

    async def _call_raw(self, fn: Callable[[], T]) -> T:
        if self.inline:
            return fn()
        return await trio.to_thread.run_sync(fn, limiter=self._limiter)

    async def _call(self, fn: Callable[[Db], T], *, write: bool = False) -> T:
        """Run ``fn(db)`` on the worker thread (in a transaction if ``write``), mapping the
        driver's errors to ``ServiceUnavailable`` (503) or, for a value it cannot store, a
        500 ``GatewayError``."""
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
            try:
                answers, refused = await self._call(self._batch_writer(batch, records), write=True)
            except GatewayError as exc:
                answers = [exc] * len(batch)
                self._ledger.put_back(records)  # retried with the next write or flush
            except BaseException:  # cancelled before the call ran: shutdown writes them
                self._ledger.put_back(records)
                raise
            else:
                self.stats.enqueue_batches += bool(batch)
                self._ledger_written(records, refused)
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

    # --- the drainer's side -----------------------------------------------------------------

    async def schedule(self, now: float) -> Schedule:
        return await self._call(
            lambda conn: Schedule(sql.due_by_tenant(conn, now), sql.next_due_at(conn, now))
        )

    async def claim(
        self, tenant_candidates: Collection[str], lease_s: float, now: float
    ) -> Job | None:
        """Lease the oldest due job of the next tenant (round-robin over
        ``tenant_candidates``) with a new token, counting the attempt; None if none is due.
        Due jobs claimed ``max_claims`` times with no outcome recorded are buried on the way
        (-> dead; counted in ``stats.dead``)."""
        buried: list[Job] = []

        def claim(conn: Db) -> Job | None:
            max_claims = self.config.max_claims
            job = sql.claim(
                conn, tenant_candidates, self._last_tenant, lease_s, now, max_claims, buried
            )
            if job is not None:
                self._last_tenant = job.tenant
            return job

        job = await self._call(claim, write=True)
        for dead in buried:  # committed: the transaction did not raise
            self.stats.dead += 1
            fields = {"tenant": dead.tenant, "job_id": dead.id, "request_id": dead.request_id}
            log.error("overflow.job.dead", **fields, claims=dead.claims)
            telemetry.emit("overflow.job.dead", **fields, claims=dead.claims)
        return job

    async def complete(
        self, job_id: str, lease_token: str, result: bytes, status: int, now: float
    ) -> bool:
        """running -> succeeded with ``result``, if the lease still holds (else False)."""
        return await self._call(
            lambda c: sql.finish(c, job_id, lease_token, JobStatus.SUCCEEDED, result, status, now),
            write=True,
        )

    async def fail(
        self,
        job_id: str,
        lease_token: str,
        error: bytes,
        status: int,
        retry_at: float | None,
        now: float,
    ) -> bool:
        """running -> queued again at ``retry_at``, or (``retry_at`` None) -> failed with the
        error envelope ``error`` as its result. Fenced like :meth:`complete`."""
        if retry_at is None:
            return await self._call(
                lambda c: sql.finish(c, job_id, lease_token, JobStatus.FAILED, error, status, now),
                write=True,
            )
        return await self._call(
            lambda c: sql.retry(c, job_id, lease_token, error, retry_at, now), write=True
        )

    async def release(self, job_id: str, lease_token: str, now: float) -> bool:
        """running -> queued at once, the attempt not counted (shutdown). Fenced."""
        return await self._call(lambda c: sql.release(c, job_id, lease_token, now), write=True)

    async def recover(self, now: float) -> int:
        """Expired leases (crashed runs) go back to the queue, due now. Returns how many."""
        return await self._call(lambda c: sql.recover(c, now), write=True)

    # --- reading -----------------------------------------------------------------------------

    async def get(self, job_id: str, tenant: str) -> Job | None:
        """The job, if it exists AND belongs to ``tenant`` (else None: ids leak nothing)."""
        return await self._call(lambda c: sql.select_for_tenant(c, job_id, tenant))

    async def find_idempotent(self, tenant: str, key: str, now: float | None = None) -> Job | None:
        """The job ``tenant`` created with Idempotency-Key ``key`` within
        ``idempotency_window_s``, if any (a read: the live path asks before it runs)."""
        since = (time.time() if now is None else now) - self.config.idempotency_window_s
        return await self._call(lambda c: sql.select_idempotent(c, tenant, key, since))

    # --- stored Responses (gateway.responses_store.ResponseStore) -----------------------------

    async def save_response(self, record: StoredResponse) -> None:
        """Commit ``record`` (group commit), or, over ``max_record_bytes``, store nothing and
        emit ``responses.not_stored``."""
        if not fits(record, self.max_record_bytes):
            self.stats.responses_not_stored += 1
            log.warning(
                "responses.not_stored",
                tenant=record.tenant,
                response_id=record.id,
                size_bytes=record.size,
                max_bytes=self.max_record_bytes,
            )
            report_not_stored(record, self.max_record_bytes)
            return
        await self._submit(record, self.clock())
        self.stats.responses_saved += 1
        self._sweep_by(record.created_at + self.config.retention_s)

    def _sweep_by(self, due: float | None) -> None:
        """Something falls due for sweeping at ``due``: ring ``sweep_due`` if that is before
        what the last sweep reported."""
        if due is not None and (self._sweep_at is None or due < self._sweep_at):
            self._sweep_at = due
            self.sweep_due.set()

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's record, unless it is past ``retention_s`` (swept or not yet)."""
        since = self.clock() - self.config.retention_s
        return await self._call(lambda c: sql.select_response(c, tenant, response_id, since))

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        """Delete the tenant's record (through the writer); False if none was within
        retention."""
        answer = await self._submit(Delete(tenant, response_id), self.clock())
        assert isinstance(answer, bool)
        return answer

    async def counts(self) -> dict[str, int]:
        """Jobs per status (for /health and tests)."""
        return await self._call(sql.counts)

    # --- webhooks and retention --------------------------------------------------------------

    async def due_webhooks(self, now: float, limit: int) -> tuple[list[Job], float | None]:
        """Pending deliveries due now (oldest first), each leased to this gateway for
        ``webhook_timeout_s`` + :data:`WEBHOOK_LEASE_SLACK_S`, and when the next one (not
        leased now) falls due."""
        lease_s = self.config.webhook_timeout_s + WEBHOOK_LEASE_SLACK_S

        def due(conn: Db) -> tuple[list[Job], float | None]:
            later = sql.next_webhook_at(conn, now)
            return sql.due_webhooks(conn, now, limit, lease_s), later

        return await self._call(due, write=True)

    async def webhook_attempted(
        self, job_id: str, to: WebhookStatus, next_at: float | None
    ) -> None:
        """Record one delivery attempt: delivered, pending again at ``next_at``, or failed."""
        await self._call(lambda c: sql.webhook_attempted(c, job_id, to, next_at), write=True)

    async def sweep(self, now: float) -> tuple[int, float | None]:
        """Delete jobs finished more than ``retention_s`` ago (not while their webhook is
        pending), Responses stored more than ``retention_s`` ago, and usage rows past the
        ledger's retentions (a bounded batch per pass: :func:`.store_ledger_sql.sweep`). Returns
        how many, and when the next one falls due for sweeping."""
        retention = self.config.retention_s

        def sweep(conn: Db) -> tuple[int, float | None]:
            deleted = sql.sweep(conn, now - retention) + sql.sweep_responses(conn, now - retention)
            found = (sql.oldest_finished(conn), sql.oldest_response(conn))
            due = [t + retention for t in found if t is not None]
            gone, ledger_due = ledger_sql.sweep(conn, now, self.ledger_config)
            due += [] if ledger_due is None else [ledger_due]
            return deleted + gone, min(due) if due else None

        deleted, self._sweep_at = await self._call(sweep, write=True)
        return deleted, self._sweep_at
