"""The budgets' state in this process (gateway/budget_book.py): reserve, settle, release,
the seed from the ledger (once per scope and period, shared by concurrent requests, exact
when records arrive while it reads), periods rolling over on a fake clock, the gauge."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import attrs
import pytest
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, TenantConfig
from runestone_proxy.errors import BudgetExceeded, ServiceUnavailable
from runestone_proxy.gateway.budget import NO_BUDGETS, Budgets, Estimate
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.gateway.budget_hold import NO_HOLD

T0 = 4_102_488_000.0  # 2100-01-01T12:00:00Z
DAY = 86400.0


@attrs.define(eq=False)
class FakeSource:
    """A ledger's spend: ``totals[(tenant, key_id)]`` whatever ``since``; ``gate`` (if set)
    holds each read until it is set; ``during`` runs as a read starts."""

    totals: dict[tuple[str, str | None], tuple[float, int]] = attrs.Factory(dict)
    reads: list[tuple[str, str | None, float]] = attrs.Factory(list)
    syncs: int = 0
    gate: trio.Event | None = None
    during: Callable[[], None] | None = None
    fail: bool = False

    async def sync_ledger(self) -> None:
        self.syncs += 1
        await trio.lowlevel.checkpoint()

    async def spend(self, tenant: str, key_id: str | None, since: float) -> tuple[float, int]:
        self.reads.append((tenant, key_id, since))
        if self.during is not None:
            self.during()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail:
            raise ServiceUnavailable("The job store is unavailable: disk I/O error")
        return self.totals.get((tenant, key_id), (0.0, 0))


@attrs.define
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recorder() -> Iterator[telemetry.Recorder]:
    rec = telemetry.Recorder()
    remove = telemetry.add_handler(rec)
    yield rec
    remove()


def book(
    source: FakeSource | None = None, clock: Clock | None = None, **tenants: TenantConfig
) -> LocalBudgetBook:
    return LocalBudgetBook.from_config(Config(tenants=tenants), source, clock or Clock())


KEY = Budgets(usd_day=1.0)


Claim = tuple[str, str, str, Budgets, Estimate, str]


def claim(usd: float, tokens: int = 0, *, key: Budgets = KEY, tenant: str = "acme") -> Claim:
    """``reserve``'s arguments: tenant, key id, key mask, key budgets, estimate, request id."""
    return (tenant, "k1", "sk-...abcd", key, Estimate(usd, tokens), "req_1")


async def test_a_key_budget_reserves_settles_and_refuses(recorder: telemetry.Recorder) -> None:
    b = book()
    assert b.applies("acme", KEY)
    assert not b.applies("acme", NO_BUDGETS)
    hold, headers = await b.reserve(*claim(0.4))
    assert dict(headers)[b"x-runestone-budget-remaining-usd"] == b"0.6"
    hold.settle(0.3, 30)
    hold.settle(5.0, 500)  # once only
    (acct,) = b.accounts.values()
    assert (acct.spent_usd, acct.spent_tokens, acct.held_usd) == (0.3, 30, 0.0)
    other, _ = await b.reserve(*claim(0.7))  # 0.3 + 0.7 <= 1
    with pytest.raises(BudgetExceeded) as caught:
        await b.reserve(*claim(0.01))
    exc = caught.value
    assert (exc.http_status, exc.error_type, exc.code) == (429, "insufficient_quota", exc.code)
    assert exc.code == "insufficient_quota"
    assert not exc.is_retryable
    headers = dict(exc.headers)
    assert headers[b"x-should-retry"] == b"false"
    assert headers[b"retry-after"] == b"43200"  # noon to midnight
    assert headers[b"x-runestone-budget-remaining-usd"] == b"0"
    assert headers[b"x-runestone-budget-reset"] == b"2100-01-02T00:00:00Z"
    (block,) = recorder.named("budget.block")
    assert block["budget"] == "key.usd_day"
    assert block["key_mask"] == "sk-...abcd"
    assert (block["limit"], block["spent"], block["held"], block["estimate"]) == (
        1.0,
        0.3,
        0.7,
        0.01,
    )
    other.release()  # it never reached a provider: nothing spent
    assert acct.held_usd == 0.0
    assert acct.spent_usd == 0.3


async def test_tenant_budgets_count_every_key_of_the_tenant() -> None:
    b = book(acme=TenantConfig(budget_usd_month=1.0, budget_tokens_day=100))
    assert b.applies("acme", NO_BUDGETS)
    assert not b.applies("other", NO_BUDGETS)
    first, headers = await b.reserve(*claim(0.5, 60, key=NO_BUDGETS))
    assert dict(headers)[b"x-runestone-budget-remaining-tokens"] == b"40"
    first.settle(0.5, 60)
    second = ("acme", "k2", "sk-...wxyz", NO_BUDGETS, Estimate(0.1, 50))
    with pytest.raises(BudgetExceeded, match="daily token budget of tenant 'acme'"):
        await b.reserve(*second)  # 60 + 50 tokens > 100
    b.reconfigure(Config(tenants={"acme": TenantConfig()}))  # a reload lifts it
    assert not b.applies("acme", NO_BUDGETS)


async def test_the_seed_reads_the_ledger_once_and_is_shared() -> None:
    source = FakeSource({("acme", "k1"): (0.9, 90)}, gate=trio.Event())
    b = book(source)
    results: list[object] = []

    async def one() -> None:
        try:
            results.append(await b.reserve(*claim(0.05)))
        except BudgetExceeded as exc:
            results.append(exc)

    async with trio.open_nursery() as nursery:
        for _ in range(3):
            nursery.start_soon(one)
        await trio.testing.wait_all_tasks_blocked()
        assert len(source.reads) == 1  # the others wait for the same seed
        source.gate.set()  # type: ignore[union-attr]
    assert source.reads == [("acme", "k1", T0 - 12 * 3600)]  # since the UTC day began
    assert source.syncs == 1
    # 0.9 spent: two of 0.05 fit, the third does not.
    assert sum(isinstance(r, BudgetExceeded) for r in results) == 1
    with pytest.raises(BudgetExceeded):  # 0.9 spent + 0.1 held: used up, even for free
        await b.reserve(*claim(0.0))
    assert len(source.reads) == 1  # memory from now on


async def test_a_charge_that_arrives_while_the_seed_reads_is_counted_once() -> None:
    """A request admitted yesterday ends today while today's seed reads: its record may or
    may not be in the read, so the seed reads again (after it is written)."""
    clock = Clock(T0 - 13 * 3600)  # 23:00 the day before
    source = FakeSource()
    b = book(source, clock)
    yesterday, _ = await b.reserve(*claim(0.2))
    clock.now = T0
    written = {"n": 0}

    def during() -> None:
        if written["n"] == 0:  # the first read: the request ends now, and is written
            written["n"] = 1
            yesterday.settle(0.25, 10)
            source.totals[("acme", "k1")] = (0.25, 10)

    source.during = during
    hold, _ = await b.reserve(*claim(0.1))
    today = b.accounts["key", "k1", "day"]
    assert len(source.reads) == 3  # yesterday's seed, today's, and today's again
    assert (today.spent_usd, today.spent_tokens) == (0.25, 10)  # once, not twice
    assert today.held_usd == 0.1
    hold.settle(0.1, 1)
    assert today.spent_usd == pytest.approx(0.35)


async def test_a_busy_seed_errs_on_the_safe_side() -> None:
    clock = Clock(T0 - 3600)
    source = FakeSource()
    b = book(source, clock)
    holds = [(await b.reserve(*claim(0.01)))[0] for _ in range(5)]
    clock.now = T0 + DAY  # the next day: every read sees another one end
    source.during = lambda: holds.pop().settle(0.01, 1) if holds else None
    await b.reserve(*claim(0.01))
    today = b.accounts["key", "k1", "day"]
    assert len(source.reads) == 1 + 3  # gave up re-reading after three
    # The ledger (always empty here) missed none; the charges after the last read's start
    # are added: at most one counted twice in a real ledger, never one missed.
    assert today.spent_usd == pytest.approx(0.01)


async def test_a_day_rolls_over_and_the_ledger_seeds_the_new_one() -> None:
    clock = Clock()
    source = FakeSource({("acme", "k1"): (1.0, 0)})
    b = book(source, clock)
    with pytest.raises(BudgetExceeded):
        await b.reserve(*claim(0.1))
    clock.now = T0 + DAY
    source.totals.clear()  # nothing spent in the new day
    hold, headers = await b.reserve(*claim(0.1))
    assert dict(headers)[b"x-runestone-budget-reset"] == b"2100-01-03T00:00:00Z"
    assert source.reads[-1][2] == T0 + 12 * 3600  # since the new day's start
    assert len(b.accounts) == 1  # yesterday's account is gone
    hold.settle(0.1, 1)


async def test_a_request_ending_in_an_unseen_period_leaves_its_cost_to_the_seed() -> None:
    clock = Clock()
    b = book(FakeSource(), clock)
    hold, _ = await b.reserve(*claim(0.5))
    old = b.accounts["key", "k1", "day"]
    clock.now = T0 + DAY
    hold.settle(0.5, 5)
    assert (old.held_usd, old.spent_usd) == (0.0, 0.0)  # released; today's seed has it


async def test_a_failed_seed_is_503_and_tried_again() -> None:
    source = FakeSource(fail=True)
    b = book(source)
    with pytest.raises(ServiceUnavailable):
        await b.reserve(*claim(0.1))
    source.fail = False
    hold, _ = await b.reserve(*claim(0.1))
    assert hold is not NO_HOLD


async def test_a_seeder_whose_client_leaves_hands_over_to_a_waiter() -> None:
    source = FakeSource(gate=trio.Event())
    b = book(source)
    got: list[object] = []
    seeder = trio.CancelScope()

    async def first() -> None:
        with seeder:
            got.append(await b.reserve(*claim(0.1)))

    async def second() -> None:
        got.append(await b.reserve(*claim(0.1)))

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(first)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(second)
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.reads) == 1  # the second waits for the first's seed
            seeder.cancel()  # the first's client went away mid-seed
            await trio.testing.wait_all_tasks_blocked()
            assert len(source.reads) == 2  # the second seeds in its place
            source.gate.set()  # type: ignore[union-attr]
    assert len(got) == 1
    assert b.accounts["key", "k1", "day"].held_usd == 0.1


async def test_without_a_ledger_memory_is_all() -> None:
    b = book(None)
    hold, _ = await b.reserve(*claim(0.6))
    hold.settle(0.6, 6)
    with pytest.raises(BudgetExceeded):
        await b.reserve(*claim(0.6))


async def test_the_gauge_reports_tenant_budgets_seen_this_period() -> None:
    clock = Clock()
    b = book(FakeSource(), clock, acme=TenantConfig(budget_usd_day=2.0, budget_usd_month=10.0))
    assert list(b.remaining_usd()) == []
    hold, _ = await b.reserve(*claim(0.5, key=NO_BUDGETS))
    hold.settle(0.25, 1)
    assert sorted(b.remaining_usd()) == [("acme", "day", 1.75), ("acme", "month", 9.75)]
    clock.now = T0 + DAY
    assert sorted(b.remaining_usd()) == [("acme", "month", 9.75)]
