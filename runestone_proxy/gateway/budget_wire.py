"""Budgets on the wire: the ``x-runestone-budget-*`` headers and the refusal's message.
Pure, like :mod:`.budget` (whose values it reads)."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from runestone_proxy.gateway.budget import Account, Check, Headers, Period, Refusal, Unit

__all__ = ["binds", "budget_headers", "refusal_message", "rfc3339", "usd"]


@functools.lru_cache(maxsize=64)
def rfc3339(at: float) -> str:
    """``at`` as an RFC 3339 UTC time, ``2026-12-06T00:00:00Z`` (period ends repeat: cached)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(at))


def usd(amount: float) -> str:
    """Dollars to the micro-dollar, without trailing zeros: ``25``, ``0.000342``."""
    text = f"{amount:.6f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def binds(left: float, account: Account, best: tuple[float, Check]) -> bool:
    """Does a budget with ``left`` in ``account`` bind more than ``best``? Less left, or as
    much with a later reset."""
    return left < best[0] or (left == best[0] and account.end > best[1][0].end)


def budget_headers(checks: Sequence[Check], refusal: Refusal | None = None) -> Headers:
    """``x-runestone-budget-{limit,remaining}-usd`` and ``x-runestone-budget-reset`` for the
    most binding USD budget (least remaining; on a tie the later reset), and the
    ``-tokens`` trio likewise when a tokens budget applies. On a refusal, its budget is the
    one reported for its unit."""
    best: dict[Unit, tuple[float, Check]] = {}
    for check in checks:
        account, limit = check
        spent, held = account.used(limit.unit)
        left = max(0.0, limit.amount - spent - held)
        held_best = best.get(limit.unit)
        if held_best is None or binds(left, account, held_best):
            best[limit.unit] = (left, check)
    if refusal is not None:
        left = max(0.0, refusal.limit.amount - refusal.spent - refusal.held)
        best[refusal.limit.unit] = (left, (refusal.account, refusal.limit))
    out: list[tuple[bytes, bytes]] = []
    if "usd" in best:
        left, (account, limit) = best["usd"]
        out += (
            (b"x-runestone-budget-limit-usd", limit.text),
            (b"x-runestone-budget-remaining-usd", usd(left).encode()),
            (b"x-runestone-budget-reset", account.reset),
        )
    if "tokens" in best:
        left, (account, limit) = best["tokens"]
        out += (
            (b"x-runestone-budget-limit-tokens", limit.text),
            (b"x-runestone-budget-remaining-tokens", b"%d" % left),
            (b"x-runestone-budget-reset-tokens", account.reset),
        )
    return tuple(out)


_PERIOD_WORDS: dict[Period, tuple[str, str]] = {
    "day": ("daily", "per UTC day"),
    "month": ("monthly", "per calendar month, UTC"),
}


def _amount(unit: Unit, value: float) -> str:
    return f"${usd(value)}" if unit == "usd" else f"{int(value)} tokens"


def refusal_message(refusal: Refusal, key_mask: str) -> str:
    """The 429's message: which budget (of the key or of its tenant), the numbers, and when
    it resets (or, for a request that can never fit, what to lower)."""
    account, limit = refusal.account, refusal.limit
    who = f"key {key_mask}" if account.scope == "key" else f"tenant {account.tenant!r}"
    adjective, per = _PERIOD_WORDS[limit.period]
    kind = "USD" if limit.unit == "usd" else "token"
    name = f"the {adjective} {kind} budget of {who} ({_amount(limit.unit, limit.amount)} {per})"
    if refusal.too_large:
        return (
            f"This request's estimated cost ({_amount(limit.unit, refusal.estimate)}) is over "
            f"{name} by itself. Lower max_tokens (max_completion_tokens, max_output_tokens) "
            "or shorten the prompt."
        )
    return (
        f"You exceeded your current quota: {name} is used up "
        f"({_amount(limit.unit, refusal.spent)} spent, "
        f"{_amount(limit.unit, refusal.held)} in flight; this request may cost up to "
        f"{_amount(limit.unit, refusal.estimate)}). It resets at {rfc3339(refusal.reset_at)}."
    )
