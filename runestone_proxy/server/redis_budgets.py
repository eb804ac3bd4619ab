"""The budgets on Redis: spend and in-flight holds shared by every worker and host.

It is the :class:`~runestone_proxy.gateway.budget_book.BudgetBook` admission and accounting
use when ``[state] backend = "redis"``; the scripts and keys are in
:mod:`.redis_budget_scripts`. Without it each process would keep its own spend, and N
workers could spend N times a budget.

The round trips of one request with a budget
--------------------------------------------
- Admission: one ``EVALSHA`` (:data:`~.redis_budget_scripts.RESERVE`) checks spent + held +
  the estimate against every budget of the key and of its tenant and, when all admit,
  holds the estimate in each, atomically. The headers and the refusal's words are computed
  here from the numbers it returns, by the same pure functions as in-process
  (:func:`~runestone_proxy.gateway.budget.admit`, :func:`~.budget.decide`).
- End: one fire-and-forget ``EVALSHA`` (:data:`~.redis_budget_scripts.SETTLE`) takes the
  hold out and charges the real cost (the ledger record's) to the accounts of the period
  the request ended in.

Holds are leases
----------------
A hold is a member of its account's sorted set, scored by its expiry (``[state] lease_s``).
The renewal task extends this process's holds every ``lease_s / 3``; a process that dies
stops renewing, and its holds drop out of the in-flight sums within ``lease_s`` (each
script purges expired holds before it reads them).

Seeding, once per period per scope
----------------------------------
An account's first request in a period finds it unseeded (the script says so, holding
nothing). This process then reads the ledger (``SpendSource.spend``, after its own writer
has written what it was handed) and ``SEED`` sets the total if no process did first (the
first seed wins); requests of this process that arrive meanwhile wait for the same seed.
Real costs charged to an account before it is seeded (requests that began in the previous
period) wait in the account's late sums and are added to the seed: a record another
process had not yet written is counted, one already in the ledger counts twice (the safe
side of a budget; it takes a request crossing into a period whose account is being seeded
at that moment). The ledger a seed reads is this process's store: on a fleet of hosts, the
ledger on PostgreSQL is the whole fleet's; SQLite per host has only its own history (after
the first seed the spend is Redis's, shared, until Redis loses its data).

Redis unavailable
-----------------
``on_unavailable = "fail_closed"``: a request with a budget gets 503. ``"local"``: this
process's :class:`~runestone_proxy.gateway.budget_book.LocalBudgetBook` serves (seeded from
its ledger). Either way the real costs Redis could not take (a settle while it was down, a
request admitted by the local fallback) are summed per account here and sent when it
answers again; a settle in flight when the connection broke is lost (its hold's lease
expires; its cost is missing from Redis's spend, not from the ledger).
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import attrs
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.gateway.budget import (
    NO_BUDGETS,
    Budgets,
    Estimate,
    Headers,
    Period,
    admit,
)
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.gateway.budget_hold import Hold, SpendSource, refuse, tenant_budgets
from runestone_proxy.gateway.budget_wire import budget_headers
from runestone_proxy.server.redis_budget_plan import Plan, Plans, RedisAccount, fill, refusal
from runestone_proxy.server.redis_budget_scripts import RENEW_HOLDS, RESERVE, SEED, SETTLE, fmt
from runestone_proxy.server.redis_client import RedisClient, RedisUnavailable
from runestone_proxy.server.redis_limits import RedisLimits

__all__ = ["RedisBudgetBook", "RedisHold"]

log = structlog.get_logger("runestone.state")

#: Rounds of reserve -> seed -> reserve before a request gives up with 503 (a seed that
#: failed, or a period that ended while it seeded).
_SEED_TRIES = 8
#: Accounts whose unsent charges are kept while Redis is away (a bound; past it, the
#: oldest are dropped with a warning: the ledger still has them).
_MAX_MISSED = 65536
_RETRY_AFTER = ((b"retry-after", b"1"),)
_NO_CHARGE = "-|0|0"


class RedisHold(Hold):
    """A hold in Redis (``member`` in each account's holds), or, made by the local fallback,
    the local book's hold (``inner``) whose cost Redis is told of later."""

    __slots__ = ("inner", "member", "plan")

    def __init__(
        self, book: RedisBudgetBook, plan: Plan, estimate: Estimate, member: str, inner: Hold
    ) -> None:
        super().__init__(book, (), estimate)
        self.plan = plan
        self.member = member
        self.inner = inner


_NO_INNER = Hold(None, (), Estimate(0.0, 0))


@attrs.define(eq=False)
class RedisBudgetBook:
    """See the module docstring. ``run`` must be running (the renewal of holds)."""

    client: RedisClient
    #: The fallback (``on_unavailable = "local"``), and the seed's ledger (its source).
    local: LocalBudgetBook
    prefix: str
    lease_s: float
    fail_closed: bool
    tenants: Mapping[str, Budgets] = attrs.Factory(dict)
    #: Wall time, epoch seconds (UTC periods; tests pass a fake one).
    clock: Callable[[], float] = time.time
    process_id: str = attrs.Factory(lambda: os.urandom(6).hex())
    plans: Plans = attrs.field(init=False)
    _seeds: dict[str, trio.Event] = attrs.Factory(dict)
    #: The holds this process has in Redis (renewed).
    _active: set[RedisHold] = attrs.Factory(set)
    #: Charges Redis could not take: account key -> [usd, tokens, ttl_ms].
    _missed: dict[str, list[float]] = attrs.Factory(dict)
    _seq: itertools.count[int] = attrs.Factory(itertools.count)

    def __attrs_post_init__(self) -> None:
        self.plans = Plans(self.prefix)

    @classmethod
    def build(cls, config: Config, client: RedisClient, local: LocalBudgetBook) -> RedisBudgetBook:
        register(client)
        state = config.state
        return cls(
            client,
            local,
            state.key_prefix,
            state.lease_s,
            state.on_unavailable == "fail_closed",
            tenant_budgets(config),
        )

    @property
    def source(self) -> SpendSource | None:
        return self.local.source

    def reconfigure(self, config: Config) -> None:
        self.tenants = tenant_budgets(config)
        self.local.reconfigure(config)

    def applies(self, tenant: str, key_budgets: Budgets) -> bool:
        return key_budgets is not NO_BUDGETS or tenant in self.tenants

    # --- reserve ---------------------------------------------------------------------------

    async def reserve(
        self,
        tenant: str,
        key_id: str,
        key_mask: str,
        key_budgets: Budgets,
        estimate: Estimate,
        request_id: str | None = None,
    ) -> tuple[Hold, Headers]:
        plan = self.plans.get(tenant, key_id, key_budgets, self.tenants.get(tenant), self.clock())
        if not self.client.up:
            return await self._unavailable(
                plan, tenant, key_id, key_mask, key_budgets, estimate, request_id
            )
        member = f"{self.process_id}:{next(self._seq)}|{estimate.usd!r}|{estimate.tokens}"
        args = (member, repr(estimate.usd), estimate.tokens, int(self.lease_s * 1000), *plan.tail)
        for _ in range(_SEED_TRIES):
            try:
                reply = await self.client.evalsha(RESERVE, plan.keys, args)
            except RedisUnavailable:
                return await self._unavailable(
                    plan, tenant, key_id, key_mask, key_budgets, estimate, request_id
                )
            status = reply[0]
            if status == -1:
                for i in reply[1:]:
                    await self._seed(plan.accounts[i - 1])
                continue
            fill(plan, reply)
            if status != 0:
                found = refusal(plan, status, estimate)
                raise refuse(plan.checks, found, self.clock(), tenant, key_mask, request_id)
            hold = RedisHold(self, plan, estimate, member, _NO_INNER)
            self._active.add(hold)
            headers = admit(plan.checks, estimate)
            return hold, headers if headers is not None else budget_headers(plan.checks)
        raise ServiceUnavailable("The budgets' spend could not be read; try again.")

    async def _unavailable(
        self,
        plan: Plan,
        tenant: str,
        key_id: str,
        key_mask: str,
        key_budgets: Budgets,
        estimate: Estimate,
        request_id: str | None,
    ) -> tuple[Hold, Headers]:
        telemetry.emit(
            "state.unavailable",
            tenant=tenant,
            request_id=request_id,
            fallback=not self.fail_closed,
            error=self.client.why_down,
            what="budgets",
        )
        if self.fail_closed:
            raise ServiceUnavailable(
                "The gateway's shared budgets (Redis) are unavailable. Please try again shortly.",
                headers=_RETRY_AFTER,
            )
        inner, headers = await self.local.reserve(
            tenant, key_id, key_mask, key_budgets, estimate, request_id
        )
        return RedisHold(self, plan, estimate, "", inner), headers

    async def _seed(self, account: RedisAccount) -> None:
        """Seed ``account`` from the ledger (or wait for this process's seed under way)."""
        running = self._seeds.get(account.key)
        if running is not None:
            await running.wait()
            return
        done = self._seeds[account.key] = trio.Event()
        try:
            usd, tokens = 0.0, 0
            source = self.source
            if source is not None:
                view = account.view
                await source.sync_ledger()
                usd, tokens = await source.spend(view.tenant, view.key_id, view.start)
            await self.client.evalsha(SEED, (account.key,), (fmt(usd), tokens, account.ttl_ms))
        finally:
            del self._seeds[account.key]
            done.set()

    # --- settle ----------------------------------------------------------------------------

    def settle(self, hold: Hold, usd: float, tokens: int) -> None:
        assert isinstance(hold, RedisHold)
        if hold.inner is not _NO_INNER:  # the local fallback held it
            hold.inner.settle(usd, tokens)
            self._end(hold, 0, usd, tokens)
        else:
            self._end(hold, len(hold.plan.accounts), usd, tokens)

    def release(self, hold: Hold) -> None:
        assert isinstance(hold, RedisHold)
        if hold.inner is not _NO_INNER:
            hold.inner.release()
        else:
            self._end(hold, len(hold.plan.accounts), 0.0, 0)

    def _end(self, hold: RedisHold, held: int, usd: float, tokens: int) -> None:
        """One SETTLE: out of the ``held`` accounts' holds, the cost to the current ones."""
        self._active.discard(hold)
        plan = hold.plan
        charged: list[RedisAccount] = []
        if usd or tokens:  # to the accounts of the period it ended in
            now = self.clock()
            charged = [self.plans.current(account, now) for account in plan.accounts]
        if not held and not charged:
            return
        keys = [*plan.keys[: 2 * held], *(a.key for a in charged)]
        member = hold.member if held else _NO_CHARGE
        args: list[str | int] = [member, held, repr(usd), tokens, *(a.ttl_ms for a in charged)]
        if not self.client.send_script(SETTLE, keys, args):
            for account in charged:
                self._miss(account, usd, tokens)

    def _miss(self, account: RedisAccount, usd: float, tokens: int) -> None:
        entry = self._missed.get(account.key)
        if entry is None:
            if len(self._missed) >= _MAX_MISSED:
                log.warning("budget.charges_dropped", accounts=len(self._missed))
                self._missed.clear()
            entry = self._missed[account.key] = [0.0, 0.0, float(account.ttl_ms)]
        entry[0] += usd
        entry[1] += tokens

    def _flush_missed(self) -> list[tuple[Any, ...]]:
        """The SETTLE commands charging what Redis missed (taken: sent now)."""
        missed, self._missed = self._missed, {}
        return [
            self.client.evalsha_args(
                SETTLE, (key,), (_NO_CHARGE, 0, repr(usd), int(tokens), int(ttl))
            )
            for key, (usd, tokens, ttl) in missed.items()
        ]

    # --- leases ----------------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Every ``lease_s / 3``: extend this process's holds, send the missed charges."""
        task_status.started()
        lease_ms = int(self.lease_s * 1000)
        while True:
            await trio.sleep(self.lease_s / 3)
            if not self.client.up:
                continue
            by_account: dict[str, tuple[str, list[str]]] = {}
            for hold in self._active:
                for account in hold.plan.accounts:
                    by_account.setdefault(account.holds, (account.key, []))[1].append(hold.member)
            commands: list[tuple[Any, ...]] = []
            for holds, (key, members) in by_account.items():
                for i in range(0, len(members), 500):
                    args: tuple[str | int, ...] = (lease_ms, *members[i : i + 500])
                    commands.append(self.client.evalsha_args(RENEW_HOLDS, (key, holds), args))
            missed = self._missed
            commands += self._flush_missed()
            if not commands:
                continue
            try:
                await self.client.pipeline(commands)
            except RedisUnavailable:
                for key, (usd, tokens, ttl) in missed.items():  # again next time
                    entry = self._missed.setdefault(key, [0.0, 0.0, ttl])
                    entry[0] += usd
                    entry[1] += tokens

    # --- the gauge -------------------------------------------------------------------------

    def remaining_usd(self) -> Iterable[tuple[str, Period, float]]:
        """Each tenant USD budget, as this process's last request of that tenant saw it."""
        return self.plans.remaining_usd(self.tenants, self.clock())


def register(client: RedisClient) -> None:
    """Have the budgets' scripts loaded at every connect of ``client``."""
    for script in (RESERVE, SEED, SETTLE, RENEW_HOLDS):
        client.register(script)


def attach(config: Config, shared: RedisLimits, local: LocalBudgetBook) -> RedisBudgetBook:
    """The budgets on the limits' Redis connection, their renewal run beside the limits'."""
    book = RedisBudgetBook.build(config, shared.client, local)
    shared.companions.append(book.run)
    return book
