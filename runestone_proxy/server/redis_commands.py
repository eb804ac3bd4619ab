"""The two commands of a request on the Redis limits, encoded once per (tenant, key).

Every admitted request sends :data:`~.redis_scripts.ACQUIRE` and, at its end,
:data:`~.redis_scripts.RELEASE`. Of their 16 and 9 to 12 arguments only two or three change
from one request to the next (the slot's member, the token estimate, whether to try for the
tenant's slot; at the end the members and the tpm settle); the rest (the SHA, the keys, the
tenant's and key's limits, the lease) are the same for every request of one key in one
tenant. So a :class:`Plan` holds both commands RESP-encoded up to those arguments, and a
request appends its own with one bytes format: no ``pack_command`` of the whole list, no
argument tuple, no key strings built per request.

A plan is valid while the limits it encoded are the ones in force: the caller keeps plans
by (tenant, key id) and checks them by identity (:meth:`Plan.fits`; a reload or a key's
new settings make new ``KeyLimits`` / ``TenantLimits`` objects, so a stale plan is
rebuilt, never used).
"""

from __future__ import annotations

from runestone_proxy.gateway.limits import TenantLimits
from runestone_proxy.gateway.ratelimit import KeyLimits
from runestone_proxy.server.redis_client import command_prefix
from runestone_proxy.server.redis_scripts import ACQUIRE, MINUTE_US, RELEASE, Settle

__all__ = ["Plan", "acquire_payload", "release_payload"]

_MINUTE = b"%d" % MINUTE_US


class Plan:
    """ACQUIRE and RELEASE for one key in one tenant, encoded up to the per-request
    arguments (module docstring)."""

    __slots__ = (
        "acquire",
        "global_max",
        "key_max",
        "key_slots",
        "limits",
        "release",
        "release_settle",
        "tenant_limits",
    )

    def __init__(
        self,
        prefix: str,
        tenant_key: str,
        key_id: str,
        limits: KeyLimits,
        tenant_limits: TenantLimits,
        global_max: int,
        key_max: int,
        lease_ms: int,
        tenant_name: str,
    ) -> None:
        self.limits = limits
        self.tenant_limits = tenant_limits
        self.global_max = global_max
        self.key_max = key_max
        rl = f"{prefix}rl:{key_id}:"
        #: The key's slot set (its members are renewed there).
        self.key_slots = f"{prefix}kslots:{key_id}"
        gslots = f"{prefix}gslots"
        keys = (tenant_key, gslots, f"{rl}rpm", f"{rl}rph", f"{rl}tpm", self.key_slots)
        fixed = (
            lease_ms,
            tenant_limits.max_concurrent,
            global_max,
            limits.rpm or 0,
            limits.rph or 0,
            limits.tpm or 0,
            key_max,
        )
        self.acquire = command_prefix(
            3 + len(keys) + len(fixed) + 3, ("EVALSHA", ACQUIRE.sha, len(keys), *keys, *fixed)
        )
        releasing = (tenant_key, gslots, f"{prefix}waiting", self.key_slots)
        announce = (f"{prefix}freed", tenant_name)
        self.release = command_prefix(
            3 + len(releasing) + 4, ("EVALSHA", RELEASE.sha, len(releasing), *releasing, *announce)
        )
        settling = (*releasing, f"{rl}tpm")
        self.release_settle = command_prefix(
            3 + len(settling) + 7, ("EVALSHA", RELEASE.sha, len(settling), *settling, *announce)
        )

    def fits(
        self, limits: KeyLimits, tenant_limits: TenantLimits, global_max: int, key_max: int
    ) -> bool:
        """Whether this plan encodes exactly these limits (the objects in force now)."""
        return (
            self.limits is limits
            and self.tenant_limits is tenant_limits
            and self.global_max == global_max
            and self.key_max == key_max
        )


def acquire_payload(plan: Plan, member: bytes, estimate: int, try_tenant: bool) -> bytes:
    """ACQUIRE for one request: its slots' member, its token estimate, and whether to try
    for the tenant's slot (not while this process has waiters for it: they go first)."""
    est = b"%d" % estimate
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$1\r\n%b\r\n" % (
        plan.acquire,
        len(member),
        member,
        len(est),
        est,
        b"1" if try_tenant else b"0",
    )


def release_payload(
    plan: Plan, member: bytes | None, key_member: bytes | None, settle: Settle | None
) -> bytes:
    """RELEASE of a tenant slot's ``member`` and the key slot's ``key_member`` (None: that
    one is not held), with the request's tpm ``settle`` if any."""
    m = member or b""
    k = key_member or b""
    if settle is None:
        return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n" % (plan.release, len(m), m, len(k), k)
    bucket, delta = b"%d" % settle[0], b"%d" % settle[1]
    return b"%b$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n$%d\r\n%b\r\n" % (
        plan.release_settle,
        len(m),
        m,
        len(k),
        k,
        len(bucket),
        bucket,
        len(delta),
        delta,
        len(_MINUTE),
        _MINUTE,
    )
