"""The supervisor's decisions, without processes: notifications, the worker state table,
readiness, restarts and exit statuses (server/supervisor_policy.py)."""

from __future__ import annotations

import os
import signal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config import Config, ServerConfig
from runestone_proxy.server.supervisor import wanted
from runestone_proxy.server.supervisor_policy import (
    TRANSITIONS,
    GiveUp,
    Notification,
    Restart,
    RestartPolicy,
    WorkerState,
    all_ready,
    decide_restart,
    describe_exit,
    next_state,
    parse_notification,
    startup_failed,
    worker_count,
)

S = WorkerState


def test_parse_notification_reads_flags_and_status() -> None:
    note = parse_notification(b"READY=1\nSTATUS=listening on port 1\nMAINPID=5\nWATCHDOG=0")
    assert note == Notification(frozenset({"READY"}), "listening on port 1")
    assert parse_notification(b"RELOADING=1\nMONOTONIC_USEC=12").flags == {"RELOADING"}
    assert parse_notification(b"\xff\xfe garbage").flags == frozenset()


@pytest.mark.parametrize(
    ("state", "data", "after"),
    [
        (S.STARTING, b"READY=1", S.READY),
        (S.READY, b"RELOADING=1\nMONOTONIC_USEC=1", S.RELOADING),
        (S.RELOADING, b"READY=1\nSTATUS=reloaded", S.READY),
        (S.READY, b"STOPPING=1", S.STOPPING),
        (S.STARTING, b"STOPPING=1", S.STOPPING),
        (S.STOPPING, b"READY=1", S.STOPPING),  # a drain is never undone
        (S.STARTING, b"RELOADING=1", S.STARTING),  # not ready yet: nothing to reload
        (S.READY, b"WATCHDOG=1", S.READY),
    ],
)
def test_the_worker_state_table(state: WorkerState, data: bytes, after: WorkerState) -> None:
    assert next_state(state, parse_notification(data)) is after


def test_every_transition_is_written_out() -> None:
    assert all(target is not source for (source, _), target in TRANSITIONS.items())


def test_ready_needs_every_slot_ready() -> None:
    assert all_ready([S.READY, S.READY], 2)
    assert not all_ready([S.READY, None], 2)
    assert not all_ready([S.READY, S.RELOADING], 2)
    assert not all_ready([S.READY], 2)


def test_worker_count_and_when_to_supervise() -> None:
    assert worker_count(ServerConfig(workers=3)) == 3
    assert worker_count(ServerConfig(workers="auto")) == len(os.sched_getaffinity(0))
    assert not wanted(Config(), {})
    config = attrs.evolve(
        Config(),
        server=ServerConfig(workers=2),
        state=attrs.evolve(Config().state, backend="redis", url="redis://127.0.0.1:6379/0"),
    )
    assert wanted(config, {})
    assert not wanted(config, {"RUNESTONE_WORKER": "0"})  # a worker never supervises


def test_restart_backoff_and_bound() -> None:
    policy = RestartPolicy(base_s=0.1, max_s=1.0, window_s=60.0, max_restarts=3)
    assert decide_restart(policy, [], 100.0, was_ready=True) == Restart(0.0)
    assert decide_restart(policy, [], 100.0, was_ready=False) == Restart(0.1)
    assert decide_restart(policy, [99.0], 100.0, was_ready=True) == Restart(0.2)
    assert decide_restart(policy, [10.0, 20.0, 30.0], 100.0, was_ready=True) == Restart(0.0)
    assert isinstance(decide_restart(policy, [97.0, 98.0, 99.0], 100.0, was_ready=True), GiveUp)


@settings(max_examples=200, derandomize=True)
@given(st.lists(st.floats(0, 100), max_size=30), st.booleans())
def test_restart_delays_are_bounded(recent: list[float], was_ready: bool) -> None:
    policy = RestartPolicy()
    decision = decide_restart(policy, recent, 100.0, was_ready=was_ready)
    within = sum(1 for t in recent if 100.0 - t <= policy.window_s)
    if within >= policy.max_restarts:
        assert isinstance(decision, GiveUp)
    else:
        assert isinstance(decision, Restart)
        assert 0 <= decision.delay_s <= policy.max_s


def test_startup_failure_is_fatal_only_before_ready() -> None:
    assert startup_failed(service_ready=False, was_ready=False)
    assert not startup_failed(service_ready=False, was_ready=True)
    assert not startup_failed(service_ready=True, was_ready=False)


def test_describe_exit() -> None:
    assert describe_exit(0) == {"exit_code": 0}
    assert describe_exit(2 << 8) == {"exit_code": 2}
    assert describe_exit(signal.SIGKILL) == {"signal": "SIGKILL"}
