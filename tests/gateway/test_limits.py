"""The capacity policy as plain data: no event loop, no clock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config import TenancyConfig, TenantConfig
from runestone_proxy.gateway.limits import (
    ADMIT,
    ENQUEUE,
    REJECT,
    Admit,
    ContenderState,
    Enqueue,
    GlobalState,
    Reject,
    TenantLimits,
    TenantState,
    Wait,
    admit,
    has_room,
    pick,
)

ROOM = GlobalState(in_flight=0, max_concurrent=100)
FULL = GlobalState(in_flight=100, max_concurrent=100)


def limits(
    on_limit: str = "wait", max_concurrent: int = 2, max_wait_s: float = 2.0
) -> TenantLimits:
    return TenantLimits(max_concurrent, on_limit, max_wait_s)  # type: ignore[arg-type]


def test_resolve_takes_defaults_from_tenancy() -> None:
    tenancy = TenancyConfig(default_max_concurrent=7, global_max_concurrent=50)
    assert TenantLimits.resolve(None, tenancy) == TenantLimits(7, "wait", 2.0, 1.0)
    assert TenantLimits.resolve(TenantConfig(), tenancy).max_concurrent == 7
    cfg = TenantConfig(max_concurrent=3, on_limit="reject", max_wait_ms=250, weight=2.5)
    assert TenantLimits.resolve(cfg, tenancy) == TenantLimits(3, "reject", 0.25, 2.5)


@pytest.mark.parametrize("on_limit", ["wait", "queue", "reject"])
@pytest.mark.parametrize("wants_async", [False, True])
def test_admits_with_a_free_slot_whatever_the_policy(on_limit: str, wants_async: bool) -> None:
    decision = admit(TenantState(1, 0), limits(on_limit), ROOM, wants_async=wants_async)
    assert decision is ADMIT


@pytest.mark.parametrize(
    ("state", "glob"),
    [
        (TenantState(2, 0), ROOM),  # the tenant's own cap
        (TenantState(0, 0), FULL),  # the global cap
        (TenantState(0, 1), ROOM),  # a slot is free, but someone of this tenant queues
    ],
)
@pytest.mark.parametrize(
    ("on_limit", "wants_async", "expected"),
    [
        ("wait", False, Wait(2.0)),
        ("wait", True, ENQUEUE),
        ("queue", False, ENQUEUE),
        ("queue", True, ENQUEUE),
        ("reject", False, REJECT),
        ("reject", True, ENQUEUE),
    ],
)
def test_at_capacity_the_policy_decides(
    state: TenantState, glob: GlobalState, on_limit: str, wants_async: bool, expected: object
) -> None:
    assert admit(state, limits(on_limit), glob, wants_async=wants_async) == expected


def test_wait_with_no_patience_is_a_reject() -> None:
    assert admit(TenantState(2, 0), limits(max_wait_s=0), ROOM, wants_async=False) == Reject()


def test_decisions_are_values() -> None:
    assert Admit() == ADMIT
    assert Enqueue() == ENQUEUE
    assert Reject().retry_after_s == 1.0
    assert Wait(0.5) != Wait(1.0)


@given(
    in_flight=st.integers(0, 10),
    waiting=st.integers(0, 3),
    cap=st.integers(1, 10),
    glob_in=st.integers(0, 10),
    glob_cap=st.integers(1, 10),
    on_limit=st.sampled_from(["wait", "queue", "reject"]),
    wants_async=st.booleans(),
)
@settings(derandomize=True)
def test_never_admits_past_a_cap_or_a_queue(
    in_flight: int,
    waiting: int,
    cap: int,
    glob_in: int,
    glob_cap: int,
    on_limit: str,
    wants_async: bool,
) -> None:
    state, glob = TenantState(in_flight, waiting), GlobalState(glob_in, glob_cap)
    decision = admit(state, limits(on_limit, cap), glob, wants_async=wants_async)
    room = in_flight < cap and glob_in < glob_cap and waiting == 0
    assert (decision is ADMIT) == room == has_room(state, limits(on_limit, cap), glob)


# --- pick: who gets a freed slot ---------------------------------------------------------------


def c(
    name: str, in_flight: int, head_seq: int, cap: int = 10, weight: float = 1.0
) -> ContenderState:
    return ContenderState(name, in_flight, cap, weight, head_seq)


def test_pick_prefers_the_tenant_with_less_in_flight() -> None:
    a, b = c("a", 5, head_seq=1), c("b", 1, head_seq=50)
    assert pick([a, b], ROOM) is b


def test_pick_breaks_ties_by_the_longest_waiting_head() -> None:
    a, b = c("a", 2, head_seq=9), c("b", 2, head_seq=3)
    assert pick([a, b], ROOM) is b
    assert pick([b, a], ROOM) is b


def test_pick_weighs_shares() -> None:
    heavy, light = c("heavy", 3, head_seq=2, weight=4.0), c("light", 1, head_seq=1)
    assert pick([heavy, light], ROOM) is heavy  # 3/4 < 1/1


def test_pick_skips_tenants_at_their_own_cap() -> None:
    capped, other = c("capped", 2, head_seq=1, cap=2), c("other", 8, head_seq=2)
    assert pick([capped, other], ROOM) is other
    assert pick([capped], ROOM) is None


def test_pick_nobody_when_the_global_cap_is_full() -> None:
    assert pick([c("a", 0, head_seq=1)], FULL) is None
    assert pick([], ROOM) is None


def test_weighted_shares_of_the_global_cap() -> None:
    """Two tenants with waiters to spare fill a global cap of 30 in a 2:1 ratio by weight,
    alternating rather than one after the other."""
    in_flight = {"a": 0, "b": 0}
    weights = {"a": 2.0, "b": 1.0}
    order = []
    for seq in range(100):
        contenders = [c(n, in_flight[n], seq, cap=100, weight=weights[n]) for n in "ab"]
        chosen = pick(contenders, GlobalState(sum(in_flight.values()), 30))
        if chosen is None:
            break
        in_flight[chosen.name] += 1
        order.append(chosen.name)
    assert in_flight == {"a": 20, "b": 10}
    assert "".join(order[:9]) == "abaabaaba"  # interleaved: a's share is 2 / (2 + 1)
