"""The answer to a concurrency slot refused at once or after waiting: its
``ratelimit.block`` telemetry and the 429 to raise. The in-process slot
(:mod:`.capacity`) and the Redis one (``server.redis_slot``) refuse alike, so both call
:func:`at_capacity`."""

from __future__ import annotations

from typing import Protocol

from runestone_proxy import telemetry
from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway import limits

__all__ = ["SlotLabels", "at_capacity"]


class SlotLabels(Protocol):
    """What labels a slot's ``ratelimit.block`` (either capacity's slot has it)."""

    key_mask: str
    request_id: str | None


def at_capacity(
    slot: SlotLabels,
    tenant: str,
    tenant_full: bool,
    tenant_max: int,
    global_max: int,
    waited_s: float | None,
    in_flight: int | None,
    waiting: int,
) -> RateLimited:
    """``ratelimit.block``, and the 429 to raise, for a slot refused at once (``waited_s``
    None) or after waiting that long; ``tenant_full``: the tenant's cap (else the gateway's)
    is the one reached. The in-process and the Redis slot (``server.redis_slot``) both."""
    telemetry.emit(
        "ratelimit.block",
        tenant=tenant,
        key_mask=slot.key_mask,
        request_id=slot.request_id,
        limit="concurrency" if waited_s is None else "concurrency_wait",
        retry_after_s=limits.RETRY_AFTER_S,
        in_flight=in_flight,
        waiting=waiting,
    )
    who = (
        f"Tenant {tenant!r} is at capacity ({tenant_max} concurrent requests)"
        if tenant_full
        else f"The gateway is at capacity ({global_max} concurrent requests)"
    )
    if waited_s is not None:
        who += f" and no slot freed within {waited_s * 1000:g}ms"
    return RateLimited(f"{who}. Please try again in 1s.", retry_after_s=limits.RETRY_AFTER_S)
