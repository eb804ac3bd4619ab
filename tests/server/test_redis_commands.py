"""The pre-encoded ACQUIRE and RELEASE (``server/redis_commands.py``) are byte for byte what
``hiredis.pack_command`` makes of the whole argument list, whatever the names and numbers."""

from __future__ import annotations

import hiredis
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.gateway.limits import TenantLimits
from runestone_proxy.gateway.ratelimit import KeyLimits
from runestone_proxy.server.redis_commands import Plan, acquire_payload, release_payload
from runestone_proxy.server.redis_scripts import ACQUIRE, MINUTE_US, RELEASE

names = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=20)
limit = st.none() | st.integers(1, 10**12)
members = st.binary(min_size=1, max_size=30)


@settings(max_examples=100, derandomize=True, deadline=None)
@given(
    tenant=names,
    key_id=names,
    rpm=limit,
    rph=limit,
    tpm=limit,
    tenant_max=st.integers(1, 10**6),
    global_max=st.integers(1, 10**6),
    key_max=st.integers(0, 10**6),
    member=members,
    estimate=st.integers(0, 10**9),
    try_tenant=st.booleans(),
    released=st.none() | members,
    settle=st.none() | st.tuples(st.integers(0, 10**12), st.integers(-(10**9), 10**9)),
)
def test_the_encoded_commands_are_what_pack_command_makes(
    tenant: str,
    key_id: str,
    rpm: int | None,
    rph: int | None,
    tpm: int | None,
    tenant_max: int,
    global_max: int,
    key_max: int,
    member: bytes,
    estimate: int,
    try_tenant: bool,
    released: bytes | None,
    settle: tuple[int, int] | None,
) -> None:
    p = "rs:"
    tkey = f"{p}slots:{tenant}"
    plan = Plan(
        p,
        tkey,
        key_id,
        KeyLimits(rpm, rph, tpm),
        TenantLimits(tenant_max),
        global_max,
        key_max,
        30_000,
        tenant,
    )
    rl, ks = f"{p}rl:{key_id}:", f"{p}kslots:{key_id}"
    keys = (tkey, f"{p}gslots", f"{rl}rpm", f"{rl}rph", f"{rl}tpm", ks)
    argv = (30_000, tenant_max, global_max, rpm or 0, rph or 0, tpm or 0, key_max)
    tail = (member, estimate, 1 if try_tenant else 0)
    want = hiredis.pack_command(("EVALSHA", ACQUIRE.sha, 6, *keys, *argv, *tail))  # type: ignore[arg-type]
    assert acquire_payload(plan, member, estimate, try_tenant) == want

    rkeys: tuple[str, ...] = (tkey, f"{p}gslots", f"{p}waiting", ks)
    rargs: tuple[object, ...] = (f"{p}freed", tenant, released or b"", member)
    if settle is not None:
        rkeys += (f"{rl}tpm",)
        rargs += (*settle, MINUTE_US)
    want = hiredis.pack_command(("EVALSHA", RELEASE.sha, len(rkeys), *rkeys, *rargs))  # type: ignore[arg-type]
    assert release_payload(plan, released, member, settle) == want
