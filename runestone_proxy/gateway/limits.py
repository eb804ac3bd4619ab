"""Tenant capacity policy: who may start now, who waits, who is parked, who is refused.

Pure: plain sync functions over plain values, no trio, no clock. ``capacity.py`` carries the
decisions out (decide, then do) and its tests drive the timing; the functions here are
tested without an event loop.

Two decisions:

- :func:`admit` answers a request that arrives for a tenant::

      tenant has a free slot, nobody queued ahead of it,
      and the global cap has room                           -> Admit
      otherwise, the request asks for async handling
      (Prefer: respond-async, webhook_url, /v1/chat/stream)
      or the tenant's on_limit is "queue"                   -> Enqueue (202 + durable job)
      otherwise on_limit "reject" (or max_wait_ms = 0)      -> Reject (429, retry-after)
      otherwise on_limit "wait"                             -> Wait (FIFO, up to max_wait_ms)

  "Nobody queued ahead" keeps each tenant's FIFO honest: a newcomer never overtakes a
  waiter of its own tenant, even in the instant a slot is free and not yet handed over.

- :func:`pick` answers "a slot just freed: whose waiter gets it?". Among tenants whose
  queue is non-empty and who are under their own cap, the one with the least in-flight work
  per unit of weight wins; ties go to the longest-waiting head (lowest sequence number).
  When only the freeing tenant's own cap was binding, it is the only eligible tenant, so its
  own FIFO head is next; when the global cap is binding, a tenant bursting 100 waiters gets
  no more than its weighted share while another tenant's few waiters are served
  interleaved, never after the whole burst.

The inputs are structural (:class:`TenantView`, :class:`GlobalView`, :class:`Contender`), so
the carrier passes its live objects without copying them per request, and tests pass the
frozen :class:`TenantState` / :class:`GlobalState` values.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Literal, Protocol, TypeVar

import attrs

from runestone_proxy.config import TenancyConfig, TenantConfig

OnLimit = Literal["wait", "queue", "reject"]

#: How long a refused client is told to wait: capacity frees as requests end, which we
#: cannot predict, so a short constant (OpenAI's SDK backs off further on its own).
RETRY_AFTER_S = 1.0


@attrs.frozen
class TenantLimits:
    """A tenant's limits with the defaults resolved (``max_concurrent`` is always set)."""

    max_concurrent: int
    on_limit: OnLimit = "wait"
    max_wait_s: float = 2.0
    weight: float = 1.0

    @classmethod
    def resolve(cls, tenant: TenantConfig | None, tenancy: TenancyConfig) -> TenantLimits:
        """``tenant`` is the ``[tenants.<name>]`` table, or None for an unlisted tenant."""
        if tenant is None:
            return cls(tenancy.default_max_concurrent)
        return cls(
            tenant.max_concurrent or tenancy.default_max_concurrent,
            tenant.on_limit,
            tenant.max_wait_ms / 1000.0,
            tenant.weight,
        )


# --- inputs ----------------------------------------------------------------------------------


class TenantView(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def waiting(self) -> int: ...


class GlobalView(Protocol):
    @property
    def in_flight(self) -> int: ...
    @property
    def max_concurrent(self) -> int: ...


class Contender(Protocol):
    """A tenant with at least one waiter, as :func:`pick` sees it."""

    @property
    def in_flight(self) -> int: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def weight(self) -> float: ...
    @property
    def head_seq(self) -> int: ...


@attrs.frozen
class TenantState:
    in_flight: int = 0
    waiting: int = 0


@attrs.frozen
class GlobalState:
    in_flight: int = 0
    max_concurrent: int = 1024


@attrs.frozen
class ContenderState:
    name: str
    in_flight: int
    max_concurrent: int
    weight: float
    head_seq: int


# --- decisions -------------------------------------------------------------------------------


@attrs.frozen
class Admit:
    """Take a slot now."""


@attrs.frozen
class Wait:
    """Join the tenant's FIFO; give up with a 429 after ``max_wait_s``."""

    max_wait_s: float


@attrs.frozen
class Enqueue:
    """Park the request durably (the overflow queue) and answer 202."""


@attrs.frozen
class Reject:
    """Answer 429 now."""

    retry_after_s: float = RETRY_AFTER_S


Decision = Admit | Wait | Enqueue | Reject

ADMIT = Admit()
ENQUEUE = Enqueue()
REJECT = Reject()


def has_room(tenant: TenantView, limits: TenantLimits, glob: GlobalView) -> bool:
    """True when a request for this tenant would be admitted at once."""
    return (
        tenant.in_flight < limits.max_concurrent
        and not tenant.waiting
        and glob.in_flight < glob.max_concurrent
    )


def admit(
    tenant: TenantView, limits: TenantLimits, glob: GlobalView, *, wants_async: bool
) -> Decision:
    """Decide what happens to a request arriving for ``tenant`` (see the module table)."""
    if has_room(tenant, limits, glob):
        return ADMIT
    if wants_async or limits.on_limit == "queue":
        return ENQUEUE
    if limits.on_limit == "reject" or limits.max_wait_s <= 0:
        return REJECT
    return Wait(limits.max_wait_s)


C = TypeVar("C", bound=Contender)


def pick(contenders: Iterable[C], glob: GlobalView) -> C | None:
    """The contender whose FIFO head gets the next free slot, or None if none may run.

    Eligible: under its own cap, with the global cap not full. Order: least
    ``in_flight / weight`` first, then the longest-waiting head."""
    if glob.in_flight >= glob.max_concurrent:
        return None
    best: C | None = None
    best_share = 0.0
    for c in contenders:
        if c.in_flight >= c.max_concurrent:
            continue
        share = c.in_flight / c.weight
        if (
            best is None
            or share < best_share
            or (share == best_share and c.head_seq < best.head_seq)
        ):
            best, best_share = c, share
    return best
