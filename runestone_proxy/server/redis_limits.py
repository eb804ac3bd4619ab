"""The limits on Redis: per-key windows and per-tenant slots shared by every worker and host.

It is the :class:`~runestone_proxy.gateway.shared_state.Limits` the service admits through
when ``[state] backend = "redis"``; the scripts and keys are in :mod:`.redis_scripts`.

The round trips of one request
------------------------------
- Admission: one ``EVALSHA`` (:data:`~.redis_scripts.ACQUIRE`) charges the key's rpm/rph/tpm
  windows and, when they allow it, takes the key's own slot (when the key has a
  ``max_concurrent``) and a tenant slot (leases) in the same atomic step.
- Release: one fire-and-forget ``EVALSHA`` (:data:`~.redis_scripts.RELEASE`) gives both
  back: queued on the connection, nobody waits for its reply. If it is lost (Redis went
  away first), the leases run out within ``lease_s``: the lease is the safety net.
- Both are encoded once per (tenant, key) (:mod:`.redis_commands`); a request appends its
  member and estimate.
- The tpm settle of a served request (only when the key has a tpm limit and the usage
  differs from the estimate) rides on that release: admission settles before it leaves the
  slot, :meth:`RedisLimits.reconcile` leaves the ``ADJUST`` arguments on the slot, and the
  release's script runs them. Without a held slot (or to refund a refused request) it is
  its own fire-and-forget ``ADJUST``.

Commands from concurrent requests share one multiplexed connection, so under load they go
out together (:mod:`.redis_conn`).

Slots are leases
----------------
A slot is a member of the tenant's sorted set (and of the global one) scored by its
expiry; a key's own slot is the same member in the key's set. :mod:`.redis_leases` renews
every slot this process holds, so a process that dies (SIGKILL, a lost host) gives them
back within ``lease_s``. A request whose task is cancelled while its ``ACQUIRE`` is in
flight gives back, when the reply comes, what the script took for it.

Waiting across processes
------------------------
A request that finds no room and may wait parks in this process's FIFO for its tenant;
:mod:`.redis_waiting` hands it a slot when one frees anywhere in the fleet.

Redis unavailable
-----------------
``on_unavailable = "fail_closed"``: a request that needs the limits gets 503
``service_unavailable`` with ``retry-after``. ``"local"``: this process's own in-process
limits (``LocalLimits``) serve, with a warning log and a ``state.fallback`` event, until
Redis answers again (``state.recovered``); slots taken locally are released locally.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.gateway.capacity import Capacity
from runestone_proxy.gateway.rate_wire import Headers
from runestone_proxy.gateway.ratelimit import (
    UNLIMITED,
    KeyLimits,
    RateLimiter,
    Reservation,
)
from runestone_proxy.gateway.shared_state import Admitted, LocalLimits
from runestone_proxy.gateway.token_estimate import estimate_tokens
from runestone_proxy.server.redis_client import (
    RedisClient,
    RedisUnavailable,
    Reply,
    Script,
    Subscriber,
)
from runestone_proxy.server.redis_commands import Plan, acquire_payload, release_payload
from runestone_proxy.server.redis_leases import Leases
from runestone_proxy.server.redis_scripts import (
    ACQUIRE,
    ADJUST,
    RELEASE,
    RENEW,
    WAITING,
    Settle,
    SharedReservation,
    admitted,
    cancel_args,
    reconcile_settle,
    settle_args,
)
from runestone_proxy.server.redis_slot import RedisJobs, RedisSlot
from runestone_proxy.server.redis_waiting import RedisTenant, Waiting

if TYPE_CHECKING:
    from runestone_proxy.gateway.auth import Principal

log = structlog.get_logger("runestone.state")

_RETRY_AFTER = ((b"retry-after", b"1"),)
#: Plans kept at most (keys come and go): past it they are all rebuilt on demand.
_MAX_PLANS = 65536


@attrs.define(eq=False)
class RedisLimits:
    """See the module docstring. ``run`` must be running in the app's nursery."""

    client: RedisClient
    #: The in-process limits: the fallback, and (its capacity) the tenants' configured limits.
    local: LocalLimits
    prefix: str
    lease_s: float
    fail_closed: bool
    process_id: str = attrs.Factory(lambda: os.urandom(6).hex())
    tenants: dict[str, RedisTenant] = attrs.Factory(dict)
    falling_back: bool = False
    _seq: itertools.count[int] = attrs.Factory(itertools.count)
    #: The waiters of this process, and the dispatcher that hands them slots.
    waiting: Waiting = attrs.field(init=False)
    #: The key slots held here, and the renewal of every slot held here.
    leases: Leases = attrs.field(init=False)
    #: The overflow drainer's view.
    jobs: RedisJobs = attrs.field(init=False)
    #: ACQUIRE and RELEASE encoded by (tenant's slots key, key id): built once, not per
    #: request (:mod:`.redis_commands`).
    _plans: dict[tuple[str, str], Plan] = attrs.Factory(dict)
    _member_prefix: bytes = attrs.field(init=False)
    #: Other users of the connection with a task of their own (the budgets' renewal),
    #: started with the rest in :meth:`run`.
    companions: list[Callable[..., Awaitable[None]]] = attrs.Factory(list)
    #: Other channels for the process's one subscriber connection (name -> callback), set
    #: before :meth:`run`: the shared health's.
    channels: dict[str, Callable[[bytes | None], None]] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.waiting = Waiting(self)
        self.leases = Leases(self)
        self.jobs = RedisJobs(self)
        self._member_prefix = self.process_id.encode() + b":"

    @classmethod
    def build(cls, config: Config, local: LocalLimits, client: RedisClient) -> RedisLimits:
        state = config.state
        for script in (ACQUIRE, RELEASE, RENEW, WAITING, ADJUST):
            client.register(script)
        limits = cls(
            client, local, state.key_prefix, state.lease_s, state.on_unavailable == "fail_closed"
        )
        client.on_state = limits._on_state
        return limits

    @property
    def capacity(self) -> Capacity:
        return self.local.capacity

    @property
    def channel(self) -> str:
        return f"{self.prefix}freed"

    # --- the request path ----------------------------------------------------------------------

    async def admit(
        self,
        principal: Principal,
        body: Mapping[str, Any],
        output_tokens: int,
        request_id: str,
        wants_async: bool,
    ) -> Admitted:
        conn = self.client.conn
        if conn is None or conn.broken is not None:
            return await self._unavailable(principal, body, output_tokens, request_id, wants_async)
        limits = principal.limits
        estimate = estimate_tokens(body, output_tokens) if limits.tpm else 0
        tenant = self.tenants.get(principal.tenant) or self._tenant(principal.tenant)
        plan = self.plan(tenant, principal.key_id, limits, principal.max_concurrent or 0)
        member = self.member()
        try:
            reply = await self.acquire(plan, member, estimate, not tenant.fifo, tenant)
        except RedisUnavailable:
            return await self._unavailable(principal, body, output_tokens, request_id, wants_async)
        reservation, headers = admitted(reply, principal, estimate, request_id)
        held = member if reply[3] else None
        if held is not None:
            tenant.held.add(held)
        key_member = None
        if plan.key_max:
            key_member = member
            self.leases.hold_key(plan.key_slots, member)
        slot = RedisSlot(
            self,
            tenant,
            plan,
            wants_async,
            False,
            principal.key_mask,
            request_id,
            held,
            key_member,
            (reply[4], reply[5]),
        )
        if type(reservation) is SharedReservation:
            reservation.slot = slot
        return reservation, headers, slot

    def plan(self, tenant: RedisTenant, key_id: str, limits: KeyLimits, key_max: int) -> Plan:
        """The encoded commands for ``key_id`` in ``tenant`` under these limits."""
        cap = self.capacity
        tenant_limits = cap.configured.get(tenant.name, cap.default_limits)
        plan = self._plans.get((tenant.key, key_id))
        if plan is None or not plan.fits(limits, tenant_limits, cap.max_concurrent, key_max):
            if len(self._plans) >= _MAX_PLANS:
                self._plans.clear()
            plan = Plan(
                self.prefix,
                tenant.key,
                key_id,
                limits,
                tenant_limits,
                cap.max_concurrent,
                key_max,
                int(self.lease_s * 1000),
                tenant.name,
            )
            self._plans[tenant.key, key_id] = plan
        return plan

    def job_plan(self, tenant: RedisTenant) -> Plan:
        """The commands for a tenant slot alone (a queued job, a waiter): no key, no window."""
        return self.plan(tenant, "-", UNLIMITED, 0)

    async def acquire(
        self, plan: Plan, member: bytes, estimate: int, try_tenant: bool, tenant: RedisTenant
    ) -> list[int]:
        """Run ACQUIRE for ``member``. If the caller is cancelled before the reply comes,
        what the script took for it is given back when it does."""

        def orphan(reply: Reply) -> None:
            if type(reply) is list and reply[1] == 0:
                held = member if reply[3] else None
                key_member = member if plan.key_max else None
                if held is not None or key_member is not None:
                    self.release(tenant, plan, held, key_member)

        payload = acquire_payload(plan, member, estimate, try_tenant)
        reply = await self.client.call_encoded(payload, orphan)
        if type(reply) is not list:  # an error reply: NOSCRIPT is recovered from
            reply = await self.client.recover_encoded(reply, payload, orphan)
        return reply  # type: ignore[no-any-return]  # ACQUIRE's list of integers

    async def _unavailable(
        self,
        principal: Principal,
        body: Mapping[str, Any],
        output_tokens: int,
        request_id: str,
        wants_async: bool,
    ) -> Admitted:
        telemetry.emit(
            "state.unavailable",
            tenant=principal.tenant,
            request_id=request_id,
            fallback=not self.fail_closed,
            error=self.client.why_down,
        )
        if self.fail_closed:
            raise ServiceUnavailable(
                "The gateway's shared limits (Redis) are unavailable. Please try again shortly.",
                headers=_RETRY_AFTER,
            )
        if not self.falling_back:
            self.falling_back = True
            log.warning("state.fallback", backend="redis", error=self.client.why_down)
            telemetry.emit("state.fallback", backend="redis", error=self.client.why_down)
        return await self.local.admit(principal, body, output_tokens, request_id, wants_async)

    def _on_state(self, up: bool) -> None:
        if up and self.falling_back:
            self.falling_back = False
            log.warning("state.recovered", backend="redis")
            telemetry.emit("state.recovered", backend="redis")
        self.waiting.wake()

    def member(self) -> bytes:
        """A new slot member's name: this process's id and a sequence number."""
        return b"%b%d" % (self._member_prefix, next(self._seq))

    def _tenant(self, name: str) -> RedisTenant:
        tenant = self.tenants.get(name)
        if tenant is None:
            if len(self.tenants) >= 4096:
                for n in [n for n, t in self.tenants.items() if not t.held and not t.fifo]:
                    del self.tenants[n]
            tenant = self.tenants[name] = RedisTenant(name, f"{self.prefix}slots:{name}")
        return tenant

    # --- settling ------------------------------------------------------------------------------

    def reconcile(self, reservation: Reservation, actual_tokens: int | None, now: float) -> None:
        if type(reservation) is not SharedReservation:
            self.local.reconcile(reservation, actual_tokens, now)
            return
        settle = reconcile_settle(reservation, actual_tokens)
        if settle is None:
            return
        slot = reservation.slot
        if slot is not None and (slot.held is not None or slot.key_member is not None):
            slot.settle = settle  # sent with the slots' release
        else:
            self.send(ADJUST, *settle_args(reservation, settle, self.prefix))

    def cancel(self, reservation: Reservation, limits: KeyLimits, now: float) -> Headers:
        if type(reservation) is not SharedReservation:
            return self.local.cancel(reservation, limits, now)
        adjust, headers = cancel_args(reservation, limits, self.prefix)
        if adjust is not None:
            self.send(ADJUST, *adjust)
        return headers

    def send(self, script: Script, keys: Any, args: Any) -> None:
        """Fire-and-forget a script (lost if Redis is down: the leases cover it)."""
        self.client.send_script(script, keys, args)

    def release(
        self,
        tenant: RedisTenant,
        plan: Plan,
        member: bytes | None,
        key_member: bytes | None,
        settle: Settle | None = None,
    ) -> None:
        """Give a tenant slot and/or a key slot back, with the request's tpm settle if any
        (fire-and-forget; the leases cover a lost release)."""
        if key_member is not None:
            self.leases.drop_key(plan.key_slots, key_member)
        self.client.send_encoded(release_payload(plan, member, key_member, settle))
        if member is not None:
            tenant.held.discard(member)
            self.waiting.wake()

    # --- leases and shutdown ----------------------------------------------------------------

    async def flush(self) -> None:
        """At shutdown: wait (briefly) until the fire-and-forget releases have been sent."""
        with trio.move_on_after(self.client.timeout_s):
            try:
                await self.client.call("PING")
            except RedisUnavailable:
                pass

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The client's connection, the subscriber (of every channel the process listens
        to: ``freed`` and those in ``channels``), the dispatcher and the renewal task."""
        async with trio.open_nursery() as nursery:
            await nursery.start(self.client.run)
            channels = {self.channel: self.waiting.on_message, **self.channels}
            subscriber = Subscriber(self.client, channels)
            await nursery.start(subscriber.run)
            await nursery.start(self.waiting.dispatch)
            await nursery.start(self.leases.renew)
            for companion in self.companions:
                await nursery.start(companion)
            task_status.started()

    # --- the drainer's view, and /health -------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        snap = self.capacity.snapshot() if self.falling_back else {}
        return {
            "status": "ok" if self.client.up else "unavailable",
            "backend": "redis",
            "url": str(self.client.url),
            "fallback": self.falling_back,
            "on_unavailable": "fail_closed" if self.fail_closed else "local",
            "held_here": sum(len(t.held) for t in self.tenants.values()),
            "key_slots_here": self.leases.key_slots_held(),
            "waiting_here": sum(len(t.fifo) for t in self.tenants.values()),
            **({"local": snap} if snap else {}),
        }


def build(config: Config, ratelimiter: RateLimiter, capacity: Capacity) -> RedisLimits:
    """The Redis limits for ``config.state``, with the in-process ones as the fallback."""
    state = config.state
    assert state.url is not None
    client = RedisClient.from_url(state.url, state.timeout_s, state.tls_ca_file)
    return RedisLimits.build(config, LocalLimits(ratelimiter, capacity), client)
