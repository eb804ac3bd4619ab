"""What the request flow needs from the durable job queue: the job-queue interface.

A request that finds its tenant full and asked for async handling is parked as a job
(``202 Accepted``); a client reads it back by id; an ``Idempotency-Key`` seen before answers
with the job it created then. Those are the only operations the request flow uses, so they
are the whole interface: a ``typing.Protocol``, which an implementation fits by its shape.
The embedded one is :class:`runestone_proxy.server.store.Store` (SQLite, group commit); a
PostgreSQL queue would sit beside it in ``server/`` and fit the same four members. The
drainer's side (claim, settle, webhooks, sweeps) is the store's own and not part of this.

The values it exchanges (:class:`NewJob`, :class:`Job`, :class:`Enqueued`) and the job's
state table live in :mod:`.overflow`. A job keeps everything its later run needs and the
request carried: the raw body, and the client headers a native provider receives
(``NewJob.headers``: ``anthropic-version``, ``anthropic-beta``, ... of a Messages request),
so a queued request reaches its provider as the live one would have. Failures are
:mod:`runestone_proxy.errors`: 503 ``ServiceUnavailable`` when the queue cannot be reached,
429 ``RateLimited`` past the tenant's ``max_queued_jobs``.
"""

from __future__ import annotations

from typing import Protocol

from runestone_proxy.gateway.overflow import Enqueued, Job, NewJob


class JobQueue(Protocol):
    """A durable queue of jobs, each owned by one tenant."""

    @property
    def is_open(self) -> bool:
        """Whether the queue takes and answers requests now (false before start, after close)."""

    async def enqueue(self, job: NewJob) -> Enqueued:
        """Commit ``job`` durably before returning, or return the tenant's earlier job with
        the same idempotency key (``created`` false)."""

    async def get(self, job_id: str, tenant: str) -> Job | None:
        """The job, if it exists and belongs to ``tenant`` (else None: ids leak nothing)."""

    async def find_idempotent(self, tenant: str, key: str) -> Job | None:
        """The job ``tenant`` created with Idempotency-Key ``key`` within the window, if any."""
