"""A tenant's slot on Redis, as :meth:`RedisLimits.admit <.redis_limits.RedisLimits.admit>`
returns it: held already when the admission's script took it, else entering decides with the
tenant policy (:func:`runestone_proxy.gateway.limits.admit`) and may wait in this process's
FIFO for the dispatcher to hand one over. It also holds the key's own ``max_concurrent``
slot when the key has one (taken by the same script, whatever became of the tenant's).
Leaving the block releases both in one fire-and-forget command, with the request's tpm
settle; a slot never entered must still be left (a slot taken ahead goes back that way).
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import TYPE_CHECKING

from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway import limits as policy
from runestone_proxy.gateway.limits import ADMIT, Decision, Enqueue, GlobalState, TenantState, Wait
from runestone_proxy.gateway.slot_refusal import at_capacity

if TYPE_CHECKING:
    from runestone_proxy.server.redis_commands import Plan
    from runestone_proxy.server.redis_limits import RedisLimits
    from runestone_proxy.server.redis_scripts import Settle
    from runestone_proxy.server.redis_waiting import RedisTenant

__all__ = ["RedisJobs", "RedisSlot"]


class RedisSlot:
    """The tenant's slot as :meth:`RedisLimits.admit` left it: ``held`` (its member) when the
    admission's script took it, else entering decides (policy.admit) and may wait for one;
    ``key_member`` while it holds the key's own slot."""

    __slots__ = (
        "for_job",
        "held",
        "key_mask",
        "key_member",
        "limits",
        "plan",
        "request_id",
        "settle",
        "tenant",
        "view",
        "wants_async",
    )

    #: The key's own ``max_concurrent`` is this backend's (taken by the admission's script,
    #: released with this slot): admission takes no key slot in this process.
    key_slot_done = True

    def __init__(
        self,
        limits: RedisLimits,
        tenant: RedisTenant,
        plan: Plan,
        wants_async: bool,
        for_job: bool,
        key_mask: str,
        request_id: str | None,
        held: bytes | None,
        key_member: bytes | None,
        view: tuple[int, int] | None,
    ) -> None:
        self.limits = limits
        self.tenant = tenant
        self.plan = plan
        self.wants_async = wants_async
        self.for_job = for_job
        self.key_mask = key_mask
        self.request_id = request_id
        self.held = held
        self.key_member = key_member
        self.view = view
        #: The reservation's tpm settle, made while this slot was held: sent with its
        #: release (:meth:`RedisLimits.reconcile <.redis_limits.RedisLimits.reconcile>`).
        self.settle: Settle | None = None

    async def __aenter__(self) -> Decision:
        if self.held is not None:
            return ADMIT
        limits, tenant = self.limits, self.tenant
        cap = limits.capacity
        tenant_limits = cap.configured.get(tenant.name, cap.default_limits)
        if self.for_job:
            if not tenant.fifo:
                member = limits.member()
                reply = await limits.acquire(self.plan, member, 0, True, tenant)
                if reply[3]:
                    tenant.held.add(member)
                    self.held = member
                    return ADMIT
            decision: Decision = Wait(math.inf)
        else:
            in_flight, global_in_flight = self.view or (0, 0)
            # The script found no room (or left the slot to this process's earlier waiters):
            # counted as full, so the policy picks between Wait, Enqueue and Reject.
            decision = policy.admit(
                TenantState(max(in_flight, tenant_limits.max_concurrent), len(tenant.fifo)),
                tenant_limits,
                GlobalState(global_in_flight, cap.max_concurrent),
                wants_async=self.wants_async,
            )
            if type(decision) is Enqueue:
                self._release_key()  # parked as a job: it runs later, under no key slot
                return decision
        if type(decision) is Wait:
            handed = await limits.waiting.wait(tenant, decision.max_wait_s)
            if handed is None:
                raise self._refuse(tenant_limits.max_concurrent, True, decision.max_wait_s)
            self.held = handed
            return decision
        if type(decision) is Enqueue:
            self._release_key()
            return decision
        # The tenant's cap unless the script saw room under it and no waiter: the gateway's.
        tenant_max = tenant_limits.max_concurrent
        view = self.view
        raise self._refuse(tenant_max, view is None or view[0] >= tenant_max or bool(tenant.fifo))

    def _refuse(
        self, tenant_max: int, tenant_full: bool, waited_s: float | None = None
    ) -> RateLimited:
        tenant, view = self.tenant, self.view
        return at_capacity(
            self,
            tenant.name,
            tenant_full,
            tenant_max,
            self.limits.capacity.max_concurrent,
            waited_s,
            view[0] if view else None,
            len(tenant.fifo),
        )

    def _release_key(self) -> None:
        key_member, self.key_member = self.key_member, None
        if key_member is not None:
            self.limits.release(self.tenant, self.plan, None, key_member)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        member, self.held = self.held, None
        key_member, self.key_member = self.key_member, None
        settle, self.settle = self.settle, None
        if member is not None or key_member is not None:
            self.limits.release(self.tenant, self.plan, member, key_member, settle)


class RedisJobs:
    """The overflow drainer's view of the tenants' slots on Redis (a
    :class:`~runestone_proxy.gateway.capacity.JobCapacity`)."""

    __slots__ = ("limits",)

    def __init__(self, limits: RedisLimits) -> None:
        self.limits = limits

    def has_capacity(self, tenant: str) -> bool:
        """No local waiter for ``tenant`` (live requests go first); whether Redis has room
        is learnt by trying (``job_slot`` waits if it had none)."""
        limits = self.limits
        if not limits.client.up:
            return not limits.fail_closed and limits.capacity.has_capacity(tenant)
        state = limits.tenants.get(tenant)
        return state is None or not state.fifo

    def job_slot(self, tenant: str) -> RedisSlot:
        limits = self.limits
        state = limits._tenant(tenant)
        plan = limits.job_plan(state)
        return RedisSlot(limits, state, plan, False, True, "-", None, None, None, None)

    async def wait_freed(self) -> None:
        """Until a slot may have freed (spurious wake-ups are allowed, the caller re-checks)."""
        await self.limits.waiting.wait_freed()
