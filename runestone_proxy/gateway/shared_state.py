"""What admission needs of the limits, as an interface: the key's rate windows and the
tenant's concurrency slots, in this process or shared by a fleet.

Two implementations fit :class:`Limits` by their shape:

- :class:`LocalLimits` (the embedded default): the in-process :class:`~.ratelimit.RateLimiter`
  and :class:`~.capacity.Capacity`, called exactly as admission called them before this
  interface existed; the only extra cost is this one ``await`` (measured: within noise).
- ``server/redis_limits.RedisLimits``: the same limits on Redis, shared by every worker and
  host (``[state] backend = "redis"``), with this process's own ``LocalLimits`` as the
  fallback when Redis is unreachable and ``on_unavailable = "local"``.

Why one call for both: on a shared backend the key's windows and the tenant's slot are one
atomic server-side script, one round trip per admission. So :meth:`Limits.admit` charges the
key's windows (or raises its 429) and returns, with the reservation and the
``x-ratelimit-*`` headers, the tenant's slot as an async context manager whose
``__aenter__`` returns the decision it carried out (:class:`~.limits.Admit`,
:class:`~.limits.Wait` -> a slot is held for the block; :class:`~.limits.Enqueue` -> none is;
a reject raises 429). The shared backend has already tried to take the slot in that same
round trip, so entering it costs nothing more when there was room. It also takes the key's
own ``max_concurrent`` slot there (exact across the fleet; 429 when they are all taken),
held by the returned block (``key_slot_done``); the in-process limits leave that to
admission's :class:`~.auth.KeySlots`, as before. Leaving the slot's block
releases it; a slot that was never entered must still be exited (it may hold a slot taken
ahead: a replayed ``Idempotency-Key`` gives it back that way).

:meth:`Limits.reconcile` and :meth:`Limits.cancel` settle the reservation as
:class:`~.ratelimit.RateLimiter` does. ``jobs`` is the drainer's view
(:class:`~.capacity.JobCapacity`), ``snapshot`` the ``/health`` component.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol

import attrs
import trio

from runestone_proxy.gateway.capacity import Capacity, JobCapacity
from runestone_proxy.gateway.limits import Decision
from runestone_proxy.gateway.rate_wire import Headers
from runestone_proxy.gateway.ratelimit import KeyLimits, RateLimiter, Reservation

if TYPE_CHECKING:
    from runestone_proxy.gateway.auth import Principal

__all__ = ["Admitted", "Limits", "LocalLimits", "SlotBlock"]


class SlotBlock(AbstractAsyncContextManager[Decision], Protocol):
    """The tenant's slot :meth:`Limits.admit` returns, to enter for the request's block."""

    @property
    def key_slot_done(self) -> bool:
        """True when the backend has already held the key to its own ``max_concurrent``
        (the slot of the key, if it has one, is held by this block and goes with it);
        False: admission takes it in this process (:class:`~.auth.KeySlots`)."""


#: What :meth:`Limits.admit` returns: the reservation, its headers, the tenant's slot.
Admitted = tuple[Reservation, Headers, SlotBlock]


class Limits(Protocol):
    """The key's windows and the tenant's slots, as admission uses them."""

    async def admit(
        self,
        principal: Principal,
        body: Mapping[str, Any],
        output_tokens: int,
        request_id: str,
        wants_async: bool,
    ) -> Admitted:
        """Charge the key's windows (429 ``RateLimited`` if one is full) and return the
        tenant's slot to enter; 503 ``ServiceUnavailable`` when a shared backend is down
        and configured to fail closed."""

    def reconcile(self, reservation: Reservation, actual_tokens: int | None, now: float) -> None:
        """Settle a served request's reservation with the tokens it really used."""

    def cancel(self, reservation: Reservation, limits: KeyLimits, now: float) -> Headers:
        """Give back an unserved request's reservation; the headers as they stand after."""

    @property
    def jobs(self) -> JobCapacity:
        """The overflow drainer's view of the tenants' slots."""

    def snapshot(self) -> dict[str, Any]:
        """The ``capacity`` component of ``/health``."""


@attrs.define(eq=False)
class LocalLimits:
    """The embedded limits: this process's rate windows and capacity."""

    ratelimiter: RateLimiter
    capacity: Capacity

    async def admit(
        self,
        principal: Principal,
        body: Mapping[str, Any],
        output_tokens: int,
        request_id: str,
        wants_async: bool,
    ) -> Admitted:
        reservation, headers = self.ratelimiter.admit(
            principal, body, output_tokens, trio.current_time(), request_id
        )
        slot = self.capacity.slot(
            principal.tenant,
            wants_async=wants_async,
            key_mask=principal.key_mask,
            request_id=request_id,
        )
        return reservation, headers, slot

    def reconcile(self, reservation: Reservation, actual_tokens: int | None, now: float) -> None:
        self.ratelimiter.reconcile(reservation, actual_tokens, now)

    def cancel(self, reservation: Reservation, limits: KeyLimits, now: float) -> Headers:
        return self.ratelimiter.cancel(reservation, limits, now)

    @property
    def jobs(self) -> JobCapacity:
        return self.capacity

    def snapshot(self) -> dict[str, Any]:
        return self.capacity.snapshot()
