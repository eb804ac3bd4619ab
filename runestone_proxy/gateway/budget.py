"""Budgets: what a key or a tenant may spend per UTC day and calendar month (USD), and
optionally how many tokens per UTC day. Pure: the periods, the estimate, the decision and
the reservation arithmetic (the headers and the refusal's words: :mod:`.budget_wire`). No
trio, no I/O, no clock: the caller passes the time. The state (one :class:`Account` per
scope and period, seeded from the ledger) is :mod:`.budget_book`'s; what both of its books
(in-process and Redis) compute alike is here: whether a kept plan still fits
(:func:`plan_fits`) and the gauge's USD left (:func:`usd_left`).

How this works
--------------
* **Periods** are UTC: a day is ``[00:00, 24:00)`` UTC (POSIX time has no leap seconds, so
  every day is 86,400 s), a month runs from 00:00 UTC on its first day to the next month's.
* **Estimate** (:func:`estimate`): the prompt at ~4 characters per token plus the
  completion's cap (``max_tokens``, ``max_completion_tokens``, ``max_output_tokens``, else
  ``routing.default_output_tokens``), priced at the most expensive candidate the request may
  be served by (the failover may land on any of them): an upper bound on the output, an
  estimate of the prompt.
* **Decision** (:func:`admit` on every request, :func:`decide` to explain a refusal): for
  every budget of the key and of its tenant, the period's spend so far, plus what requests
  in flight have reserved (``held``), plus this request's estimate must stay within the
  limit. A budget already at its limit admits nothing, even a
  free request. The refusal reported is the one that lasts longest (the latest reset), or
  one the request can never fit (its estimate alone is over the limit).
* **Reservation**: an admitted request adds its estimate to ``held`` of each account it was
  checked against; when it ends, :meth:`Account.release` takes the estimate back and
  :meth:`Account.charge` adds the real cost (the ledger record's) to the account of the
  period it ended in. So at every admission ``spent + held <= limit``, and the spend can pass
  a limit only by what requests in flight then cost beyond their estimates.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, NamedTuple, Protocol

import attrs

from runestone_proxy.config import ModelConfig
from runestone_proxy.gateway.budget_wire import binds, rfc3339, usd
from runestone_proxy.gateway.token_estimate import output_tokens, prompt_tokens

__all__ = [
    "NO_BUDGETS",
    "Account",
    "Budgets",
    "Check",
    "Estimate",
    "Limit",
    "Period",
    "Refusal",
    "Scope",
    "admit",
    "day_bounds",
    "decide",
    "estimate",
    "month_bounds",
    "period_bounds",
    "plan_fits",
    "usd_left",
]

Scope = Literal["key", "tenant"]
Period = Literal["day", "month"]
Unit = Literal["usd", "tokens"]
Headers = tuple[tuple[bytes, bytes], ...]

DAY_S = 86400.0


# --- periods ----------------------------------------------------------------------------------


def day_bounds(now: float) -> tuple[float, float]:
    """The UTC day holding ``now`` (epoch seconds): ``(start, end)``."""
    start = now - now % DAY_S
    return start, start + DAY_S


def month_bounds(now: float) -> tuple[float, float]:
    """The UTC calendar month holding ``now``: ``(start, end)``."""
    t = time.gmtime(now)
    year, month = t.tm_year, t.tm_mon
    after = (year + 1, 1) if month == 12 else (year, month + 1)
    start = calendar.timegm((year, month, 1, 0, 0, 0))
    return float(start), float(calendar.timegm((*after, 1, 0, 0, 0)))


def period_bounds(period: Period, now: float) -> tuple[float, float]:
    return day_bounds(now) if period == "day" else month_bounds(now)


# --- the budgets of a key or a tenant ---------------------------------------------------------


@attrs.frozen
class Limit:
    """One budget: ``amount`` USD or tokens per ``period``."""

    period: Period
    unit: Unit
    amount: float
    #: ``amount`` as a header value, derived once.
    text: bytes = attrs.field(init=False, eq=False, repr=False)

    @text.default
    def _text(self) -> bytes:
        return (usd(self.amount) if self.unit == "usd" else f"{self.amount:.0f}").encode()

    @property
    def name(self) -> str:
        """``usd_day``, ``usd_month``, ``tokens_day``: the config key without ``budget_``."""
        return f"{self.unit}_{self.period}"


class _Budgeted(Protocol):
    """A config table with budgets (``[[auth.keys]]``, ``[tenants.NAME]``)."""

    @property
    def budget_usd_day(self) -> float | None: ...
    @property
    def budget_usd_month(self) -> float | None: ...
    @property
    def budget_tokens_day(self) -> int | None: ...


@attrs.frozen
class Budgets:
    """A key's or a tenant's budgets; None means no budget of that kind."""

    usd_day: float | None = None
    usd_month: float | None = None
    tokens_day: int | None = None
    #: The budgets that are set, derived once (a request walks them).
    limits: tuple[Limit, ...] = attrs.field(init=False, eq=False, repr=False)

    @limits.default
    def _limits(self) -> tuple[Limit, ...]:
        limits = []
        if self.usd_day is not None:
            limits.append(Limit("day", "usd", float(self.usd_day)))
        if self.usd_month is not None:
            limits.append(Limit("month", "usd", float(self.usd_month)))
        if self.tokens_day is not None:
            limits.append(Limit("day", "tokens", float(self.tokens_day)))
        return tuple(limits)

    @classmethod
    def from_config(cls, entry: _Budgeted) -> Budgets:
        budgets = cls(entry.budget_usd_day, entry.budget_usd_month, entry.budget_tokens_day)
        return budgets if budgets.limits else NO_BUDGETS


NO_BUDGETS = Budgets()


# --- the estimate -----------------------------------------------------------------------------


class Estimate(NamedTuple):
    """What a request may cost: USD at its most expensive candidate, and tokens. A named
    tuple, not an attrs class: one is made per request, and a frozen attrs class pays an
    ``object.__setattr__`` per field."""

    usd: float
    tokens: int


def estimate(
    body: Mapping[str, Any], default_output_tokens: int, entries: Iterable[ModelConfig | None]
) -> Estimate:
    """The request's estimate (module docstring): ``entries`` are its candidates' model
    table entries (None: a model with no entry, priced 0). Cached input may be priced above
    the input price in a table; the higher of the two is used, to stay an upper bound."""
    prompt = prompt_tokens(body)
    output = output_tokens(body, default_output_tokens)
    usd = 0.0
    for entry in entries:
        if entry is None:
            continue
        input_price = entry.input_cost_per_1k
        cached = entry.cached_input_cost_per_1k
        if cached is not None and cached > input_price:
            input_price = cached
        cost = (prompt * input_price + output * entry.output_cost_per_1k) / 1000
        if cost > usd:
            usd = cost
    return Estimate(usd, prompt + output)


# --- accounts and the decision ----------------------------------------------------------------


@attrs.define(slots=True, eq=False)
class Account:
    """What one scope (a key, or a tenant) has spent in one period, and what requests in
    flight have reserved. ``seeded``: ``spent`` holds the ledger's total; until then the
    real costs charged to it wait in ``late_*`` (the seed adds those the ledger missed)."""

    scope: Scope
    #: The key id or the tenant's name.
    owner: str
    tenant: str
    #: The key's id (a tenant's account: None), as the ledger records it.
    key_id: str | None
    period: Period
    start: float
    end: float
    spent_usd: float = 0.0
    spent_tokens: int = 0
    held_usd: float = 0.0
    held_tokens: int = 0
    #: Reservations held (at zero ``held_*`` is reset exactly, shedding rounding).
    holds: int = 0
    seeded: bool = False
    late_usd: float = 0.0
    late_tokens: int = 0
    #: Real costs charged so far (the seed checks that none arrived while it read).
    charges: int = 0
    #: ``end`` as a header value (RFC 3339), derived once.
    reset: bytes = attrs.field(init=False, repr=False)

    @reset.default
    def _reset(self) -> bytes:
        return rfc3339(self.end).encode()

    def current(self, now: float) -> bool:
        return self.start <= now < self.end

    def hold(self, est: Estimate) -> None:
        self.held_usd += est.usd
        self.held_tokens += est.tokens
        self.holds += 1

    def release(self, est: Estimate) -> None:
        self.holds -= 1
        if self.holds <= 0:
            self.holds = 0
            self.held_usd, self.held_tokens = 0.0, 0
        else:
            self.held_usd -= est.usd
            self.held_tokens -= est.tokens

    def charge(self, usd: float, tokens: int) -> None:
        """A request's real cost (its ledger record's), as it ended in this period."""
        self.charges += 1
        if self.seeded:
            self.spent_usd += usd
            self.spent_tokens += tokens
        else:
            self.late_usd += usd
            self.late_tokens += tokens

    def seed(self, usd: float, tokens: int) -> None:
        """The ledger's total for the period (including every charge it has seen)."""
        self.spent_usd, self.spent_tokens = usd, tokens
        self.late_usd, self.late_tokens = 0.0, 0
        self.seeded = True

    def used(self, unit: Unit) -> tuple[float, float]:
        """``(spent, held)`` in ``unit``."""
        if unit == "usd":
            return self.spent_usd, self.held_usd
        return float(self.spent_tokens), float(self.held_tokens)


#: One budget checked against the account it counts in.
Check = tuple[Account, Limit]


@attrs.frozen
class Refusal:
    """Why a request is refused: the budget, the account's numbers then, and the reset."""

    account: Account = attrs.field(eq=False)
    limit: Limit
    spent: float
    held: float
    estimate: float
    #: The request can never fit: its estimate alone is over the limit.
    too_large: bool

    @property
    def reset_at(self) -> float:
        return self.account.end


def admit(checks: Sequence[Check], est: Estimate) -> Headers | None:
    """The headers of an admitted request (:func:`budget_headers` after its reservation),
    or None if a budget refuses it (then :func:`decide` says which). One pass, no
    allocation but the headers: it runs on every request with a budget."""
    usd_best: tuple[float, Check] | None = None
    tokens_best: tuple[float, Check] | None = None
    for check in checks:
        account, limit = check
        amount = limit.amount
        if limit.unit == "usd":
            used = account.spent_usd + account.held_usd
            total = used + est.usd
            if total > amount or used >= amount:  # decide's test, to the last bit
                return None
            left = amount - total
            if usd_best is None or binds(left, account, usd_best):
                usd_best = (left, check)
        else:
            used = account.spent_tokens + account.held_tokens
            total = used + est.tokens
            if total > amount or used >= amount:
                return None
            left = amount - total
            if tokens_best is None or binds(left, account, tokens_best):
                tokens_best = (left, check)
    out: Headers = ()
    if usd_best is not None:
        left, (account, limit) = usd_best
        out = (
            (b"x-runestone-budget-limit-usd", limit.text),
            (b"x-runestone-budget-remaining-usd", usd(max(0.0, left)).encode()),
            (b"x-runestone-budget-reset", account.reset),
        )
    if tokens_best is not None:
        left, (account, limit) = tokens_best
        out += (
            (b"x-runestone-budget-limit-tokens", limit.text),
            (b"x-runestone-budget-remaining-tokens", b"%d" % left),
            (b"x-runestone-budget-reset-tokens", account.reset),
        )
    return out


def decide(checks: Sequence[Check], est: Estimate) -> Refusal | None:
    """None if every budget admits ``est``; else the refusal that lasts longest (one the
    request can never fit first, then the latest reset)."""
    worst: Refusal | None = None
    for account, limit in checks:
        spent, held = account.used(limit.unit)
        want = est.usd if limit.unit == "usd" else float(est.tokens)
        used = spent + held
        if used + want <= limit.amount and used < limit.amount:
            continue
        refusal = Refusal(account, limit, spent, held, want, want > limit.amount)
        if (
            worst is None
            or (refusal.too_large and not worst.too_large)
            or (refusal.too_large == worst.too_large and refusal.reset_at > worst.reset_at)
        ):
            worst = refusal
    return worst


def usd_left(
    tenants: Mapping[str, Budgets], accounts: Iterable[Account], now: float
) -> list[tuple[str, Period, float]]:
    """``(tenant, period, USD left)`` for each tenant USD budget among ``accounts`` (those
    seeded and of the period holding ``now``): the gauge, for either book."""
    out: list[tuple[str, Period, float]] = []
    for account in accounts:
        budgets = tenants.get(account.owner) if account.scope == "tenant" else None
        if budgets is None or not account.seeded or not account.current(now):
            continue
        limit = budgets.usd_day if account.period == "day" else budgets.usd_month
        if limit is not None:
            left = limit - account.spent_usd - account.held_usd
            out.append((account.owner, account.period, max(0.0, left)))
    return out


class PlanShape(Protocol):
    """What a book's plan (the checks of one ``(tenant, key id)``, kept) has in common."""

    key_budgets: Budgets
    tenant_budgets: Budgets | None
    #: Valid while ``since <= now < until`` (the latest start, the earliest end).
    since: float
    until: float


def plan_fits(
    plan: PlanShape, now: float, key_budgets: Budgets, tenant_budgets: Budgets | None
) -> bool:
    """Whether a kept plan still serves a request at ``now``: its periods hold ``now`` and
    the budgets are the ones it was built for (a reload makes new ``Budgets`` objects)."""
    return (
        plan.since <= now < plan.until
        and plan.key_budgets is key_budgets
        and plan.tenant_budgets is tenant_budgets
    )
