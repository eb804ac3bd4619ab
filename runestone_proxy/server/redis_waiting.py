"""Waiting for a tenant slot on Redis: this process's FIFOs and the dispatcher that hands
them the slots that free anywhere in the fleet (the rest of the limits: :mod:`.redis_limits`).

How this works
--------------
A request that finds no room and may wait joins this process's FIFO for its tenant (order
within a process is FIFO, as in-process). The process registers in ``waiting``; a release
anywhere then ``PUBLISH``es on ``freed`` (only while someone waits: no fan-out otherwise).
One subscriber connection per process wakes the dispatcher task, which retries for the
FIFO heads, least-served tenant first, and hands each slot it gets to the head waiter. It
also retries every :data:`POLL_S` while anyone waits: a dead process's lease expiring
publishes nothing, and pub/sub drops messages while the subscriber reconnects. Across
processes there is no global FIFO: whoever retries first after a release wins.

A waiter is parked with ``trio.lowlevel`` (no Event, no channel): the dispatcher puts the
slot's member on it and reschedules it; a waiter cancelled or timed out leaves its FIFO in
the abort callback. Redis failing while requests wait: with ``fail_closed`` each waiter is
woken with its own 503.
"""

from __future__ import annotations

import math
from collections import deque
from typing import TYPE_CHECKING, Any

import attrs
import outcome
import trio

from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.server.redis_client import RedisUnavailable
from runestone_proxy.server.redis_scripts import WAITING

if TYPE_CHECKING:
    from runestone_proxy.server.redis_limits import RedisLimits

__all__ = ["POLL_S", "RedisTenant", "Waiting"]

#: How often waiters retry without a message (an expired lease publishes nothing).
POLL_S = 0.2
_RETRY_AFTER = ((b"retry-after", b"1"),)


@attrs.define(eq=False, slots=True)
class _Waiter:
    task: trio.lowlevel.Task
    seq: int
    member: bytes | None = None


@attrs.define(eq=False, slots=True)
class RedisTenant:
    """A tenant as this process sees it: the slots it holds here, and its waiters."""

    name: str
    key: str
    held: set[bytes] = attrs.Factory(set)
    fifo: deque[_Waiter] = attrs.Factory(deque)


@attrs.define(eq=False)
class Waiting:
    """This process's waiters and their dispatcher (module docstring)."""

    limits: RedisLimits
    #: Tenants with at least one waiter.
    contending: set[RedisTenant] = attrs.Factory(set)
    _kick: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    _kicked: bool = False
    _freed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    _seq: int = 0

    async def wait(self, tenant: RedisTenant, max_wait_s: float) -> bytes | None:
        """Park in the tenant's FIFO until the dispatcher hands over a slot (its member), or
        ``max_wait_s`` passes (None)."""
        self._seq += 1
        waiter = _Waiter(trio.lowlevel.current_task(), self._seq)
        if not self.contending:
            self._register(True)
        tenant.fifo.append(waiter)
        self.contending.add(tenant)
        self.wake()

        def abort(_: Any) -> trio.lowlevel.Abort:
            self._leave(tenant, waiter)
            return trio.lowlevel.Abort.SUCCEEDED

        with trio.move_on_after(max_wait_s):
            await trio.lowlevel.wait_task_rescheduled(abort)
        member = waiter.member
        if member is not None:
            try:
                await trio.lowlevel.checkpoint_if_cancelled()
            except BaseException:
                self.limits.release(tenant, self.limits.job_plan(tenant), member, None)
                raise
        return member

    def _register(self, on: bool) -> None:
        """This process has (or no longer has) a waiting request: releases anywhere
        publish on ``freed`` only while some process has one."""
        limits = self.limits
        args = (int(limits.lease_s * 1000) if on else 0, limits.process_id, 1 if on else 0)
        limits.send(WAITING, (f"{limits.prefix}waiting",), args)

    def _leave(self, tenant: RedisTenant, waiter: _Waiter) -> None:
        tenant.fifo.remove(waiter)
        if not tenant.fifo:
            self._leave_empty(tenant)

    def wake(self) -> None:
        """A slot may have freed: kick the dispatcher (if anyone waits) and the drainer."""
        if self.contending:
            self._kicked = True
            if self._kick:
                self._kick.unpark()
        if self._freed:
            self._freed.unpark_all()

    def on_message(self, payload: bytes | None) -> None:
        """A slot was freed somewhere (or the subscriber reconnected: maybe missed one)."""
        self.wake()

    async def dispatch(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hand slots to waiters as they free (see the module docstring)."""
        task_status.started()
        while True:
            if not self._kicked:
                with trio.move_on_after(POLL_S if self.contending else math.inf):
                    await self._kick.park()
            self._kicked = False
            for tenant in sorted(self.contending, key=lambda t: (len(t.held), t.fifo[0].seq)):
                await self._serve_fifo(tenant)

    async def _serve_fifo(self, tenant: RedisTenant) -> None:
        limits = self.limits
        plan = limits.job_plan(tenant)
        while tenant.fifo:
            member = limits.member()
            try:
                reply = await limits.acquire(plan, member, 0, True, tenant)
            except RedisUnavailable:
                if limits.fail_closed:
                    self._fail_waiters(tenant)
                return
            if not reply[3]:
                return
            if not tenant.fifo:  # the waiters left meanwhile
                limits.release(tenant, plan, member, None)
                return
            waiter = tenant.fifo.popleft()
            if not tenant.fifo:
                self._leave_empty(tenant)
            waiter.member = member
            tenant.held.add(member)
            trio.lowlevel.reschedule(waiter.task)

    def _leave_empty(self, tenant: RedisTenant) -> None:
        self.contending.discard(tenant)
        if not self.contending:
            self._register(False)

    def _fail_waiters(self, tenant: RedisTenant) -> None:
        while tenant.fifo:  # an outcome is unwrapped once: one per waiter
            error = ServiceUnavailable(
                "The gateway's shared limits (Redis) became unavailable while this request "
                "waited for a slot. Please try again shortly.",
                headers=_RETRY_AFTER,
            )
            trio.lowlevel.reschedule(tenant.fifo.popleft().task, outcome.Error(error))
        self._leave_empty(tenant)

    async def wait_freed(self) -> None:
        """Until a slot may have freed: a release here or a ``freed`` message (or a poll:
        spurious wake-ups are allowed, the caller re-checks)."""
        with trio.move_on_after(1.0):
            await self._freed.park()
