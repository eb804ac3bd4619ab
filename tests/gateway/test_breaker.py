"""The circuit breaker's state table, row by row, with plain data (time is a number)."""

from __future__ import annotations

import pytest

from runestone_proxy.config import BreakerConfig
from runestone_proxy.gateway.breaker import TRANSITIONS, Breaker, State

CONFIG = BreakerConfig(
    failure_threshold=3,
    error_rate_threshold=0.5,
    window_s=10.0,
    min_requests=6,
    cooldown_s=5.0,
    half_open_probes=1,
)


def breaker(**changes: float) -> Breaker:
    fields = {
        "failure_threshold": CONFIG.failure_threshold,
        "error_rate_threshold": CONFIG.error_rate_threshold,
        "window_s": CONFIG.window_s,
        "min_requests": CONFIG.min_requests,
        "cooldown_s": CONFIG.cooldown_s,
        "half_open_probes": CONFIG.half_open_probes,
        **changes,
    }
    return Breaker(BreakerConfig(**fields))  # type: ignore[arg-type]


def opened(at: float = 0.0, **changes: float) -> Breaker:
    b = breaker(**changes)
    for _ in range(b.config.failure_threshold):
        b.on_result(at, ok=False)
    assert b.state is State.OPEN
    return b


def half_open(at: float = 5.0, **changes: float) -> Breaker:
    b = opened(0.0, **changes)
    assert b.allow(at) == (True, State.HALF_OPEN)
    return b


def test_the_transition_table_is_the_documented_one() -> None:
    assert {
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.CLOSED),  # the fleet's verdict (apply_fleet)
    } == TRANSITIONS
    b = breaker()
    with pytest.raises(AssertionError):
        b._move(State.HALF_OPEN, 0.0)  # closed -> half_open is not a row


# closed   success   closed
def test_closed_success_stays_closed_and_resets_the_streak() -> None:
    b = breaker()
    assert b.on_result(0.0, ok=False) is None
    assert b.consecutive_failures == 1
    assert b.on_result(0.1, ok=True) is None
    assert (b.state, b.consecutive_failures) == (State.CLOSED, 0)
    assert b.allow(0.2) == (True, None)


# closed   failure, < threshold and rate ok   closed
def test_closed_failures_below_the_threshold_stay_closed() -> None:
    b = breaker(min_requests=100)  # the rate rule needs more requests than this
    for t in range(12):  # fail, fail, ok, ...: never three failures in a row
        assert b.on_result(float(t), ok=t % 3 == 2) is None
        assert b.state is State.CLOSED
    assert b.consecutive_failures == 0


# closed   failure_threshold consecutive failures   open
def test_closed_opens_after_threshold_consecutive_failures() -> None:
    b = breaker()
    assert b.on_result(1.0, ok=False) is None
    assert b.on_result(2.0, ok=False) is None
    assert b.on_result(3.0, ok=False) is State.OPEN
    assert (b.state, b.opened_at) == (State.OPEN, 3.0)


# closed   error rate >= threshold over window   open
def test_closed_opens_on_error_rate_once_min_requests_are_in() -> None:
    b = breaker(failure_threshold=100)
    results = [True, False, True, False, True]
    for t, ok in enumerate(results):
        assert b.on_result(float(t), ok) is None  # 2/5 failed, and under min_requests
    assert b.on_result(5.0, ok=False) is State.OPEN  # 3/6 = 0.5 over six requests


def test_error_rate_below_min_requests_never_trips() -> None:
    b = breaker(failure_threshold=100, min_requests=6)
    for t in range(5):
        assert b.on_result(float(t), ok=False) is None
    assert b.state is State.CLOSED
    assert b.error_rate(5.0) == 1.0


def test_error_rate_only_counts_the_window() -> None:
    b = breaker(failure_threshold=100, min_requests=4)
    for t in range(3):
        b.on_result(float(t), ok=False)
    # Eleven seconds later the old failures have left the 10 s window.
    for t in range(13, 16):
        b.on_result(float(t), ok=True)
    assert b.on_result(16.0, ok=False) is None  # 1/4 in the window
    assert b.state is State.CLOSED
    assert b.error_rate(16.0) == 0.25
    assert b.error_rate(100.0) == 0.0


# open   cooldown elapsed (on allow/ready_at)   half_open
def test_open_refuses_until_the_cooldown_then_admits_one_probe() -> None:
    b = opened(at=10.0)
    assert b.allow(12.0) == (False, None)
    assert b.ready_at(12.0) == 15.0
    assert b.ready_at(20.0) == 20.0
    assert b.allow(15.0) == (True, State.HALF_OPEN)
    assert (b.state, b.probes_in_flight) == (State.HALF_OPEN, 1)


def test_open_ignores_stragglers() -> None:
    b = opened(at=0.0)
    assert b.on_result(1.0, ok=True) is None
    assert b.on_result(1.0, ok=False) is None
    assert (b.state, b.opened_at) == (State.OPEN, 0.0)


def test_half_open_admits_at_most_the_probe_limit() -> None:
    b = opened(at=0.0, half_open_probes=2)
    assert b.allow(5.0) == (True, State.HALF_OPEN)
    assert b.allow(5.1) == (True, None)
    assert b.allow(5.2) == (False, None)
    assert b.ready_at(5.2) > 5.2  # told when to come back
    b.release_probe()  # a probe ended without a verdict (client went away)
    assert b.ready_at(5.3) == 5.3
    assert b.allow(5.3) == (True, None)
    assert b.probes_in_flight == 2


# half_open   probe succeeded   closed
def test_half_open_probe_success_closes() -> None:
    b = half_open()
    assert b.on_result(6.0, ok=True) is State.CLOSED
    assert (b.state, b.consecutive_failures, b.probes_in_flight) == (State.CLOSED, 0, 0)
    assert b.error_rate(6.0) == 0.0  # the window starts afresh
    assert b.allow(6.0) == (True, None)


# half_open   probe failed   open (cooldown restarts)
def test_half_open_probe_failure_reopens_and_restarts_the_cooldown() -> None:
    b = half_open(at=5.0)
    assert b.on_result(7.0, ok=False) is State.OPEN
    assert (b.state, b.opened_at, b.probes_in_flight) == (State.OPEN, 7.0, 0)
    assert b.allow(11.0) == (False, None)
    assert b.ready_at(11.0) == 12.0
    assert b.allow(12.0) == (True, State.HALF_OPEN)


# --- a fleet member's breaker (gated; the fleet's verdicts applied) --------------------------


def test_gated_open_waits_past_the_cooldown_for_the_grant() -> None:
    b = opened(at=0.0)
    b.gated = True
    assert b.allow(1.0) == (False, None)
    assert b.probe_wanted  # demand noted while cooling
    assert not b.cooled(1.0)
    assert b.cooled(5.0)
    assert b.allow(5.0) == (False, None)  # past the cooldown, but no grant: refused
    assert b.state is State.OPEN
    assert b.ready_at(6.0) == 11.0  # the fleet's probe decides: told to come back later
    assert b.grant_probe(6.0) is State.HALF_OPEN
    assert not b.probe_wanted
    assert b.allow(6.0) == (True, None)
    assert b.probes_in_flight == 1


def test_a_grant_before_the_cooldown_ends_is_refused() -> None:
    b = opened(at=0.0)
    b.gated = True
    assert b.grant_probe(4.0) is None
    assert b.state is State.OPEN


def test_the_fleet_opening_a_closed_breaker_uses_the_fleets_cooldown() -> None:
    b = breaker()
    assert b.apply_fleet(State.OPEN, 2.0, now=100.0) is State.OPEN
    assert b.ready_at(100.0) == 102.0  # 2 s left of the fleet's 5 s cooldown
    assert b.apply_fleet(State.OPEN, 1.0, now=100.5) is None  # re-timed, no transition
    assert b.ready_at(100.5) == 101.5


def test_the_fleet_cooldown_is_clamped_to_this_breakers() -> None:
    b = breaker()
    b.apply_fleet(State.OPEN, 60.0, now=0.0)
    assert b.ready_at(0.0) == 5.0
    b.apply_fleet(State.OPEN, -3.0, now=10.0)  # past it: a probe is due
    assert b.cooled(10.0)


def test_the_fleet_closing_an_open_or_half_open_breaker() -> None:
    b = opened(at=0.0)
    assert b.apply_fleet(State.CLOSED, 0.0, now=1.0) is State.CLOSED
    assert (b.state, b.consecutive_failures, b.probes_in_flight) == (State.CLOSED, 0, 0)
    h = half_open()
    assert h.apply_fleet(State.CLOSED, 0.0, now=6.0) is State.CLOSED
    assert h.probes_in_flight == 0
    assert breaker().apply_fleet(State.CLOSED, 0.0, now=1.0) is None


def test_another_process_taking_the_probe_sends_a_half_open_breaker_back_to_wait() -> None:
    b = half_open(at=5.0)
    assert b.apply_fleet(State.OPEN, 0.0, now=6.0) is State.OPEN
    assert b.cooled(6.0)  # the cooldown is not restarted: it waits for the verdict
    assert b.probes_in_flight == 0
    b.release_probe()  # its own probe, ending later without a verdict: nothing to free
    assert b.on_result(7.0, ok=True) is None  # nor does its result count (a straggler)
