"""Accounting: the ledger record each request leaves, built where the service ends it.

The service calls :func:`account` once per request that reached a provider: after a whole
answer, after a failure (before or after a stream started), after a stream ended or its
client went away, for live requests and queued jobs alike. :class:`Attempts` wraps the
plan's ``call_for`` (the failover calls it once per attempt), so the count and the last
deployment tried come for free. Usage is the provider's: read from a whole answer's bytes
(:func:`answer_counts`, no JSON parse) or from the stream's translator (chat shape, every
dialect); a stream that ended without it is recorded with an estimate (the prompt at ~4
characters per token, one token per relayed chunk), marked ``estimated``.

The same cost settles the request's budget reservation (``hold``), right after the record
is handed to the ledger: the budgets' memory advances by exactly what the ledger records
(and in that order, which the budgets' seed relies on: :mod:`.budget_book`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import trio

from runestone_proxy import metrics
from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.budget_hold import NO_HOLD, Hold
from runestone_proxy.gateway.ledger import (
    Outcome,
    UsageCounts,
    UsageLedger,
    cost_usd,
    usage_counts,
)
from runestone_proxy.gateway.routing import Target
from runestone_proxy.gateway.token_estimate import estimate_tokens
from runestone_proxy.providers.base import ProviderCall

__all__ = ["Attempts", "account", "account_whole", "answer_counts", "failure", "stream_counts"]


class Attempts:
    """``call_for``, counting the attempts and remembering the last deployment tried."""

    __slots__ = ("call_for", "count", "target")

    def __init__(self, call_for: Callable[[Target], ProviderCall]) -> None:
        self.call_for = call_for
        self.count = 0
        self.target: Target | None = None

    def __call__(self, target: Target) -> ProviderCall:
        self.count += 1
        self.target = target
        return self.call_for(target)


#: An integer member of a JSON object: its name and digits (one C pass over the usage).
_INT_MEMBER = re.compile(rb'"([a-z_]+)":\s*(\d+)')


def answer_counts(endpoint: str, body: bytes) -> UsageCounts | None:
    """The usage a whole answer reports, found in its bytes without a parse: the integer
    members after its last ``"usage"`` key (usage closes the object, so this reads the
    usage object, not the answer), or None when it has none."""
    at = body.rfind(b'"usage"')
    if at < 0:
        return None
    found = dict(_INT_MEMBER.findall(body, at))
    if endpoint == "messages":  # input_tokens excludes the cache (read and written)
        cached = int(found.get(b"cache_read_input_tokens", 0))
        written = int(found.get(b"cache_creation_input_tokens", 0))
        prompt = found.get(b"input_tokens")
        completion = found.get(b"output_tokens")
        if prompt is None and completion is None:
            return None
        return UsageCounts(int(prompt or 0) + cached + written, int(completion or 0), cached, 0)
    if endpoint == "responses":
        prompt, completion = found.get(b"input_tokens"), found.get(b"output_tokens")
    else:
        prompt, completion = found.get(b"prompt_tokens"), found.get(b"completion_tokens")
    if prompt is None and completion is None:
        return None
    return UsageCounts(
        int(prompt or 0),
        int(completion or 0),
        int(found.get(b"cached_tokens", 0)),
        int(found.get(b"reasoning_tokens", 0)),
    )


def failure(exc: BaseException) -> tuple[int, Outcome]:
    """A failed request's status and outcome: a gateway error's own status; the client gone
    (cancelled, or its connection broke) is 499 ``cancelled``."""
    if isinstance(exc, GatewayError):
        return exc.http_status, "error"
    if isinstance(exc, trio.Cancelled | trio.BrokenResourceError | trio.ClosedResourceError):
        return 499, "cancelled"
    return 500, "error"


def account(
    ledger: UsageLedger | None,
    *,
    request_id: str,
    tenant: str,
    key_id: str,
    endpoint: str,
    model: object,
    attempts: Attempts,
    counts: UsageCounts | None,
    estimated: bool,
    status: int,
    outcome: Outcome,
    stream: bool,
    started: float,
    ttfb: float | None = None,
    hold: Hold = NO_HOLD,
) -> None:
    """Record one request in the ledger (and the token and cost counters), if it reached a
    provider, and settle its budget ``hold`` with the cost. ``started``/``ttfb`` are
    ``time.perf_counter()`` values."""
    target = attempts.target
    if target is None or (ledger is None and hold.done):
        return  # nothing reached a provider: the admission releases the hold
    now = time.perf_counter()
    if counts is None:
        counts = _NO_USAGE
    prompt, completion, cached = counts.prompt, counts.completion, counts.cached
    cost = cost_usd(target.entry, counts)
    model_id = target.model
    if ledger is None:  # no ledger: the budgets still count the cost (in memory only)
        hold.settle(cost, prompt + completion)
        return
    # A plain tuple in UsageRecord's field order (UsageRow): no constructor call, and the
    # collector untracks it while it waits for the writer (ledger.UsageRecord says why).
    ledger.record(
        (
            time.time(),
            request_id,
            tenant,
            key_id,
            endpoint,
            model if isinstance(model, str) else model_id,
            target.provider,
            target.upstream_model,
            attempts.count,
            prompt,
            completion,
            cached,
            counts.reasoning,
            cost,
            status,
            outcome,
            stream,
            estimated,
            (now - started) * 1000,
            None if ttfb is None else (ttfb - started) * 1000,
        )
    )
    if not hold.done:  # most requests hold no budget: no call
        hold.settle(cost, prompt + completion)
    metrics.count_usage(tenant, model_id, prompt, completion, cached, cost)


_NO_USAGE = UsageCounts()


def account_whole(
    ledger: UsageLedger | None,
    request_id: str,
    tenant: str,
    key_id: str,
    endpoint: str,
    model: object,
    attempts: Attempts,
    started: float,
    counts: UsageCounts | None,
    status: int = 200,
    outcome: Outcome = "ok",
    *,
    hold: Hold = NO_HOLD,
) -> None:
    """:func:`account` for a whole answer (or a failure before any answer)."""
    account(
        ledger,
        request_id=request_id,
        tenant=tenant,
        key_id=key_id,
        endpoint=endpoint,
        model=model,
        attempts=attempts,
        counts=counts,
        estimated=False,
        status=status,
        outcome=outcome,
        stream=False,
        started=started,
        hold=hold,
    )


def stream_counts(
    usage: Mapping[str, Any] | None, body: Mapping[str, Any], chunks: int
) -> tuple[UsageCounts, bool]:
    """A stream's counts (chat shape, as every stream translator reports them), or the
    estimate when the provider reported none: ``(counts, estimated)``."""
    counts = usage_counts(usage)
    if counts is not None:
        return counts, False
    return UsageCounts(estimate_tokens(body, 0), chunks), True
