"""A request's budget hold and the interface of the books that give one: :class:`Hold`,
:class:`BudgetBook` (what admission and accounting call), :class:`SpendSource` (what a book
reads the spend so far from: the ledger's store), and what every book shares: the tenants'
budgets from the config and the 429 a refusal raises (:func:`refuse`).

The books are :class:`~.budget_book.LocalBudgetBook` (this process's memory, the embedded
default) and ``server/redis_budgets.RedisBudgetBook`` (shared by every worker and host);
the pure arithmetic they both run is in :mod:`.budget`, the headers and messages in
:mod:`.budget_wire`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from runestone_proxy import telemetry
from runestone_proxy.config import Config
from runestone_proxy.errors import BudgetExceeded
from runestone_proxy.gateway.budget import (
    NO_BUDGETS,
    Account,
    Budgets,
    Check,
    Estimate,
    Headers,
    Period,
    Refusal,
)
from runestone_proxy.gateway.budget_wire import budget_headers, refusal_message

__all__ = ["NO_HOLD", "BudgetBook", "Hold", "SpendSource", "refuse", "tenant_budgets"]


class SpendSource(Protocol):
    """What the ledger's store offers the budgets (``server.store.Store``)."""

    async def spend(self, tenant: str, key_id: str | None, since: float) -> tuple[float, int]:
        """USD and tokens of ``tenant`` (only ``key_id``'s, if given) since ``since``."""
        ...

    async def sync_ledger(self) -> None:
        """Return once every record handed over before the call is written."""
        ...


class Hold:
    """A request's reservation, settled once: :meth:`settle` with its real cost (where its
    ledger record is made), or :meth:`release` (it never reached a provider, was parked or
    refused). Later calls do nothing."""

    __slots__ = ("accounts", "book", "done", "estimate")

    def __init__(
        self, book: BudgetBook | None, accounts: tuple[Account, ...], estimate: Estimate
    ) -> None:
        self.book = book
        self.accounts = accounts
        self.estimate = estimate
        self.done = book is None

    def settle(self, usd: float, tokens: int) -> None:
        if self.done:
            return
        self.done = True
        assert self.book is not None
        self.book.settle(self, usd, tokens)

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        assert self.book is not None
        self.book.release(self)


#: No budget applies: settling it does nothing.
NO_HOLD = Hold(None, (), Estimate(0.0, 0))


class BudgetBook(Protocol):
    """The budgets' state, as admission and accounting use it."""

    def applies(self, tenant: str, key_budgets: Budgets) -> bool:
        """Whether any budget applies to a request of ``tenant`` with a key with
        ``key_budgets`` (when none does, the request pays nothing here)."""
        ...

    async def reserve(
        self,
        tenant: str,
        key_id: str,
        key_mask: str,
        key_budgets: Budgets,
        estimate: Estimate,
        request_id: str | None = None,
    ) -> tuple[Hold, Headers]:
        """Reserve ``estimate`` in every budget of the key (``key_budgets``) and of its
        tenant, returning the hold and the ``x-runestone-budget-*`` headers; or raise 429
        :class:`~runestone_proxy.errors.BudgetExceeded` (nothing reserved)."""
        ...

    def settle(self, hold: Hold, usd: float, tokens: int) -> None:
        """The request ended having cost ``usd`` and ``tokens``: release, then charge. Never
        blocks (it is called where the ledger record is made)."""
        ...

    def release(self, hold: Hold) -> None:
        """The request ended without cost: release its reservation."""
        ...

    def reconfigure(self, config: Config) -> None:
        """A reloaded config's tenant budgets (key budgets come with each principal)."""
        ...

    def remaining_usd(self) -> Iterable[tuple[str, Period, float]]:
        """``(tenant, period, USD left)`` for each tenant USD budget seen this period."""
        ...


def tenant_budgets(config: Config) -> dict[str, Budgets]:
    """The tenants that have budgets, and theirs."""
    found = {name: Budgets.from_config(t) for name, t in config.tenants.items()}
    return {name: b for name, b in found.items() if b is not NO_BUDGETS}


def refuse(
    checks: Sequence[Check],
    refusal: Refusal,
    now: float,
    tenant: str,
    key_mask: str,
    request_id: str | None,
) -> BudgetExceeded:
    """``budget.block``, and the 429 to raise for ``refusal`` (either book's)."""
    telemetry.emit(
        "budget.block",
        tenant=tenant,
        key_mask=key_mask,
        request_id=request_id,
        budget=f"{refusal.account.scope}.{refusal.limit.name}",
        limit=refusal.limit.amount,
        spent=refusal.spent,
        held=refusal.held,
        estimate=refusal.estimate,
    )
    return BudgetExceeded(
        refusal_message(refusal, key_mask),
        retry_after_s=None if refusal.too_large else refusal.reset_at - now,
        headers=budget_headers(checks, refusal),
    )
