"""The capacity carrier on trio: slots, fair waiting, cancellation, reload.

Test rules: everything runs in-process on pytest-trio's ``autojump_clock``
(``MockClock(autojump_threshold=0)``), so waiting two seconds costs no wall time; every body
runs under ``trio.fail_after``; task start order is fixed with ``wait_all_tasks_blocked``
(trio does not promise to run newly spawned tasks in spawn order).
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

from runestone_proxy import telemetry
from runestone_proxy.config import Config, TenancyConfig, TenantConfig
from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway.capacity import Capacity
from runestone_proxy.gateway.limits import Admit, Enqueue, Wait

LONG_MS = 10_000_000.0  # patience that outlasts every test


def config(*, global_max: int = 1024, default: int = 10, **tenants: dict[str, Any]) -> Config:
    return Config(
        tenancy=TenancyConfig(default_max_concurrent=default, global_max_concurrent=global_max),
        tenants={name: TenantConfig(**cfg) for name, cfg in tenants.items()},
    )


def capacity(**kwargs: Any) -> Capacity:
    return Capacity.from_config(config(**kwargs))


@pytest.fixture
def recorder() -> Any:
    rec = telemetry.Recorder()
    remove = telemetry.add_handler(rec)
    yield rec
    remove()


async def spawn_in_order(nursery: trio.Nursery, *fns: Any) -> None:
    """Start tasks one by one, each parked before the next starts."""
    for fn in fns:
        nursery.start_soon(fn)
        await trio.testing.wait_all_tasks_blocked()


# --- the uncontended path ----------------------------------------------------------------------


async def test_a_free_slot_is_taken_and_given_back(autojump_clock: trio.testing.MockClock) -> None:
    cap = capacity(a={"max_concurrent": 2})
    async with cap.slot("a") as decision:
        assert decision == Admit()
        assert cap.in_flight_of("a") == 1
        assert cap.in_flight == 1
    assert cap.in_flight_of("a") == 0
    assert cap.in_flight == 0


async def test_an_error_in_the_block_releases_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity()
    with pytest.raises(ZeroDivisionError):
        async with cap.slot("a"):
            _ = 1 / 0
    assert cap.in_flight == 0


# --- exact limits ------------------------------------------------------------------------------


async def test_the_limit_holds_exactly_under_a_burst_of_100(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 5, "max_wait_ms": LONG_MS})
    current = peak = done = 0

    async def request() -> None:
        nonlocal current, peak, done
        async with cap.slot("a"):
            current += 1
            peak = max(peak, current)
            assert current <= cap.in_flight_of("a") <= 5
            await trio.sleep(1)
            current -= 1
        done += 1

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for _ in range(100):
                nursery.start_soon(request)
    assert (peak, done) == (5, 100)
    assert (cap.in_flight, cap.waiting_of("a")) == (0, 0)


async def test_the_global_cap_holds_across_tenants(autojump_clock: trio.testing.MockClock) -> None:
    patience = {"max_concurrent": 10, "max_wait_ms": LONG_MS}
    cap = capacity(global_max=3, a=patience, b=patience, c=patience)
    current = peak = 0

    async def request(tenant: str) -> None:
        nonlocal current, peak
        async with cap.slot(tenant):
            current += 1
            peak = max(peak, current)
            await trio.sleep(1)
            current -= 1

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for i in range(30):
                nursery.start_soon(request, "abc"[i % 3])
    assert peak == 3
    assert cap.in_flight == 0


async def test_no_drift_after_cancelling_1000_holders_and_waiters(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 10, "max_wait_ms": LONG_MS})

    async def stream() -> None:
        async with cap.slot("a"):
            await trio.sleep_forever()  # a client that goes away mid-stream

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for _ in range(1000):
                nursery.start_soon(stream)
            await trio.testing.wait_all_tasks_blocked()
            assert (cap.in_flight_of("a"), cap.waiting_of("a")) == (10, 990)
            nursery.cancel_scope.cancel()
    assert (cap.in_flight, cap.in_flight_of("a"), cap.waiting_of("a")) == (0, 0, 0)
    async with cap.slot("a") as decision:  # and the next request gets in at once
        assert decision == Admit()


# --- waiting -----------------------------------------------------------------------------------


async def test_waiters_of_one_tenant_are_served_in_fifo_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": LONG_MS})
    order: list[int] = []

    def waiter(i: int) -> Any:
        async def run() -> None:
            async with cap.slot("a") as decision:
                assert decision == Wait(LONG_MS / 1000)
                order.append(i)
                await trio.sleep(0.1)

        return run

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            release = trio.Event()

            async def holder() -> None:
                async with cap.slot("a"):
                    await release.wait()

            await spawn_in_order(nursery, holder, *(waiter(i) for i in range(20)))
            assert cap.waiting_of("a") == 20
            release.set()
    assert order == list(range(20))


async def test_a_burst_of_one_tenant_does_not_starve_another(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Global cap 2. Tenant A holds both slots and queues 100 more; tenant B then queues 3.
    B's requests are served as slots free, interleaved with A's, not after A's burst."""
    patience = {"max_concurrent": 200, "max_wait_ms": LONG_MS}
    cap = capacity(global_max=2, a=patience, b=patience)
    order: list[str] = []

    def request(tenant: str, name: str) -> Any:
        async def run() -> None:
            async with cap.slot(tenant):
                order.append(name)
                await trio.sleep(1)

        return run

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            first, second = trio.Event(), trio.Event()

            def holder(release: trio.Event) -> Any:
                async def run() -> None:
                    async with cap.slot("a"):
                        await release.wait()

                return run

            await spawn_in_order(nursery, holder(first), holder(second))
            await spawn_in_order(nursery, *(request("a", f"a{i}") for i in range(100)))
            await spawn_in_order(nursery, *(request("b", f"b{i}") for i in range(3)))
            assert (cap.waiting_of("a"), cap.waiting_of("b")) == (100, 3)
            # Free the two slots half a second apart, so no two requests ever end in the same
            # instant: the order requests run in is then the order slots were handed out.
            first.set()
            await trio.sleep(0.5)
            second.set()
    b_positions = [order.index(f"b{i}") for i in range(3)]
    assert b_positions == sorted(b_positions)
    assert max(b_positions) < 8, order[:10]
    assert [n for n in order if n.startswith("a")] == [f"a{i}" for i in range(100)]


async def test_weights_give_shares_of_the_global_cap(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(
        global_max=6,
        heavy={"max_concurrent": 100, "max_wait_ms": LONG_MS, "weight": 2.0},
        light={"max_concurrent": 100, "max_wait_ms": LONG_MS},
    )
    release = trio.Event()

    async def hold(tenant: str) -> None:
        async with cap.slot(tenant):
            await release.wait()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            blocker = trio.Event()

            async def first() -> None:
                async with cap.slot("light"):
                    await blocker.wait()

            for _ in range(6):
                nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            for _ in range(10):
                nursery.start_soon(hold, "heavy")
                nursery.start_soon(hold, "light")
            await trio.testing.wait_all_tasks_blocked()
            blocker.set()  # six slots free at once: shared 2:1
            await trio.testing.wait_all_tasks_blocked()
            assert (cap.in_flight_of("heavy"), cap.in_flight_of("light")) == (4, 2)
            release.set()
    assert cap.in_flight == 0


async def test_wait_gives_up_after_max_wait_with_a_429(
    autojump_clock: trio.testing.MockClock, recorder: telemetry.Recorder
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": 500})
    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:

            async def holder() -> None:
                async with cap.slot("a"):
                    await trio.sleep_forever()

            await spawn_in_order(nursery, holder)
            started = trio.current_time()
            with pytest.raises(RateLimited) as info:
                async with cap.slot("a", key_mask="sk-...abcd", request_id="req_1"):
                    pytest.fail("admitted past the limit")
            assert trio.current_time() - started == pytest.approx(0.5)
            assert cap.waiting_of("a") == 0
            nursery.cancel_scope.cancel()
    error = info.value
    assert error.http_status == 429
    assert (b"retry-after", b"1") in error.headers
    assert error.envelope()["error"]["code"] == "rate_limit_exceeded"  # type: ignore[index]
    assert "at capacity" in error.message
    [block] = recorder.named("ratelimit.block")
    assert block["tenant"] == "a"
    assert block["key_mask"] == "sk-...abcd"
    assert block["request_id"] == "req_1"
    assert block["limit"] == "concurrency_wait"
    assert cap.in_flight == 0


async def test_a_waiter_cancelled_while_parked_leaves_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": LONG_MS})
    entered: list[str] = []
    release = trio.Event()
    scope = trio.CancelScope()

    async def holder() -> None:
        async with cap.slot("a"):
            await release.wait()

    async def cancelled() -> None:
        with scope:
            async with cap.slot("a"):
                entered.append("cancelled")

    async def patient() -> None:
        async with cap.slot("a"):
            entered.append("patient")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await spawn_in_order(nursery, holder, cancelled, patient)
            scope.cancel()
            await trio.testing.wait_all_tasks_blocked()
            assert cap.waiting_of("a") == 1
            release.set()
    assert entered == ["patient"]
    assert scope.cancelled_caught
    assert cap.in_flight == 0


async def test_a_slot_handed_to_a_waiter_cancelled_in_the_same_instant_is_passed_on(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": LONG_MS})
    entered: list[str] = []
    release = trio.Event()
    scope = trio.CancelScope()

    async def holder() -> None:
        async with cap.slot("a"):
            await release.wait()
        # Our exit handed the slot to the first waiter and rescheduled it; cancel it now,
        # before it runs (so trio can no longer abort its wait).
        assert (cap.in_flight_of("a"), cap.waiting_of("a")) == (1, 1)
        scope.cancel()

    async def first() -> None:
        with scope:
            async with cap.slot("a"):
                entered.append("first")
                await trio.sleep_forever()

    async def second() -> None:
        async with cap.slot("a"):
            entered.append("second")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await spawn_in_order(nursery, holder, first, second)
            release.set()
    assert entered == ["second"]
    assert scope.cancelled_caught
    assert (cap.in_flight, cap.waiting_of("a")) == (0, 0)


async def test_a_waiter_served_at_its_deadline_keeps_the_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": 1000})
    served: list[str] = []

    async def holder() -> None:
        async with cap.slot("a"):
            await trio.sleep(1)  # releases exactly when the waiter's patience ends

    async def waiter() -> None:
        try:
            async with cap.slot("a"):
                served.append("ok")
        except RateLimited:
            served.append("429")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await spawn_in_order(nursery, holder, waiter)
    assert served in (["ok"], ["429"])  # either outcome, but never a lost slot
    assert cap.in_flight == 0
    async with cap.slot("a") as decision:
        assert decision == Admit()


# --- other policies ----------------------------------------------------------------------------


async def test_reject_answers_429_at_once(
    autojump_clock: trio.testing.MockClock, recorder: telemetry.Recorder
) -> None:
    cap = capacity(a={"max_concurrent": 1, "on_limit": "reject"})
    async with cap.slot("a"):
        started = trio.current_time()
        with pytest.raises(RateLimited) as info:
            async with cap.slot("a"):
                pytest.fail("admitted past the limit")
        assert trio.current_time() == started
    assert (b"retry-after", b"1") in info.value.headers
    assert recorder.named("ratelimit.block")[0]["limit"] == "concurrency"
    assert cap.in_flight == 0


@pytest.mark.parametrize(
    ("on_limit", "wants_async"), [("queue", False), ("wait", True), ("reject", True)]
)
async def test_enqueue_is_answered_as_a_value_holding_no_slot(
    autojump_clock: trio.testing.MockClock, on_limit: str, wants_async: bool
) -> None:
    cap = capacity(a={"max_concurrent": 1, "on_limit": on_limit})
    async with cap.slot("a", wants_async=wants_async) as decision:
        assert decision == Admit()  # async handling is only for a full tenant
        async with cap.slot("a", wants_async=wants_async) as second:
            assert second == Enqueue()  # not admitted past the limit
            assert cap.in_flight_of("a") == 1
            assert cap.in_flight == 1
        assert cap.in_flight_of("a") == 1  # leaving it released nothing it did not hold
        assert cap.in_flight == 1
    assert cap.in_flight == 0


async def test_an_enqueue_block_that_raises_releases_nothing(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "on_limit": "queue"})
    decisions = []

    async def enqueue_then_fail() -> None:
        async with cap.slot("a") as decision:
            decisions.append(decision)
            _ = 1 / 0  # the block fails: still nothing to give back

    async with cap.slot("a"):
        with pytest.raises(ZeroDivisionError):
            await enqueue_then_fail()
        assert decisions == [Enqueue()]
        assert cap.in_flight_of("a") == 1
    assert cap.in_flight_of("a") == 0
    assert cap.in_flight == 0


# --- reload ------------------------------------------------------------------------------------


async def test_shrinking_a_limit_keeps_in_flight_slots_and_stops_admitting(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 3, "max_wait_ms": LONG_MS})
    releases = [trio.Event() for _ in range(3)]
    admitted_at: list[int] = []

    def holder(event: trio.Event) -> Any:
        async def run() -> None:
            async with cap.slot("a"):
                await event.wait()

        return run

    async def newcomer() -> None:
        async with cap.slot("a"):
            admitted_at.append(cap.in_flight_of("a"))

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await spawn_in_order(nursery, *(holder(e) for e in releases))
            cap.reconfigure(config(a={"max_concurrent": 1, "max_wait_ms": LONG_MS}))
            assert cap.in_flight_of("a") == 3
            await spawn_in_order(nursery, newcomer)
            assert cap.waiting_of("a") == 1
            releases[0].set()
            releases[1].set()
            await trio.testing.wait_all_tasks_blocked()
            assert (admitted_at, cap.in_flight_of("a")) == ([], 1)  # 1 >= the new limit
            releases[2].set()
    assert admitted_at == [1]
    assert cap.in_flight == 0


async def test_growing_a_limit_admits_waiters_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": LONG_MS})
    release = trio.Event()

    async def hold() -> None:
        async with cap.slot("a"):
            await release.wait()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await spawn_in_order(nursery, hold, hold, hold, hold)
            assert (cap.in_flight_of("a"), cap.waiting_of("a")) == (1, 3)
            cap.reconfigure(config(a={"max_concurrent": 4, "max_wait_ms": LONG_MS}))
            assert (cap.in_flight_of("a"), cap.waiting_of("a")) == (4, 0)
            release.set()
    assert cap.in_flight == 0


async def test_reload_applies_new_defaults_to_unlisted_tenants() -> None:
    cap = capacity(default=1)
    async with cap.slot("x"):
        assert not cap.has_capacity("x")
        cap.reconfigure(config(default=2))
        assert cap.has_capacity("x")


# --- the drainer's view ------------------------------------------------------------------------


async def test_drainer_waits_for_freed_capacity_then_takes_a_job_slot(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "on_limit": "queue"})
    assert cap.has_capacity("a")
    assert cap.has_capacity("never-seen")
    ran: list[str] = []

    async def drainer() -> None:
        while not cap.has_capacity("a"):
            await cap.wait_freed()
        async with cap.job_slot("a") as decision:
            assert decision == Admit()
            ran.append("job")

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            release = trio.Event()

            async def live() -> None:
                async with cap.slot("a"):
                    await release.wait()

            await spawn_in_order(nursery, live, drainer)
            assert not cap.has_capacity("a")
            assert ran == []
            release.set()
    assert ran == ["job"]
    assert cap.in_flight == 0


async def test_job_slot_waits_without_deadline_whatever_the_policy(
    autojump_clock: trio.testing.MockClock,
) -> None:
    cap = capacity(a={"max_concurrent": 1, "on_limit": "reject"})
    ran_at: list[float] = []

    async def job() -> None:
        async with cap.job_slot("a"):
            ran_at.append(trio.current_time())

    with trio.fail_after(7200):
        async with trio.open_nursery() as nursery:

            async def live() -> None:
                async with cap.slot("a"):
                    await trio.sleep(3600)

            await spawn_in_order(nursery, live, job)
    assert ran_at == [pytest.approx(3600)]


async def test_live_waiters_go_before_jobs(autojump_clock: trio.testing.MockClock) -> None:
    cap = capacity(a={"max_concurrent": 1, "max_wait_ms": LONG_MS})
    release = trio.Event()

    async def hold() -> None:
        async with cap.slot("a"):
            await release.wait()

    async with trio.open_nursery() as nursery:
        await spawn_in_order(nursery, hold, hold)
        assert not cap.has_capacity("a")
        release.set()
    assert cap.has_capacity("a")


def test_snapshot_reports_counters() -> None:
    cap = capacity(a={"max_concurrent": 4})
    snap = cap.snapshot()
    assert snap["status"] == "ok"
    assert snap["tenants"]["a"] == {
        "in_flight": 0,
        "waiting": 0,
        "max_concurrent": 4,
        "on_limit": "wait",
    }
    assert (snap["in_flight"], snap["waiting"], snap["max_concurrent"]) == (0, 0, 1024)
