"""Which Redis accounts a request's budgets count in, and what the scripts' numbers mean.

A :class:`Plan` is the budgets of one ``(tenant, key id)`` in the current periods: the
accounts (a key or tenant, a UTC day or month: :mod:`.redis_budget_scripts` names their
keys) with their checks, and the ``RESERVE`` keys and arguments that do not change from one
request to the next. The first request of a ``(tenant, key id)`` in a period builds it;
later ones reuse it (a dict lookup, no calendar arithmetic, no string building) until a
period ends or a reload changes the budgets, as the in-process book's plans do.

Each account carries an :class:`~runestone_proxy.gateway.budget.Account` as its *view*: the
numbers the last script returned (spent and held, as before that request's hold), so the
headers and the refusal's words come from the same pure functions as in-process
(:func:`~runestone_proxy.gateway.budget.admit`, :func:`~.budget.decide`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

from runestone_proxy.gateway.budget import (
    Account,
    Budgets,
    Check,
    Estimate,
    Period,
    Refusal,
    Scope,
    decide,
    period_bounds,
    plan_fits,
    usd_left,
)
from runestone_proxy.server.redis_budget_scripts import fmt

__all__ = ["Plan", "Plans", "RedisAccount", "fill", "refusal"]

#: An account's keys live this long past its period's end (late settles, the gauge).
GRACE_MS = 86_400_000
#: Plans kept at most (one per key with a budget); past it they are rebuilt on demand.
_MAX_PLANS = 65536


@attrs.define(slots=True, eq=False)
class RedisAccount:
    """One account (scope, owner, period) in Redis: its keys, its TTL, and its view."""

    key: str
    holds: str
    view: Account
    ttl_ms: int


@attrs.define(slots=True, eq=False)
class Plan:
    """The budgets of one ``(tenant, key id)`` in the current periods (module docstring)."""

    key_budgets: Budgets
    tenant_budgets: Budgets | None
    accounts: tuple[RedisAccount, ...]
    checks: tuple[Check, ...]
    #: RESERVE's KEYS, and the part of its ARGV after the member, estimate and lease.
    keys: tuple[str, ...]
    tail: tuple[str | int, ...]
    #: Valid while ``since <= now < until`` (the latest start, the earliest end).
    since: float
    until: float


@attrs.define(eq=False)
class Plans:
    """The plans and accounts of one process."""

    prefix: str
    _plans: dict[tuple[str, str], Plan] = attrs.Factory(dict)
    #: Every account of a current plan, by key (the gauge reads the tenant ones).
    accounts: dict[str, RedisAccount] = attrs.Factory(dict)

    def get(
        self,
        tenant: str,
        key_id: str,
        key_budgets: Budgets,
        tenant_budgets: Budgets | None,
        now: float,
    ) -> Plan:
        """The plan of ``(tenant, key_id)`` for ``now``: the one kept, or a new one."""
        plan = self._plans.get((tenant, key_id))
        if plan is None or not plan_fits(plan, now, key_budgets, tenant_budgets):
            plan = self._build(tenant, key_id, key_budgets, tenant_budgets, now)
        return plan

    def _build(
        self,
        tenant: str,
        key_id: str,
        key_budgets: Budgets,
        tenant_budgets: Budgets | None,
        now: float,
    ) -> Plan:
        accounts: dict[str, RedisAccount] = {}
        checks: list[tuple[RedisAccount, Check]] = []
        owners: tuple[tuple[Scope, str, Budgets | None], ...] = (
            ("key", key_id, key_budgets),
            ("tenant", tenant, tenant_budgets),
        )
        for scope, owner, budgets in owners:
            for limit in budgets.limits if budgets is not None else ():
                account = self.account(scope, owner, tenant, key_id, limit.period, now)
                accounts[account.key] = account
                checks.append((account, (account.view, limit)))
        ordered = tuple(accounts.values())
        tail: list[str | int] = [a.ttl_ms for a in ordered]
        for account, (_, limit) in checks:
            tail += [ordered.index(account) + 1, "u" if limit.unit == "usd" else "t"]
            tail.append(fmt(limit.amount))
        plan = Plan(
            key_budgets,
            tenant_budgets,
            ordered,
            tuple(check for _, check in checks),
            tuple(k for a in ordered for k in (a.key, a.holds)),
            tuple(tail),
            max(a.view.start for a in ordered),
            min(a.view.end for a in ordered),
        )
        if len(self._plans) >= _MAX_PLANS:  # bounded (keys come and go)
            self._plans.clear()
            self.accounts.clear()
        self._plans[tenant, key_id] = plan
        return plan

    def account(
        self, scope: Scope, owner: str, tenant: str, key_id: str, period: Period, now: float
    ) -> RedisAccount:
        """The account of ``(scope, owner, period)`` for the period holding ``now``."""
        start, end = period_bounds(period, now)
        tag = time.strftime("%Y-%m-%d" if period == "day" else "%Y-%m", time.gmtime(start))
        key = f"{self.prefix}bud:{scope}:{owner}:{period}:{tag}"
        account = self.accounts.get(key)
        if account is None:
            for old in [k for k, a in self.accounts.items() if not a.view.current(now)]:
                del self.accounts[old]
            view = Account(
                scope, owner, tenant, key_id if scope == "key" else None, period, start, end
            )
            ttl = max(0, int((end - now) * 1000)) + GRACE_MS
            account = self.accounts[key] = RedisAccount(key, f"{key}:holds", view, ttl)
        return account

    def current(self, account: RedisAccount, now: float) -> RedisAccount:
        """``account``, or, if its period is over, the same scope's account now."""
        view = account.view
        if view.current(now):
            return account
        key_id = view.key_id or ""
        return self.account(view.scope, view.owner, view.tenant, key_id, view.period, now)

    def remaining_usd(
        self, tenants: Mapping[str, Budgets], now: float
    ) -> Iterable[tuple[str, Period, float]]:
        """Each tenant USD budget, as this process's last request of that tenant saw it."""
        return usd_left(tenants, [a.view for a in self.accounts.values()], now)


def fill(plan: Plan, reply: list[Any]) -> None:
    """RESERVE's numbers (as before its hold) into each account's view."""
    for i, account in enumerate(plan.accounts):
        usd, held_usd, tok, held_tok = reply[1 + 4 * i : 5 + 4 * i]
        view = account.view
        view.spent_usd, view.held_usd = float(usd), float(held_usd)
        view.spent_tokens, view.held_tokens = int(float(tok)), int(float(held_tok))
        view.seeded = True


def refusal(plan: Plan, which: int, est: Estimate) -> Refusal:
    """Why RESERVE refused (its ``which``-th budget, or the one that lasts longest), from
    the numbers :func:`fill` put in the views."""
    found = decide(plan.checks, est)
    if found is None:  # the pure decision disagrees in the last bit: the script's stands
        account, limit = plan.checks[which - 1]
        spent, held = account.used(limit.unit)
        want = est.usd if limit.unit == "usd" else float(est.tokens)
        found = Refusal(account, limit, spent, held, want, want > limit.amount)
    return found
