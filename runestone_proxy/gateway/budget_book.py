"""The budgets' state in this process: :class:`LocalBudgetBook`, spend so far per scope (a
key, a tenant) and period (UTC day, month), what requests in flight hold, and the one place
such a request reserves and settles. It is the embedded default
:class:`~.budget_hold.BudgetBook` (the interface admission and accounting use, with
:class:`~.budget_hold.Hold`, in :mod:`.budget_hold`); the shared one, on Redis, plugs in
behind the same few operations and falls back to this one.

How this works (:class:`LocalBudgetBook`)
-----------------------------------------
* **The ledger is the truth.** The first time a key or tenant with a budget is seen in a
  period, its :class:`~.budget.Account` is seeded from the ledger (``SpendSource.spend``:
  exact, from the hourly rollups), awaited once; requests that arrive meanwhile wait for the
  same seed; later requests use memory, which each request's real cost advances as its
  ledger record is made (:meth:`settle`). So a restart keeps the spend, and nothing is read
  per request.
* **Seeding is exact.** The store writes records in batches, so the seed first waits for
  the records already handed to it (``sync_ledger``), then reads. A record handed over
  while it reads may or may not be in what it read: the account counts the charges that
  arrive while it seeds, and if any did, reads again (those are now written). After
  :data:`SEED_ROUNDS` busy reads it keeps the last read plus the charges since it began
  (which may count one twice: on the safe side of a budget).
* **Periods roll over by themselves.** A request in a new period finds its account's
  period over and starts (seeds) a new one; the old one is dropped once no request holds
  it. A request that ends in a later period than it began releases its reservation from the
  old account and charges its cost to the current one (or, if that one is not yet seeded,
  leaves it to the seed, which reads the ledger), as the ledger buckets its record.
* **Plans.** The checks of one ``(tenant, key id)`` (each budget with its account) are built
  by its first request in a period and reused until a period ends or a reload changes the
  budgets: a request does a dict lookup, one pass over its budgets (:func:`~.budget.admit`)
  and no calendar arithmetic.
* **The clock** is wall time, UTC (``clock``; tests pass a fake one to cross a day or a
  month).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping

import attrs
import trio

from runestone_proxy.config import Config
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.gateway.budget import (
    NO_BUDGETS,
    Account,
    Budgets,
    Check,
    Estimate,
    Headers,
    Period,
    Scope,
    admit,
    day_bounds,
    decide,
    month_bounds,
    plan_fits,
    usd_left,
)
from runestone_proxy.gateway.budget_hold import (
    Hold,
    SpendSource,
    refuse,
    tenant_budgets,
)

__all__ = ["SEED_ROUNDS", "LocalBudgetBook"]

#: Reads of the ledger per seed before a busy one is taken as it is (module docstring).
SEED_ROUNDS = 3
#: Seeds a reservation may wait for (each of its up to four accounts, with retries after a
#: seed that failed or whose task was cancelled); past it, 503.
_SEED_TRIES = 8


AccountKey = tuple[Scope, str, Period]
#: Plans kept at most (one per key with a budget, or of a tenant with one).
_MAX_PLANS = 65536


@attrs.define(slots=True, eq=False)
class _Plan:
    """What the requests of one ``(tenant, key id)`` are checked against in the current
    periods: built (and its accounts seeded) by the first, then reused."""

    key_budgets: Budgets
    tenant_budgets: Budgets | None
    checks: tuple[Check, ...]
    accounts: tuple[Account, ...]
    #: Valid while ``since <= now < until`` (the latest start, the earliest end).
    since: float
    until: float


@attrs.define(eq=False)
class LocalBudgetBook:
    """The budgets' state in this process (module docstring)."""

    tenants: Mapping[str, Budgets] = attrs.Factory(dict)
    #: Where the seed reads spend so far (the ledger's store); None: no ledger, memory only.
    source: SpendSource | None = None
    #: Wall time, epoch seconds (UTC periods).
    clock: Callable[[], float] = time.time
    accounts: dict[AccountKey, Account] = attrs.Factory(dict)
    _plans: dict[tuple[str, str], _Plan] = attrs.Factory(dict)
    _seeds: dict[Account, trio.Event] = attrs.Factory(dict)
    _day: tuple[float, float] = (0.0, 0.0)
    _month: tuple[float, float] = (0.0, 0.0)

    @classmethod
    def from_config(
        cls,
        config: Config,
        source: SpendSource | None = None,
        clock: Callable[[], float] = time.time,
    ) -> LocalBudgetBook:
        return cls(tenant_budgets(config), source, clock)

    def reconfigure(self, config: Config) -> None:
        self.tenants = tenant_budgets(config)

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
        now = self.clock()
        tenant_budgets = self.tenants.get(tenant)
        plan = self._plans.get((tenant, key_id))
        if plan is None or not plan_fits(plan, now, key_budgets, tenant_budgets):
            plan = await self._plan(tenant, key_id, key_budgets, tenant_budgets)
        headers = admit(plan.checks, estimate)
        if headers is None:
            refusal = decide(plan.checks, estimate)
            assert refusal is not None
            raise refuse(plan.checks, refusal, self.clock(), tenant, key_mask, request_id)
        for account in plan.accounts:
            account.hold(estimate)
        return Hold(self, plan.accounts, estimate), headers

    async def _plan(
        self, tenant: str, key_id: str, key_budgets: Budgets, tenant_budgets: Budgets | None
    ) -> _Plan:
        """The checks of ``(tenant, key_id)`` in the current periods, every account seeded;
        kept for the requests that follow until a period ends (or the budgets change)."""
        for _ in range(_SEED_TRIES):
            checks = self._checks(tenant, key_id, key_budgets, tenant_budgets, self.clock())
            unseeded = next((a for a, _ in checks if not a.seeded), None)
            if unseeded is None:
                break
            await self._seed(unseeded)
        else:
            raise ServiceUnavailable("The budgets' spend could not be read; try again.")
        accounts = tuple(dict.fromkeys(a for a, _ in checks))
        plan = _Plan(
            key_budgets,
            tenant_budgets,
            tuple(checks),
            accounts,
            max(a.start for a in accounts),
            min(a.end for a in accounts),
        )
        if len(self._plans) >= _MAX_PLANS:  # bounded (keys come and go): rebuilt on demand
            self._plans.clear()
        self._plans[tenant, key_id] = plan
        return plan

    def _checks(
        self,
        tenant: str,
        key_id: str,
        key_budgets: Budgets,
        tenant_budgets: Budgets | None,
        now: float,
    ) -> list[Check]:
        """Each budget of the key and of its tenant, with the account it counts in."""
        checks: list[Check] = []
        for limit in key_budgets.limits:
            key: AccountKey = ("key", key_id, limit.period)
            checks.append((self._account(key, tenant, key_id, now), limit))
        for limit in tenant_budgets.limits if tenant_budgets is not None else ():
            key = ("tenant", tenant, limit.period)
            checks.append((self._account(key, tenant, None, now), limit))
        return checks

    def _account(self, key: AccountKey, tenant: str, key_id: str | None, now: float) -> Account:
        """The account of ``key`` for the period holding ``now`` (a new one, unseeded, if
        the one held is of another period)."""
        start, end = self._bounds(key[2], now)
        account = self.accounts.get(key)
        if account is None or account.start != start:
            account = self.accounts[key] = Account(
                key[0], key[1], tenant, key_id, key[2], start, end
            )
        return account

    def _bounds(self, period: Period, now: float) -> tuple[float, float]:
        bounds = self._day if period == "day" else self._month
        if bounds[0] <= now < bounds[1]:
            return bounds
        if period == "day":
            bounds = self._day = day_bounds(now)
        else:
            bounds = self._month = month_bounds(now)
        self._sweep(now)
        return bounds

    def _sweep(self, now: float) -> None:
        """Forget the accounts of periods that are over (requests still holding one keep
        their own reference; a seed in progress keeps its account), and the plans."""
        self._plans.clear()
        for key in [k for k, a in self.accounts.items() if not a.current(now)]:
            if self.accounts[key] not in self._seeds:
                del self.accounts[key]

    async def _seed(self, account: Account) -> None:
        """Seed ``account`` from the ledger, or wait for the seed already under way (the
        caller looks again either way: a failed or cancelled seed leaves it unseeded)."""
        running = self._seeds.get(account)
        if running is not None:
            await running.wait()
            return
        done = self._seeds[account] = trio.Event()
        try:
            source = self.source
            if source is None:  # no ledger: what this process charged is all there is
                account.seed(account.late_usd, account.late_tokens)
                return
            for round_ in range(SEED_ROUNDS):
                charges, late_usd, late_tokens = (
                    account.charges,
                    account.late_usd,
                    account.late_tokens,
                )
                await source.sync_ledger()
                usd, tokens = await source.spend(account.tenant, account.key_id, account.start)
                if account.charges == charges or round_ == SEED_ROUNDS - 1:
                    # The charges before this round are in what was read; any since may not be.
                    account.seed(
                        usd + account.late_usd - late_usd,
                        tokens + account.late_tokens - late_tokens,
                    )
                    return
        finally:
            del self._seeds[account]
            done.set()

    # --- settle ----------------------------------------------------------------------------

    def settle(self, hold: Hold, usd: float, tokens: int) -> None:
        now = self.clock()
        est = hold.estimate
        for account in hold.accounts:
            account.release(est)
            if account.seeded and account.start <= now < account.end:  # the usual case
                account.spent_usd += usd
                account.spent_tokens += tokens
                account.charges += 1
                continue
            if not account.current(now):  # it ended in a later period: charge that one's
                current = self.accounts.get((account.scope, account.owner, account.period))
                if current is None or not current.current(now):
                    continue  # not seen yet this period: its seed reads the ledger
                account = current
            account.charge(usd, tokens)

    def release(self, hold: Hold) -> None:
        est = hold.estimate
        for account in hold.accounts:
            account.release(est)

    # --- the gauge -------------------------------------------------------------------------

    def remaining_usd(self) -> Iterable[tuple[str, Period, float]]:
        return usd_left(self.tenants, list(self.accounts.values()), self.clock())
