"""The queue's side of the durable store that is not enqueueing: :class:`JobsSide`, a base
of :class:`~runestone_proxy.server.store.Store` with what the drainer calls (claims, the
fenced outcomes, recovery, webhook leases, the retention sweep) and the reads the jobs API
makes. The SQL is in :mod:`.store_sql` (jobs, Responses) and :mod:`.store_ledger_sql` (the
usage ledger's retention).

Every operation takes the store's one way in (``Store._call``: its worker thread, writes in
one transaction, the driver's errors mapped to 503). Enqueueing is the store's own
(``Store.enqueue``: group commit); the rules the SQL applies (the job state table, lease
fencing, ``dead``) are in :mod:`runestone_proxy.gateway.overflow`.

How this works
--------------
* **Fair claims.** ``claim`` goes round-robin over the tenants the drainer says have
  capacity, starting after the tenant served last, and leases that tenant's oldest due job
  (on PostgreSQL passing over jobs another gateway is claiming: ``SKIP LOCKED``).
* **Webhooks** are claimed with a lease too (``due_webhooks``), so of several gateways on
  one database exactly one delivers each.
* **One sweep** deletes what is past retention (finished jobs, stored Responses, usage
  rows) and says when the next one is due (``Store._sweep_at``; saves that fall due sooner
  ring ``sweep_due``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, TypeVar

import structlog

from runestone_proxy import telemetry
from runestone_proxy.config import OverflowConfig
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.gateway.overflow import Job, JobStatus, WebhookStatus
from runestone_proxy.server import store_ledger_sql as ledger_sql
from runestone_proxy.server import store_sql as sql
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_values import Schedule, StoreStats

__all__ = ["WEBHOOK_LEASE_SLACK_S", "JobsSide"]

log = structlog.get_logger("runestone.store")
T = TypeVar("T")

#: A webhook delivery's lease beyond ``webhook_timeout_s`` (the POST is bounded by that).
WEBHOOK_LEASE_SLACK_S = 30.0


class JobsSide:
    """The drainer's and the jobs API's part of the store (a base of ``Store``, which owns
    the fields and the connection)."""

    config: OverflowConfig
    ledger_config: LedgerConfig
    stats: StoreStats
    _last_tenant: str | None
    _sweep_at: float | None

    if TYPE_CHECKING:

        async def _call(self, fn: Callable[[Db], T], *, write: bool = False) -> T: ...

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
