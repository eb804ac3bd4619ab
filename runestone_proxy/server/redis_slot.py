"""A tenant's slot on Redis, as :meth:`RedisLimits.admit <.redis_limits.RedisLimits.admit>`
returns it: held already when the admission's script took it, else entering decides with the
tenant policy (:func:`runestone_proxy.gateway.limits.admit`) and may wait in this process's
FIFO for the dispatcher to hand one over. Leaving the block releases it (fire-and-forget).
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import TYPE_CHECKING

from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway import limits as policy
from runestone_proxy.gateway.capacity import at_capacity
from runestone_proxy.gateway.limits import ADMIT, Decision, Enqueue, GlobalState, TenantState, Wait
from runestone_proxy.gateway.ratelimit import KeyLimits

if TYPE_CHECKING:
    from runestone_proxy.server.redis_limits import RedisLimits
    from runestone_proxy.server.redis_scripts import Adjust
    from runestone_proxy.server.redis_waiting import RedisTenant

__all__ = ["RedisSlot"]


class RedisSlot:
    """The tenant's slot as :meth:`RedisLimits.admit` left it: ``held`` when the admission's
    script took it, else entering decides (policy.admit) and may wait for one."""

    __slots__ = (
        "adjust",
        "for_job",
        "held",
        "key_mask",
        "limits",
        "request_id",
        "tenant",
        "view",
        "wants_async",
    )

    def __init__(
        self,
        limits: RedisLimits,
        tenant: RedisTenant,
        wants_async: bool,
        for_job: bool,
        key_mask: str,
        request_id: str | None,
        held: str | None,
        view: tuple[int, int] | None,
    ) -> None:
        self.limits = limits
        self.tenant = tenant
        self.wants_async = wants_async
        self.for_job = for_job
        self.key_mask = key_mask
        self.request_id = request_id
        self.held = held
        self.view = view
        #: The reservation's window settling, made while this slot was held: sent with
        #: its release (:meth:`RedisLimits.reconcile <.redis_limits.RedisLimits.reconcile>`).
        self.adjust: Adjust | None = None

    async def __aenter__(self) -> Decision:
        if self.held is not None:
            return ADMIT
        limits, tenant = self.limits, self.tenant
        cap = limits.capacity
        tenant_limits = cap.configured.get(tenant.name, cap.default_limits)
        if self.for_job:
            if not tenant.fifo:
                member = limits.member()
                reply = await limits.acquire(tenant, member, KeyLimits(), "-", 0)
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
                return decision
        if type(decision) is Wait:
            handed = await limits.waiting.wait(tenant, decision.max_wait_s)
            if handed is None:
                raise self._refuse(tenant_limits.max_concurrent, True, decision.max_wait_s)
            self.held = handed
            return decision
        if type(decision) is Enqueue:
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

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        member, self.held = self.held, None
        adjust, self.adjust = self.adjust, None
        if member is not None:
            self.limits.release(self.tenant, member, adjust)
        elif adjust is not None:
            self.limits.adjust(adjust)
