"""Admission and settlement of one generation request: the part of the request flow around
the provider call.

``async with Admission(service, generation) as parked:`` admits the request, or raises:

1. the key's rate limits reserve the request (RPM/RPH, the TPM estimate), and a key with
   its own ``max_concurrent`` takes one of its slots (429 when they are all taken; given
   back when the block is left, whatever the way out): in this process's
   :class:`~.auth.KeySlots`, or fleet-wide by the shared backend's admission itself (its
   slot says so: ``key_slot_done``);
2. an ``Idempotency-Key`` the tenant already used answers with the job it made then
   (``parked`` is that job, marked replayed): a retry never runs twice, live or queued;
3. the budgets of the key and its tenant reserve the request's estimated cost
   (:mod:`.budget_book`), or refuse it (429 ``insufficient_quota``);
4. the tenant's capacity decides (the slot :meth:`Limits.admit` returned with the
   reservation, in-process or shared: :mod:`.shared_state`): ``Admit``/``Wait`` hold a slot for
   the block (``parked`` is None: serve it now); ``Enqueue`` parks it as a durable job
   (``parked`` is the new job, to answer ``202`` with); a reject raises 429.

Leaving the block settles: a request that was served, replayed or parked counts, and its
TPM estimate is reconciled with ``usage`` (the tokens the answer reported, set by the
caller; None keeps the estimate); one refused for capacity, or whose client left while it
waited, gives its reservation back. The budget reservation (``budget``) is settled with the
real cost where the ledger record is made (:func:`~.accounting.account`); leaving the block
releases it if nothing did (the request never reached a provider, was parked, or was
refused: a parked job is checked again when it runs). Every ``GatewayError`` leaving the
block carries the key's ``x-ratelimit-*`` (and ``x-runestone-budget-*``) headers. A class
rather than a generator context manager: it wraps every request, and a generator costs a few
microseconds more per use.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, final

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, RateLimited
from runestone_proxy.gateway.budget import estimate
from runestone_proxy.gateway.budget_hold import NO_HOLD, Hold
from runestone_proxy.gateway.limits import Enqueue
from runestone_proxy.gateway.overflow import Enqueued, Job, NewJob
from runestone_proxy.gateway.queue import JobQueue
from runestone_proxy.gateway.rate_wire import Headers
from runestone_proxy.gateway.ratelimit import Reservation
from runestone_proxy.gateway.request_body import check_idempotency_key
from runestone_proxy.gateway.shared_state import SlotBlock

if TYPE_CHECKING:
    from runestone_proxy.gateway.service import Generation, Service


@final
@attrs.frozen
class Parked:
    """A request answered with a durable job (``202 Accepted``): a new one, or the job an
    earlier request with the same ``Idempotency-Key`` made (``replayed``)."""

    job: Job
    replayed: bool


class Admission:
    __slots__ = (
        "admitted",
        "budget",
        "budget_headers",
        "gen",
        "key_slot",
        "reservation",
        "rl_headers",
        "service",
        "slot",
        "usage",
    )

    def __init__(self, service: Service, gen: Generation) -> None:
        self.service = service
        self.gen = gen
        self.admitted = False
        self.key_slot = False
        self.slot: SlotBlock | None = None
        #: The tokens the answer reported, for the TPM reconcile (None: keep the estimate).
        self.usage: int | None = None
        self.reservation: Reservation
        #: The key's ``x-ratelimit-*`` headers (and the budget's), for every answer.
        self.rl_headers: Headers
        #: The budgets' reservation: settled by the ledger record, else released on exit.
        self.budget: Hold = NO_HOLD
        self.budget_headers: Headers = ()

    async def __aenter__(self) -> Parked | None:
        service, gen = self.service, self.gen
        principal = gen.principal
        self.reservation, self.rl_headers, slot = await service.limits.admit(
            principal, gen.body, gen.output_tokens, gen.request_id, gen.wants_async
        )
        try:
            if not slot.key_slot_done:  # else a shared backend took it with the tenant's
                self.key_slot = service.key_slots.acquire(principal)
            store = service.store
            if store is not None and gen.idempotency_key is not None:
                twin = await self._replay(store)
                if twin is not None:
                    await slot.__aexit__(None, None, None)  # a slot taken ahead goes back
                    return twin
            book = service.budgets
            if book.applies(principal.tenant, principal.budgets):
                await self._reserve_budget()
            decision = await slot.__aenter__()
            if type(decision) is Enqueue:  # no slot held: a job runs when one frees
                return await self._park(store)
            self.slot = slot
            self.admitted = True  # Admit, or a Wait that got its slot
            return None
        except BaseException as exc:
            if self.slot is None:  # a shared backend may have taken the slot ahead
                await slot.__aexit__(type(exc), exc, exc.__traceback__)
            self._settle(exc)
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._settle(exc)  # first: a shared backend sends the settle with the slot's release
        if self.slot is not None:
            await self.slot.__aexit__(exc_type, exc, tb)

    async def _reserve_budget(self) -> None:
        """Reserve the request's estimated cost in its key's and tenant's budgets (429
        ``insufficient_quota`` if one is spent); its headers go on every answer."""
        gen = self.gen
        principal = gen.principal
        est = estimate(gen.body, gen.output_tokens, [t.entry for t in gen.route.ordered])
        self.budget, self.budget_headers = await self.service.budgets.reserve(
            principal.tenant,
            principal.key_id,
            principal.key_mask,
            principal.budgets,
            est,
            gen.request_id,
        )
        self.rl_headers = (*self.rl_headers, *self.budget_headers)

    async def _replay(self, store: JobQueue) -> Parked | None:
        """The job an earlier request with the same ``Idempotency-Key`` made, if any (400
        for a malformed key)."""
        gen = self.gen
        key = check_idempotency_key(gen.idempotency_key)
        if key is None or not store.is_open:
            return None
        twin = await store.find_idempotent(gen.principal.tenant, key)
        if twin is None:
            return None
        self.admitted = True  # answered from the stored job: it counts
        _emit_enqueue(gen, twin, None, replayed=True)
        return Parked(twin, True)

    async def _park(self, store: JobQueue | None) -> Parked:
        """Commit the request as a durable job (429 when there is no queue)."""
        gen = self.gen
        if store is None:
            raise RateLimited(
                f"Tenant {gen.principal.tenant!r} is at capacity and no overflow queue "
                "is available.",
                retry_after_s=1,
            )
        self.admitted = True  # a durable job is served later: it counts now
        enqueued = await store.enqueue(_new_job(gen))
        replayed = not enqueued.created
        _emit_enqueue(gen, enqueued.job, enqueued, replayed)
        return Parked(enqueued.job, replayed)

    def _settle(self, exc: BaseException | None) -> None:
        if self.key_slot:
            self.key_slot = False
            self.service.key_slots.release(self.gen.principal.key_id)
        now = trio.current_time()
        self.budget.release()  # unless its ledger record settled it
        if self.admitted:
            self.service.limits.reconcile(self.reservation, self.usage, now)
        else:  # refused, or the client left while it waited for a slot
            limits = self.gen.principal.limits
            headers = self.service.limits.cancel(self.reservation, limits, now)
            if isinstance(exc, GatewayError):
                # The quota as it stands after the refund.
                self.rl_headers = (*headers, *self.budget_headers)
        if isinstance(exc, GatewayError):
            exc.headers = (*exc.headers, *self.rl_headers)


def _new_job(gen: Generation) -> NewJob:
    """The job a parked request becomes: its raw body as it came (the runner parses it
    again), its checked ``webhook_url``, the client headers a native provider receives
    (``anthropic-version``, ``anthropic-beta``, ...: the run forwards them as a live call
    would)."""
    return NewJob(
        tenant=gen.principal.tenant,
        request_id=gen.request_id,
        endpoint=gen.endpoint,
        body=gen.raw,
        webhook_url=gen.webhook_url,
        idempotency_key=check_idempotency_key(gen.idempotency_key),
        headers=gen.headers,
    )


def _emit_enqueue(gen: Generation, job: Job, enqueued: Enqueued | None, replayed: bool) -> None:
    """``overflow.enqueue``: a job accepted, or an earlier one answered again (``replayed``)."""
    telemetry.emit(
        "overflow.enqueue",
        tenant=gen.principal.tenant,
        key_mask=gen.principal.key_mask,
        request_id=gen.request_id,
        job_id=job.id,
        endpoint=job.endpoint,
        queue_depth=None if enqueued is None else enqueued.queue_depth,
        replayed=replayed,
    )
