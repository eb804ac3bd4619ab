"""The overflow drainer: runs queued jobs as tenants' capacity frees, delivers webhooks, and
sweeps finished jobs past their retention. One long-lived task tree in the app's nursery::

    run_drainer                       started with nursery.start; reports the Drainer
    ├── claim loop                    claims due jobs, fairly, for tenants with capacity
    │   └── job task (one per job)    holds the tenant's slot; runner(job); settles the lease
    ├── capacity forwarder            capacity.wait_freed() -> ring the claim loop's bell
    ├── webhook loop                  leases the due webhooks
    │   └── delivery (one per job)    POSTs it signed, records the attempt (webhook_delivery.py)
    └── sweep loop                    deletes jobs finished more than retention_s ago

How this works
--------------
Nothing polls. Each loop does what is due, then waits on its doorbell (a
:class:`~runestone_proxy.server.store.Wakeup`) with, at most, an honest deadline: the
earliest retry or lease expiry (claims), the next webhook retry, the next job to age out of
retention. The claim loop's bell rings when an enqueue commits a job, when a capacity slot
frees (``capacity.wait_freed``, or one of our own jobs ending), and when a job is put back
for a retry. A claimed job's task first takes ``capacity.job_slot(tenant)``; until it holds
the slot the claim loop waits (``nursery.start``), so one free slot is never claimed twice.
A job that waits for its slot past half its lease (limits shared on Redis: another process
took the room first) is given back, uncounted, and claimed again later.

Every run is bounded by its lease (``lease_s``): a run that outlives it is cancelled and
counts as a retryable timeout, so leases are never renewed and expiry means the process
died. Results are stored through the lease token (fencing, see gateway/overflow.py). The
decision after a run is the pure :func:`~runestone_proxy.gateway.overflow.settle`.

No job can take the process down, or crash-loop it. A job task catches what its run, its
settling or its slot raise, logs it with the job id, and ends; the loops log and pause on
any error, as on a store failure. What a run produced is made storable first (a size bound,
``max_result_bytes``, tied to ``upstream.max_response_bytes``; an error envelope for every
failure); if the store still refuses it, a fixed ``job_outcome_unstorable`` failure is
stored in its place; and if even that write fails, the lease expires and the claim counts
towards ``max_claims``, past which the store buries the job as ``dead`` (see
gateway/overflow.py) instead of running it again.

On shutdown (the drainer's scope cancelled) a running job is put back in the queue without
counting the attempt, as long as the store is still open: run the drainer in a nursery
inside the store's and cancel it first. Whatever could not be put back is recovered on the
next start, once its lease has expired. A run that finished is settled under a shield, so
a shutdown never throws a finished result away. No prompt or completion text reaches a
log line or an event.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AsyncExitStack
from functools import partial

import attrs
import httpx
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import OverflowConfig
from runestone_proxy.errors import GatewayError, UpstreamTimeout
from runestone_proxy.gateway.capacity import JobCapacity
from runestone_proxy.gateway.job_results import storable_outcome, unstorable_body
from runestone_proxy.gateway.overflow import (
    Complete,
    Fail,
    Job,
    JobOutcome,
    Retry,
    Settle,
    WebhookStatus,
    outcome_from_error,
    settle,
)
from runestone_proxy.server.store import Store, Wakeup
from runestone_proxy.server.webhook_delivery import WebhookDelivery

log = structlog.get_logger("runestone.drainer")

Runner = Callable[[Job], Awaitable[JobOutcome]]
_WEBHOOK_BATCH = 32
_RELEASE_GRACE_S = 5.0
#: Room for what the gateway adds to a provider's answer (provider, routing_policy, ...)
#: on top of ``upstream.max_response_bytes``, in a job's stored result.
RESULT_OVERHEAD_BYTES = 64 * 1024


@attrs.define(eq=False)
class Drainer:
    store: Store
    runner: Runner
    capacity: JobCapacity
    config: OverflowConfig
    webhooks: WebhookDelivery
    #: Wall clock for stored times; tests on a MockClock pass ``trio.current_time``.
    clock: Callable[[], float] = time.time
    rand: Callable[[], float] = random.random
    #: A stored result's bound; a larger one is stored as a ``result_too_large`` failure.
    max_result_bytes: int = 32 * 1024 * 1024 + RESULT_OVERHEAD_BYTES
    webhooks_due: Wakeup = attrs.Factory(Wakeup)
    sweep_due: Wakeup = attrs.Factory(Wakeup)
    running: int = 0
    #: Set while the queue holds jobs: freed capacity matters only then. With an empty
    #: queue, live requests freeing slots cost the drainer nothing (no wake-up, no query).
    has_work: trio.Event = attrs.Factory(trio.Event)

    def notify(self) -> None:
        """Capacity may have freed, or a job was queued: look again."""
        self.store.wakeup.set()

    async def _wait(self, bell: Wakeup, deadline: float | None) -> None:
        """Until ``bell`` rings or the wall-clock ``deadline`` passes."""
        delay = math.inf if deadline is None else max(0.0, deadline - self.clock())
        with trio.move_on_after(delay):
            await bell.wait()

    async def _pause_after(self, exc: Exception, loop: str) -> None:
        """A store failure (disk full, locked): say so, wait a little, carry on. Anything
        else is a bug: logged with its traceback, and the loop carries on all the same."""
        if isinstance(exc, GatewayError):
            log.error("overflow.drainer.error", loop=loop, error=exc.message)
        else:
            log.exception("overflow.drainer.crashed", loop=loop)
        await trio.sleep(self.config.backoff_base_s)

    def _buried(self, dead_before: int) -> None:
        """Jobs were buried as dead during a claim: their webhooks are due, their retention
        runs."""
        if self.store.stats.dead != dead_before:
            self.webhooks_due.set()
            self.sweep_due.set()

    # --- claiming and running ------------------------------------------------------------------

    async def claim_loop(self, nursery: trio.Nursery) -> None:
        while True:
            now = self.clock()
            try:
                schedule = await self.store.schedule(now)
                if schedule.due or schedule.next_at is not None:
                    self.has_work.set()
                elif self.has_work.is_set():
                    self.has_work = trio.Event()
                candidates = [t for t in schedule.due if self.capacity.has_capacity(t)]
                job = None
                if candidates:
                    dead_before = self.store.stats.dead
                    job = await self.store.claim(candidates, self.config.lease_s, now)
                    self._buried(dead_before)
            except Exception as exc:
                await self._pause_after(exc, "claim")
                continue
            if job is None:
                await self._wait(self.store.wakeup, schedule.next_at)
                continue
            # Until the job holds its slot, has_capacity() would still count that slot as
            # free: start() returns only once it is held (at once, unless a live request
            # took the room during the claim; then this waits for the tenant's next slot).
            await nursery.start(partial(self._run, job, schedule.depth - 1))

    async def forward_freed(self) -> None:
        while True:
            if not self.has_work.is_set():
                await self.has_work.wait()
                # Capacity may have freed while nothing listened: look once more now, or
                # that wake-up is lost and a claimable job waits for the next release.
                self.notify()
            await self.capacity.wait_freed()
            self.notify()

    async def _run(
        self, job: Job, depth: int, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            async with AsyncExitStack() as stack:
                # The lease runs while the job waits for its slot: a wait past half of it
                # (a shared backend, where another process may take the room first) gives
                # the job back, uncounted, rather than run it with no lease left.
                assert job.lease_expires_at is not None
                held = False
                with trio.move_on_after(max(0.0, job.lease_expires_at - self.clock()) / 2):
                    await stack.enter_async_context(self.capacity.job_slot(job.tenant))
                    held = True
                task_status.started()  # the claim loop goes on once the slot is held
                started = True
                if not held:
                    await self._give_back(job)
                    return
                self.running += 1
                try:
                    await self._attempt(job, depth)
                finally:
                    self.running -= 1
        except Exception:
            # A bug (the run's, settling's and the store's own errors are handled below):
            # one job's, so it never reaches the drainer's nursery. Its lease expires and
            # the claim counts towards max_claims.
            log.exception("overflow.job.crashed", job_id=job.id)
            if not started:
                task_status.started()
        finally:
            self.notify()  # our slot is free again

    async def _give_back(self, job: Job) -> None:
        """Put a claimed job that got no slot in time back in the queue, due now; the
        attempt and the claim are not counted."""
        assert job.lease_token is not None
        telemetry.emit("overflow.slot_wait.released", tenant=job.tenant, job_id=job.id)
        try:
            await self.store.release(job.id, job.lease_token, self.clock())
        except GatewayError as exc:
            log.warning("overflow.release.failed", job_id=job.id, error=exc.message)

    async def _attempt(self, job: Job, depth: int) -> None:
        assert job.lease_token is not None
        fields = {"tenant": job.tenant, "job_id": job.id, "request_id": job.request_id}
        telemetry.emit("overflow.drain.start", **fields, attempt=job.attempts, queue_depth=depth)
        started = trio.current_time()
        try:
            outcome = await self._execute(job)
        except trio.Cancelled:
            with trio.CancelScope(shield=True), trio.move_on_after(_RELEASE_GRACE_S):
                try:
                    await self.store.release(job.id, job.lease_token, self.clock())
                except GatewayError as exc:
                    log.warning("overflow.release.failed", job_id=job.id, error=exc.message)
            raise
        outcome = storable_outcome(outcome, self.max_result_bytes)
        now = self.clock()
        decision = settle(
            outcome,
            job.attempts,
            max_attempts=self.config.max_attempts,
            base_s=self.config.backoff_base_s,
            max_s=self.config.backoff_max_s,
            now=now,
            rand=self.rand,
        )
        with trio.CancelScope(shield=True):  # quick writes: keep what the run produced
            stored = await self._record(job, job.lease_token, decision, outcome, now)
        result = "stale" if stored is None else _RESULT[type(stored)]
        telemetry.emit(
            "overflow.drain.stop",
            **fields,
            attempt=job.attempts,
            queue_depth=depth,
            status=outcome.status,
            result=result,
            duration_ms=round((trio.current_time() - started) * 1000, 3),
        )
        if result in ("succeeded", "failed"):
            self.webhooks_due.set()
            self.sweep_due.set()

    async def _record(
        self, job: Job, token: str, decision: Settle, outcome: JobOutcome, now: float
    ) -> Settle | None:
        """Store ``decision``; if the store refuses it, a fixed ``job_outcome_unstorable``
        failure instead. Returns what was stored, None if nothing was (a stale lease, or the
        store failing: then the lease expires and the claim counts towards max_claims)."""
        try:
            return decision if await self._settle(job, token, decision, outcome, now) else None
        except GatewayError as exc:
            log.error("overflow.settle.failed", job_id=job.id, error=exc.message)
        except Exception:
            log.exception("overflow.settle.crashed", job_id=job.id)
        try:
            stored = await self.store.fail(job.id, token, unstorable_body(), 500, None, now)
        except GatewayError as exc:
            log.error("overflow.settle.failed", job_id=job.id, error=exc.message)
            return None
        return Fail() if stored else None

    async def _settle(
        self, job: Job, token: str, decision: Settle, outcome: JobOutcome, now: float
    ) -> bool:
        if isinstance(decision, Complete):
            return await self.store.complete(job.id, token, outcome.body, outcome.status, now)
        retry_at = decision.at if isinstance(decision, Retry) else None
        return await self.store.fail(job.id, token, outcome.body, outcome.status, retry_at, now)

    async def _execute(self, job: Job) -> JobOutcome:
        """``runner(job)``, bounded by the lease; errors become outcomes."""
        assert job.lease_expires_at is not None
        with trio.move_on_after(max(0.0, job.lease_expires_at - self.clock())) as scope:
            try:
                return await self.runner(job)
            except GatewayError as exc:
                return outcome_from_error(exc)
            except Exception:
                log.exception("overflow.runner.crashed", job_id=job.id)
                crashed = GatewayError("The server had an error while processing the job.")
                return JobOutcome(crashed.http_status, crashed.body(), retryable=True)
        assert scope.cancelled_caught
        timeout = UpstreamTimeout(
            f"The job did not finish within its lease ({self.config.lease_s} s)."
        )
        return outcome_from_error(timeout)

    # --- webhooks and retention --------------------------------------------------------------

    async def webhook_loop(self, client: httpx.AsyncClient) -> None:
        while True:
            try:
                due, next_at = await self.store.due_webhooks(self.clock(), _WEBHOOK_BATCH)
            except Exception as exc:
                await self._pause_after(exc, "webhook")
                continue
            if not due:
                await self._wait(self.webhooks_due, next_at)
                continue
            async with trio.open_nursery() as nursery:
                for job in due:
                    nursery.start_soon(self._deliver, client, job)

    async def _deliver(self, client: httpx.AsyncClient, job: Job) -> None:
        to = await self.webhooks.deliver(client, job)
        if to is not None and to is not WebhookStatus.PENDING:
            self.sweep_due.set()

    async def sweep_loop(self) -> None:
        while True:
            try:
                deleted, next_at = await self.store.sweep(self.clock())
            except Exception as exc:
                await self._pause_after(exc, "sweep")
                continue
            if deleted:
                log.info("overflow.sweep", deleted=deleted)
            await self._wait(self.sweep_due, next_at)


_RESULT: dict[type[Settle], str] = {Complete: "succeeded", Retry: "retry", Fail: "failed"}


async def run_drainer(
    store: Store,
    runner: Runner,
    capacity: JobCapacity,
    config: OverflowConfig,
    *,
    env: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    rand: Callable[[], float] = random.random,
    max_result_bytes: int | None = None,
    transport: httpx.AsyncBaseTransport | None = None,
    task_status: trio.TaskStatus[Drainer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Recover expired leases, then drain until cancelled. Reports the :class:`Drainer`
    (``notify()`` it when capacity may have freed, if ``capacity.wait_freed`` cannot tell).
    ``max_result_bytes`` bounds a stored result (the app passes ``upstream.max_response_bytes
    + RESULT_OVERHEAD_BYTES``)."""
    secret = (os.environ if env is None else env).get(config.webhook_secret_env, "").encode()
    if not secret:
        log.warning("overflow.webhook.unsigned", secret_env=config.webhook_secret_env)
    drainer = Drainer(
        store,
        runner,
        capacity,
        config,
        WebhookDelivery(store, config, secret or None, clock=clock, rand=rand),
        clock=clock,
        rand=rand,
        # One bell: the store rings it when a saved Response becomes the earliest expiry.
        sweep_due=store.sweep_due,
        # The store rings it too when other gateways share its queue (PostgreSQL).
        webhooks_due=store.webhooks_due,
    )
    if max_result_bytes is not None:
        drainer.max_result_bytes = max_result_bytes
    try:
        recovered = await store.recover(clock())
    except GatewayError as exc:  # not fatal: a claim takes over an expired lease all the same
        log.error("overflow.recover.failed", error=exc.message)
        recovered = 0
    log.info("overflow.drainer.started", recovered=recovered)
    async with (
        httpx.AsyncClient(transport=transport, timeout=None, follow_redirects=False) as client,
        trio.open_nursery() as nursery,
    ):
        nursery.start_soon(drainer.forward_freed)
        nursery.start_soon(drainer.webhook_loop, client)
        nursery.start_soon(drainer.sweep_loop)
        nursery.start_soon(drainer.claim_loop, nursery)
        task_status.started(drainer)
