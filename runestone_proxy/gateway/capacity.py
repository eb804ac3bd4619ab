"""Per-tenant capacity: concurrency slots held from admission until a request ends.

This module carries out the decisions of :mod:`runestone_proxy.gateway.limits` on trio, and
answers with the decision it carried out::

    async with capacity.slot(principal.tenant, wants_async=...) as decision:
        ...  # Admit, Wait: runs holding the slot. Enqueue: holds none; park it as a job (202)

How this works
--------------
A slot is two counters, the tenant's ``in_flight`` and the gateway-wide one. ``slot()``
returns a small async context manager; entering it asks :func:`limits.admit` and then

- Admit: bumps both counters and returns. No task, no Event, no checkpoint: the
  uncontended path is a few attribute updates.
- Wait: appends a waiter to the tenant's FIFO and parks the task
  (``trio.lowlevel.wait_task_rescheduled``) under ``trio.move_on_after(max_wait_s)``.
  If the deadline passes first, 429 :class:`~runestone_proxy.errors.RateLimited`.
- Enqueue: returns it, holding nothing; the API parks the request in the durable queue.
- Reject: 429 at once (the error tree's answer; the block never runs).

Leaving the block (completion, error, timeout, client disconnect, cancellation: any exit,
because it is ``__aexit__``) releases the slot it holds. A released slot is handed directly
to a waiter: the releaser picks the next waiter with :func:`limits.pick` (weighted fairness
across tenants, FIFO within one), counts the slot as the waiter's, and reschedules it. The
slot never becomes "free" in between, so newcomers cannot barge past waiters, and no count
is ever adjusted by anything but enter/exit, so nothing can drift.

Cancellation of a waiter: while it is parked, trio calls its abort function, which takes
it out of its FIFO before ``Cancelled`` is raised; it never held a slot. If the slot was
handed to it in the same instant it was cancelled (it was rescheduled, so trio no longer
aborts it), it wakes holding the slot, sees the pending cancellation at
``checkpoint_if_cancelled`` and releases, which hands the slot to the next waiter. A slot is
therefore never lost, and a cancelled request never runs.

Reload: :meth:`Capacity.reconfigure` updates limits in place. A shrunk limit just stops
admitting until in-flight work drains below it; a grown one hands the new room to waiters.

For the overflow drainer: :meth:`has_capacity` says whether a job for a tenant would start at
once (live waiters go first: it is False while the tenant has any), :meth:`job_slot` holds a
slot for a job (it waits in the tenant's FIFO, without deadline, if the room went away in
the meantime), and :meth:`wait_freed` parks until capacity may have freed (any release that
did not go to a live waiter, or a reload). The drainer loop::

    while True:
        tenant = next_job_tenant(t for t in tenants_with_jobs if capacity.has_capacity(t))
        if tenant is None:
            await capacity.wait_freed()   # no await between the check and here: no lost wakeup
            continue
        async with capacity.job_slot(tenant): ...
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import Any, Protocol

import attrs
import trio

from runestone_proxy.config import Config, TenancyConfig
from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway import limits
from runestone_proxy.gateway.limits import Admit, Decision, Enqueue, TenantLimits, Wait
from runestone_proxy.gateway.slot_refusal import at_capacity

#: Idle, unlisted tenants' state is dropped once more than this many tenants are tracked.
_MAX_TENANTS = 4096


class JobCapacity(Protocol):
    """What the overflow drainer needs of the limiter (:class:`Capacity` has it)."""

    def has_capacity(self, tenant: str) -> bool: ...

    def job_slot(self, tenant: str) -> AbstractAsyncContextManager[object]: ...

    async def wait_freed(self) -> None: ...


@attrs.define(eq=False, slots=True)
class _Waiter:
    task: trio.lowlevel.Task
    seq: int
    granted: bool = False


@attrs.define(eq=False, slots=True)
class _Tenant:
    """Live state of one tenant; also the ``TenantView``/``Contender`` that limits reads."""

    name: str
    limits: TenantLimits
    in_flight: int = 0
    fifo: deque[_Waiter] = attrs.Factory(deque)

    @property
    def waiting(self) -> int:
        return len(self.fifo)

    @property
    def max_concurrent(self) -> int:
        return self.limits.max_concurrent

    @property
    def weight(self) -> float:
        return self.limits.weight

    @property
    def head_seq(self) -> int:
        return self.fifo[0].seq


@attrs.define(eq=False, repr=False)
class Capacity:
    """Per-tenant and global concurrency slots with fair waiting. See the module docstring.

    ``in_flight`` and ``max_concurrent`` are the global counter and cap (this object is the
    ``GlobalView`` that :mod:`limits` reads)."""

    max_concurrent: int
    default_limits: TenantLimits
    configured: dict[str, TenantLimits]
    in_flight: int = 0
    tenants: dict[str, _Tenant] = attrs.Factory(dict)
    #: Tenants with at least one waiter.
    _contending: set[_Tenant] = attrs.Factory(set)
    _seq: itertools.count[int] = attrs.Factory(itertools.count)
    _freed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    @classmethod
    def from_config(cls, config: Config) -> Capacity:
        cap = cls(0, TenantLimits(1), {})
        cap._apply(config.tenancy, config)
        return cap

    def reconfigure(self, config: Config) -> None:
        """Swap limits in place; in-flight slots stay held, waiters keep their places."""
        self._apply(config.tenancy, config)
        for tenant in self.tenants.values():
            tenant.limits = self.configured.get(tenant.name, self.default_limits)
        self._dispatch()
        self._freed.unpark_all()

    def _apply(self, tenancy: TenancyConfig, config: Config) -> None:
        self.max_concurrent = tenancy.global_max_concurrent
        self.default_limits = TenantLimits.resolve(None, tenancy)
        self.configured = {
            name: TenantLimits.resolve(cfg, tenancy) for name, cfg in config.tenants.items()
        }

    # --- the request path ------------------------------------------------------------------

    def slot(
        self,
        tenant: str,
        *,
        wants_async: bool = False,
        key_mask: str = "-",
        request_id: str | None = None,
    ) -> Slot:
        """An async context manager holding one of ``tenant``'s slots for its block.

        ``__aenter__`` returns the decision carried out: :class:`~limits.Admit` or
        :class:`~limits.Wait` (a slot is held until the block ends) or :class:`~limits.Enqueue`
        (nothing is held); a reject, or a wait that timed out, raises ``RateLimited`` (429).
        ``key_mask`` and ``request_id`` only label the ``ratelimit.block`` event."""
        return Slot(self, tenant, wants_async, False, key_mask, request_id)

    def job_slot(self, tenant: str) -> Slot:
        """A slot for an overflow job: admitted at once when there is room, else it waits
        in the tenant's FIFO with no deadline (wrap it in a cancel scope to bound it)."""
        return Slot(self, tenant, False, True, "-", None)

    def _tenant(self, name: str) -> _Tenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            if len(self.tenants) >= _MAX_TENANTS:
                self._forget_idle()
            tenant = _Tenant(name, self.configured.get(name, self.default_limits))
            self.tenants[name] = tenant
        return tenant

    def _forget_idle(self) -> None:
        for name in [
            n
            for n, t in self.tenants.items()
            if not t.in_flight and not t.fifo and n not in self.configured
        ]:
            del self.tenants[name]

    async def _enter(self, slot: Slot) -> Decision:
        tenant = self._tenant(slot.tenant_name)
        if slot.for_job:
            decision: Decision = (
                limits.ADMIT if limits.has_room(tenant, tenant.limits, self) else Wait(math.inf)
            )
        else:
            decision = limits.admit(tenant, tenant.limits, self, wants_async=slot.wants_async)
        if type(decision) is Admit:
            tenant.in_flight += 1
            self.in_flight += 1
            slot.held = tenant  # no checkpoint since the count: __aexit__ will release it
            return decision
        if type(decision) is Wait:
            if not await self._wait(tenant, decision.max_wait_s):
                raise self._refuse(tenant, slot, decision.max_wait_s)
            slot.held = tenant
            return decision
        if type(decision) is Enqueue:
            return decision
        raise self._refuse(tenant, slot, None)

    def _refuse(self, tenant: _Tenant, slot: Slot, waited_s: float | None) -> RateLimited:
        full = tenant.in_flight >= tenant.limits.max_concurrent or bool(tenant.fifo)
        max_tenant = tenant.limits.max_concurrent
        return at_capacity(
            slot,
            tenant.name,
            full,
            max_tenant,
            self.max_concurrent,
            waited_s,
            tenant.in_flight,
            len(tenant.fifo),
        )

    async def _wait(self, tenant: _Tenant, max_wait_s: float) -> bool:
        """Park in the tenant's FIFO. True: a slot was handed over (and is now ours)."""
        waiter = _Waiter(trio.lowlevel.current_task(), next(self._seq))
        tenant.fifo.append(waiter)
        self._contending.add(tenant)

        def abort(_: Any) -> trio.lowlevel.Abort:
            # Still parked, so not granted: leave the FIFO; Cancelled is raised in the task.
            fifo = tenant.fifo
            if fifo[0] is waiter:
                fifo.popleft()
            else:
                fifo.remove(waiter)
            if not fifo:
                self._contending.discard(tenant)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(max_wait_s):
            await trio.lowlevel.wait_task_rescheduled(abort)
        if waiter.granted:
            try:
                # Cancelled in the same instant the slot was handed over: pass it on.
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                self._release(tenant)
                raise
        return waiter.granted

    def _release(self, tenant: _Tenant) -> None:
        tenant.in_flight -= 1
        self.in_flight -= 1
        if self._contending:
            self._dispatch()
        if self._freed and (
            limits.has_room(tenant, tenant.limits, self)
            or self.in_flight == self.max_concurrent - 1  # the global cap was full
        ):
            self._freed.unpark_all()

    def _dispatch(self) -> None:
        """Hand free slots to waiters, fairest first, until none may run."""
        while self._contending:
            tenant = limits.pick(self._contending, self)
            if tenant is None:
                return
            waiter = tenant.fifo.popleft()
            if not tenant.fifo:
                self._contending.discard(tenant)
            waiter.granted = True
            tenant.in_flight += 1
            self.in_flight += 1
            trio.lowlevel.reschedule(waiter.task)

    # --- the drainer's view ------------------------------------------------------------------

    def has_capacity(self, tenant: str) -> bool:
        """Would a request (or job) for ``tenant`` be admitted at once? False while any live
        request of that tenant waits: waiting clients go before queued jobs."""
        state = self.tenants.get(tenant)
        if state is None:
            return self.in_flight < self.max_concurrent
        return limits.has_room(state, state.limits, self)

    async def wait_freed(self) -> None:
        """Park until a slot is released without going to a waiter, or limits are reloaded.

        Wake-ups may be spurious (the slot may be for another tenant): re-check
        :meth:`has_capacity` after waking."""
        await self._freed.park()

    # --- counters ----------------------------------------------------------------------------

    def in_flight_of(self, tenant: str) -> int:
        state = self.tenants.get(tenant)
        return 0 if state is None else state.in_flight

    def waiting_of(self, tenant: str) -> int:
        state = self.tenants.get(tenant)
        return 0 if state is None else len(state.fifo)

    def snapshot(self) -> dict[str, Any]:
        """For ``/health`` (a component probe) and ``/metrics``."""
        return {
            "status": "ok",
            "in_flight": self.in_flight,
            "max_concurrent": self.max_concurrent,
            "waiting": sum(len(t.fifo) for t in self.tenants.values()),
            "tenants": {
                name: {
                    "in_flight": t.in_flight,
                    "waiting": len(t.fifo),
                    "max_concurrent": t.limits.max_concurrent,
                    "on_limit": t.limits.on_limit,
                }
                for name, t in self._listed()
            },
        }

    def _listed(self) -> list[tuple[str, _Tenant]]:
        listed = {n: self.tenants.get(n) or _Tenant(n, lim) for n, lim in self.configured.items()}
        listed.update((n, t) for n, t in self.tenants.items() if t.in_flight or t.fifo)
        return sorted(listed.items())

    def __repr__(self) -> str:
        waiting = sum(len(t.fifo) for t in self.tenants.values())
        return (
            f"<Capacity in_flight={self.in_flight}/{self.max_concurrent} "
            f"waiting={waiting} tenants={len(self.tenants)}>"
        )


class Slot:
    """``async with capacity.slot(tenant) as decision:``; one use only. ``held`` is the
    tenant whose slot the block holds (None for an Enqueue: nothing to release)."""

    __slots__ = (
        "capacity",
        "for_job",
        "held",
        "key_mask",
        "request_id",
        "tenant_name",
        "wants_async",
    )

    #: The key's own ``max_concurrent`` is admission's to take (in this process).
    key_slot_done = False

    def __init__(
        self,
        capacity: Capacity,
        tenant_name: str,
        wants_async: bool,
        for_job: bool,
        key_mask: str,
        request_id: str | None,
    ) -> None:
        self.capacity = capacity
        self.tenant_name = tenant_name
        self.wants_async = wants_async
        self.for_job = for_job
        self.key_mask = key_mask
        self.request_id = request_id
        self.held: _Tenant | None = None

    async def __aenter__(self) -> Decision:
        return await self.capacity._enter(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.held is not None:
            self.capacity._release(self.held)
