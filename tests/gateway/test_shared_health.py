"""The pure decisions of a fleet member's breakers and p95 (:mod:`shared_health`), with
plain data: a local breaker, the fleet's view, and what one sync round should do."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.config import BreakerConfig, Config
from runestone_proxy.gateway.breaker import CLOSED, OPEN, Breaker
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.shared_health import (
    Action,
    CountedSamples,
    FleetBreaker,
    LocalHealth,
    fleet_p95_s,
    plan,
)

COOLDOWN = 5.0


def local(state: str = "closed", *, at: float = 0.0, wanted: bool = False) -> Breaker:
    b = Breaker(BreakerConfig(failure_threshold=1, cooldown_s=COOLDOWN), gated=True)
    if state in ("open", "half_open"):
        b.on_result(at, ok=False)
    if state == "half_open":
        b.grant_probe(at + COOLDOWN)
    b.probe_wanted = wanted
    return b


def fleet(
    state: str = "closed", remaining_s: float = 0.0, epoch: int = 3, **kw: str
) -> FleetBreaker:
    return FleetBreaker(OPEN if state == "open" else CLOSED, remaining_s, epoch, kw.get("prober"))


def test_a_transition_elsewhere_is_applied() -> None:
    assert plan(local(), fleet("open", 4.0, epoch=4), 3, 1.0, None, 1.0) is Action.APPLY
    assert plan(local("open"), fleet("closed", epoch=4), 3, 1.0, None, 1.0) is Action.APPLY


def test_joining_takes_the_fleets_state_but_publishes_an_open_breaker_it_does_not_know() -> None:
    assert plan(local(), fleet("open", 4.0), None, 1.0, None, 1.0) is Action.APPLY
    assert plan(local(), fleet(), None, 1.0, None, 1.0) is Action.APPLY
    assert plan(local("open"), fleet(), None, 1.0, None, 1.0) is Action.PUBLISH_OPEN
    assert plan(local("open"), fleet("open", 2.0), None, 1.0, None, 1.0) is Action.APPLY


def test_in_step_and_cooling_nothing_to_do() -> None:
    assert plan(local(), fleet(), 3, 1.0, None, 1.0) is Action.NOTHING
    assert plan(local("open"), fleet("open", 2.0), 3, 1.0, None, 1.0) is Action.NOTHING


def test_past_the_cooldown_a_process_with_demand_claims_the_probe() -> None:
    due = fleet("open", -0.1)
    assert plan(local("open", wanted=True), due, 3, 6.0, None, 1.0) is Action.CLAIM
    assert plan(local("open", wanted=False), due, 3, 6.0, None, 1.0) is Action.NOTHING
    taken = fleet("open", -0.1, prober="elsewhere")
    assert plan(local("open", wanted=True), taken, 3, 6.0, None, 1.0) is Action.NOTHING
    # Its own cooldown not over yet (clocks a little apart): the next round claims.
    assert plan(local("open", at=2.0, wanted=True), due, 3, 6.0, None, 1.0) is Action.NOTHING


def test_the_prober_renews_while_its_probe_is_out_and_gives_back_an_idle_grant() -> None:
    due = fleet("open", -1.0, prober="here")
    b = local("half_open")
    assert plan(b, due, 3, 5.5, 5.0, 1.0) is Action.CLAIM  # just granted
    assert plan(b, due, 3, 7.0, 5.0, 1.0) is Action.RELEASE  # no probe went out
    b.allow(7.0)
    assert b.probes_in_flight == 1
    assert plan(b, due, 3, 9.0, 5.0, 1.0) is Action.CLAIM  # out: renew
    lapsed = fleet("open", -3.0)  # its lease lapsed, nobody took it: take it back
    assert plan(b, lapsed, 3, 9.0, 5.0, 1.0) is Action.CLAIM


def test_a_half_open_breaker_whose_lease_went_elsewhere_waits() -> None:
    taken = fleet("open", -1.0, prober="elsewhere")
    assert plan(local("half_open"), taken, 3, 6.0, 5.0, 1.0) is Action.YIELD


def test_counted_samples_hand_out_only_what_is_new() -> None:
    samples = CountedSamples(maxlen=4)
    assert samples.take_fresh() == []
    for v in (1.0, 2.0, 3.0):
        samples.append(v)
    assert samples.take_fresh() == [1.0, 2.0, 3.0]
    assert samples.take_fresh() == []
    for v in (4.0, 5.0, 6.0, 7.0, 8.0, 9.0):  # more than the window: the newest four
        samples.append(v)
    assert samples.take_fresh() == [6.0, 7.0, 8.0, 9.0]
    assert list(samples) == [6.0, 7.0, 8.0, 9.0]


@given(st.lists(st.floats(min_value=0, max_value=1e5, allow_nan=False), max_size=600))
def test_the_fleet_p95_is_the_local_rule_over_the_pooled_samples(values: list[float]) -> None:
    p95 = fleet_p95_s(values)
    if len(values) < 20:
        assert p95 is None
        return
    assert p95 is not None
    ordered = sorted(values)
    assert p95 == pytest.approx(round(ordered[int(0.95 * len(ordered))], 3) / 1000)
    assert ordered[0] / 1000 <= p95 + 1e-9


async def test_the_embedded_default_shares_nothing_and_keeps_the_plain_window() -> None:
    deps = Deployments.from_config(Config())  # the shipped default: the mock provider
    assert isinstance(deps.health, LocalHealth)
    for name, d in deps.by_name.items():
        assert type(d.ttft_ms) is not CountedSamples
        assert not d.breaker.gated
        assert deps.snapshot()[name]["health"] == "local"
