"""The budgets on Redis (server/redis_budgets.py) against a real redis-server: two books on
two connections stand for two processes of a fleet.

Test rules: 127.0.0.1 only, redis on a free port in tmp_path; every body under
``fail_after``; a settle is fire-and-forget, so a test awaits a PING on the same connection
(replies come in order) before it looks; where a lease must run out (nothing to await) a
bounded loop polls.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from redis_server import RedisServer, redis_server

from runestone_proxy.errors import BudgetExceeded, ServiceUnavailable
from runestone_proxy.gateway.budget import Budgets, Estimate
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.gateway.budget_hold import Hold
from runestone_proxy.server import redis_budgets
from runestone_proxy.server.redis_budgets import RedisBudgetBook
from runestone_proxy.server.redis_client import RedisClient

EST = Estimate(0.011, 7)
KEY_BUDGETS = Budgets(usd_day=1.0)


def utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


@attrs.define
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@attrs.define
class Source:
    """A ledger: ``spend`` answers ``usd`` and counts its reads."""

    usd: float = 0.0
    tokens: int = 0
    reads: int = 0

    async def spend(self, tenant: str, key_id: str | None, since: float) -> tuple[float, int]:
        self.reads += 1
        return self.usd, self.tokens

    async def sync_ledger(self) -> None:
        pass


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


async def book(
    nursery: trio.Nursery,
    redis: RedisServer,
    clock: Clock,
    *,
    prefix: str,
    tenant_usd_day: float = 0.05,
    source: Source | None = None,
    lease_s: float = 30.0,
    fail_closed: bool = True,
    renew: bool = True,
) -> RedisBudgetBook:
    client = RedisClient.from_url(redis.url, 0.5)
    redis_budgets.register(client)
    await nursery.start(client.run)
    tenants = {"acme": Budgets(usd_day=tenant_usd_day)}
    local = LocalBudgetBook(tenants, source, clock)
    made = RedisBudgetBook(client, local, prefix, lease_s, fail_closed, tenants, clock)
    if renew:
        await nursery.start(made.run)
    return made


async def reserve(b: RedisBudgetBook, est: Estimate = EST, key: str = "k1") -> Hold:
    hold, headers = await b.reserve("acme", key, "sk-...k1", KEY_BUDGETS, est)
    assert headers
    return hold


async def synced(*books: RedisBudgetBook) -> None:
    """Every fire-and-forget command the books sent has been run."""
    for b in books:
        await b.client.call("PING")


async def test_two_processes_share_spend_and_holds(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    clock = Clock(utc("2099-03-10T12:00:00Z"))
    a = await book(nursery, redis, clock, prefix="share:")
    b = await book(nursery, redis, clock, prefix="share:")
    with trio.fail_after(10):
        holds = [await reserve(a), await reserve(b), await reserve(a), await reserve(b)]
        with pytest.raises(BudgetExceeded) as refused:  # 4 * 0.011 held: a fifth is over
            await reserve(a)
        assert "$0.044 in flight" in refused.value.message
        headers = dict(refused.value.headers)
        assert headers[b"x-runestone-budget-remaining-usd"] == b"0.006"
        assert headers[b"x-runestone-budget-reset"] == b"2099-03-11T00:00:00Z"
        holds[0].settle(0.015, 13)  # real cost above the estimate
        holds[1].release()  # never reached a provider
        await synced(a, b)
        hold, headers = await b.reserve("acme", "k1", "sk-...k1", KEY_BUDGETS, EST)
        # 0.015 spent + 2 * 0.011 held + this one's 0.011: 0.002 left
        assert dict(headers)[b"x-runestone-budget-remaining-usd"] == b"0.002"
        key = "share:bud:tenant:acme:day:2099-03-10"
        assert float(redis.command("HGET", key, "usd")) == 0.015
        assert redis.command("ZCARD", key + ":holds") == 3
        for h in (holds[2], holds[3], hold):
            h.settle(0.0, 0)
        await synced(a, b)
        assert redis.command("HMGET", key, "hu", "ht") == [b"0", b"0"]


async def test_the_ledger_is_read_once_per_period_and_scope(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    clock = Clock(utc("2099-04-10T12:00:00Z"))
    first, second = Source(usd=0.06), Source(usd=0.0)
    a = await book(nursery, redis, clock, prefix="seed:", source=first, tenant_usd_day=0.1)
    b = await book(nursery, redis, clock, prefix="seed:", source=second, tenant_usd_day=0.1)
    with trio.fail_after(10):
        async with trio.open_nursery() as burst:  # one seed in this process for all three
            for _ in range(3):
                burst.start_soon(reserve, a)
        assert first.reads == 2  # the key's day and the tenant's day
        with pytest.raises(BudgetExceeded) as refused:  # 0.06 + 3 * 0.011 + 0.011 > 0.1
            await reserve(b)
        assert second.reads == 0  # already seeded by the first: not read again
        assert "$0.06 spent" in refused.value.message
        clock.now += 86400  # the next day: seeded again, once
        await reserve(b)
        assert second.reads == 2


async def test_a_dead_process_holds_run_out_and_renewal_keeps_a_live_ones(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """Room for three holds (0.035): a dead process has two, a live one one."""
    clock = Clock(utc("2099-05-10T12:00:00Z"))
    lease = 0.3
    kw: dict[str, Any] = {"prefix": "lease:", "lease_s": lease, "tenant_usd_day": 0.035}
    dead = await book(nursery, redis, clock, renew=False, **kw)
    live = await book(nursery, redis, clock, **kw)
    other = await book(nursery, redis, clock, **kw)
    with trio.fail_after(10):
        await reserve(dead)
        await reserve(dead)
        await reserve(live)
        with pytest.raises(BudgetExceeded):
            await reserve(other)
        start = trio.current_time()
        while True:  # the dead one's two holds expire; the live one's is renewed
            try:
                await reserve(other)
                break
            except BudgetExceeded:
                await trio.sleep(0.05)
        assert trio.current_time() - start <= lease + 1
        await reserve(other)
        await trio.sleep(lease * 2)  # several renewals later: all three still held
        with pytest.raises(BudgetExceeded) as refused:
            await reserve(other)
        assert "$0.033 in flight" in refused.value.message


async def test_a_request_crossing_midnight_is_charged_to_the_new_day(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    clock = Clock(utc("2099-06-10T23:59:59Z"))
    a = await book(nursery, redis, clock, prefix="night:", source=Source())
    with trio.fail_after(10):
        hold = await reserve(a)
        clock.now += 2
        await reserve(a)  # seeds the new day
        hold.settle(0.02, 9)
        await synced(a)
        old, new = "night:bud:tenant:acme:day:2099-06-10", "night:bud:tenant:acme:day:2099-06-11"
        assert redis.command("HMGET", old, "usd", "hu") == [b"0", b"0"]
        assert redis.command("HGET", new, "usd") == b"0.02"
        assert 0 < redis.command("PTTL", new) <= 86_400_000 * 2


async def test_redis_down_fail_closed_or_local_and_the_missed_charges_arrive(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    clock = Clock(utc("2099-07-10T12:00:00Z"))
    (tmp_path / "r").mkdir()
    with redis_server(tmp_path / "r") as server, trio.fail_after(20):
        closed = await book(nursery, server, clock, prefix="down:")
        local = await book(nursery, server, clock, prefix="down:", fail_closed=False, lease_s=0.3)
        held = await reserve(local)
        port = server.port
        server.kill()
        while closed.client.up or local.client.up:
            await trio.sleep(0.01)
        with pytest.raises(ServiceUnavailable):
            await reserve(closed)
        fallback = await reserve(local)  # this process's own book
        fallback.settle(0.01, 5)
        held.settle(0.02, 5)  # its SETTLE cannot be sent: kept
        server.start(port)
        key = "down:bud:tenant:acme:day:2099-07-10"
        while server.command("HGET", key, "lu") is None:  # the renewal sends them
            await trio.sleep(0.02)
        # Redis lost everything (no persistence): the charges wait for the seed, as late.
        assert float(server.command("HGET", key, "lu")) == pytest.approx(0.03)
