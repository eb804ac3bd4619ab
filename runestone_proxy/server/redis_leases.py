"""The leases of the slots this process holds on Redis, and the task that renews them.

A slot on Redis (a tenant's, with its gateway-wide twin, or a key's own) is a member of a
sorted set scored by its expiry (:mod:`.redis_scripts`). This process remembers which
members it holds (a tenant's on its :class:`~.redis_waiting.RedisTenant`, a key's here)
and extends all of them every ``lease_s / 3`` in one pipelined round trip, with its entry
in the ``waiting`` set while it has waiters. A process that dies stops renewing, so its
slots come back within ``lease_s``. A renewal re-adds a member that an outage longer than
the lease let expire: its request is still running, so it counts again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs
import trio

from runestone_proxy.server.redis_client import RedisUnavailable
from runestone_proxy.server.redis_scripts import RENEW, WAITING

if TYPE_CHECKING:
    from runestone_proxy.server.redis_limits import RedisLimits

__all__ = ["Leases"]

#: Members per RENEW command (one script call runs for a bounded time).
_BATCH = 500


@attrs.define(eq=False)
class Leases:
    """The key slots this process holds, and the renewal of every slot it holds."""

    limits: RedisLimits
    #: The key slots held here: the key's slot set -> members.
    keys: dict[str, set[bytes]] = attrs.Factory(dict)

    def hold_key(self, key_slots: str, member: bytes) -> None:
        held = self.keys.get(key_slots)
        if held is None:
            held = self.keys[key_slots] = set()
        held.add(member)

    def drop_key(self, key_slots: str, member: bytes) -> None:
        held = self.keys.get(key_slots)
        if held is not None:
            held.discard(member)
            if not held:
                del self.keys[key_slots]

    def key_slots_held(self) -> int:
        return sum(len(members) for members in self.keys.values())

    async def renew(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every ``lease_s / 3``: extend the leases of every slot this process holds."""
        task_status.started()
        limits = self.limits
        client, prefix = limits.client, limits.prefix
        lease_ms = int(limits.lease_s * 1000)
        gslots = f"{prefix}gslots"
        while True:
            await trio.sleep(limits.lease_s / 3)
            held: list[tuple[tuple[str, ...], list[bytes]]] = [
                ((t.key, gslots), list(t.held)) for t in limits.tenants.values() if t.held
            ]
            held += [((k,), list(members)) for k, members in self.keys.items()]
            commands: list[tuple[Any, ...]] = []
            for keys, members in held:
                for i in range(0, len(members), _BATCH):
                    args: tuple[int | bytes, ...] = (lease_ms, *members[i : i + _BATCH])
                    commands.append(client.evalsha_args(RENEW, keys, args))
            if limits.waiting.contending:
                args2 = (lease_ms, limits.process_id, 1)
                commands.append(client.evalsha_args(WAITING, (f"{prefix}waiting",), args2))
            if not commands:
                continue
            try:
                await client.pipeline(commands)
            except RedisUnavailable:
                continue  # the leases may run out; renewal re-adds them when Redis is back
