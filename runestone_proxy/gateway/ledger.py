"""The usage ledger: one record per request that reached a provider. Pure, but for the
interface the store implements.

Every request that reaches a provider (any endpoint and dialect, live or from the overflow
queue, streamed or whole, finished, failed, cancelled by its client, after any number of
failed-over attempts) leaves one :class:`UsageRecord`: who (tenant, key id: never the key),
what (endpoint, the model asked for, the provider and upstream model that answered), how it
went (status, outcome, attempts, latency, time to first chunk) and what it used (prompt,
completion, cached and reasoning tokens, and their cost in USD from the model table's
prices). The numbers are the provider's own usage; where a stream was cut before the
provider reported it, the record carries what Runestone can count and says so
(``estimated``).

The service hands records to a :class:`UsageLedger` (``record`` never blocks: the SQLite
store batches them into its single writer's group commits, so the ledger adds no fsync per
request). :func:`usage_counts` reads the four counts from any usage shape a dialect reports
(OpenAI chat, Anthropic Messages, OpenAI Responses); :func:`cost_usd` prices them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple, Protocol

import attrs

from runestone_proxy.config import ModelConfig

__all__ = [
    "MemoryLedger",
    "Outcome",
    "UsageCounts",
    "UsageLedger",
    "UsageRecord",
    "UsageRow",
    "cost_usd",
    "usage_counts",
    "usage_from_body",
]

#: ``ok``: the provider answered (whole, or the stream ended normally); ``error``: it failed
#: (before or after the stream started); ``cancelled``: the client went away first.
Outcome = Literal["ok", "error", "cancelled"]


@attrs.frozen
class UsageCounts:
    """Tokens as the provider reported them. ``prompt`` includes ``cached`` (OpenAI's
    convention; Anthropic's cache reads and writes are added to it), ``completion``
    includes ``reasoning``."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    reasoning: int = 0

    @property
    def total(self) -> int:
        return self.prompt + self.completion


class UsageRecord(NamedTuple):
    """One request's line in the ledger (see the module docstring).

    A named tuple rather than an attrs class, unlike the other values here: the store
    holds up to thousands of records between writes, and a tuple is cheaper to build (no
    Python ``__init__``), to hold and to flatten for binding. The service hands the ledger
    the same fields as a plain tuple (:data:`UsageRow`), which the collector untracks at
    its first pass (it untracks exact tuples of atoms, never a named tuple's instances):
    thousands of pending records are then not traversed again by every later pass."""

    at: float  # epoch seconds, when the request ended
    request_id: str
    tenant: str
    key_id: str
    endpoint: str
    model: str  # as the client asked for it (alias, pattern or id)
    provider: str
    upstream_model: str
    attempts: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    cost_usd: float
    status: int
    outcome: Outcome
    stream: bool
    #: The counts are Runestone's estimate (a stream cut before the provider reported usage).
    estimated: bool
    latency_ms: float
    #: Time to the first chunk of a stream (None for a whole answer).
    ttfb_ms: float | None = None


#: A record's fields in :class:`UsageRecord`'s order, as a plain tuple (a
#: :class:`UsageRecord` is one too): what the service hands the ledger.
UsageRow = tuple[
    float, str, str, str, str, str, str, str, int, int, int, int, int, float, int, Outcome,
    bool, bool, float, float | None,
]  # fmt: skip


class UsageLedger(Protocol):
    """Where records go. ``record`` must not block the request: it queues."""

    def record(self, record: UsageRow) -> None: ...


@attrs.define(eq=False)
class MemoryLedger:
    """A ledger in a list (tests, and a gateway with no durable store)."""

    records: list[UsageRecord] = attrs.Factory(list)

    def record(self, record: UsageRow) -> None:
        self.records.append(UsageRecord._make(record))


def _int(value: object) -> int:
    return value if type(value) is int and value > 0 else 0


def usage_counts(usage: Mapping[str, Any] | None) -> UsageCounts | None:
    """The four counts from a usage object in any dialect's shape, or None if it has none:
    OpenAI chat (``prompt_tokens``, ``completion_tokens``, ``*_tokens_details``), OpenAI
    Responses (``input_tokens``, ``output_tokens``, ``input_tokens_details.cached_tokens``,
    ``output_tokens_details.reasoning_tokens``) and Anthropic Messages (``input_tokens``
    without the cache, ``cache_read_input_tokens``, ``cache_creation_input_tokens``)."""
    if not isinstance(usage, Mapping):
        return None
    if "prompt_tokens" in usage or "completion_tokens" in usage:
        details = usage.get("prompt_tokens_details")
        out_details = usage.get("completion_tokens_details")
        return UsageCounts(
            _int(usage.get("prompt_tokens")),
            _int(usage.get("completion_tokens")),
            _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0,
            _int(out_details.get("reasoning_tokens")) if isinstance(out_details, Mapping) else 0,
        )
    if "input_tokens" in usage or "output_tokens" in usage:
        if "cache_read_input_tokens" in usage or "cache_creation_input_tokens" in usage:
            cached = _int(usage.get("cache_read_input_tokens"))
            written = _int(usage.get("cache_creation_input_tokens"))
            prompt = _int(usage.get("input_tokens")) + cached + written
            return UsageCounts(prompt, _int(usage.get("output_tokens")), cached, 0)
        details = usage.get("input_tokens_details")
        out_details = usage.get("output_tokens_details")
        return UsageCounts(
            _int(usage.get("input_tokens")),
            _int(usage.get("output_tokens")),
            _int(details.get("cached_tokens")) if isinstance(details, Mapping) else 0,
            _int(out_details.get("reasoning_tokens")) if isinstance(out_details, Mapping) else 0,
        )
    return None


def usage_from_body(body: bytes) -> UsageCounts | None:
    """The usage a whole answer reports, in any dialect (its top-level ``usage`` object).
    Parses the JSON only when the bytes name a usage object."""
    if b'"usage"' not in body:
        return None
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    return usage_counts(obj.get("usage")) if isinstance(obj, dict) else None


def cost_usd(entry: ModelConfig | None, counts: UsageCounts) -> float:
    """What the counts cost at the model table's prices (0 for a model with no entry):
    uncached prompt tokens at the input price, cached ones at the cached-input price where
    the table has one (else the input price), completion tokens at the output price."""
    if entry is None:
        return 0.0
    cached_price = entry.cached_input_cost_per_1k
    if cached_price is None:
        cached_price = entry.input_cost_per_1k
    uncached = counts.prompt - counts.cached
    return (
        uncached * entry.input_cost_per_1k
        + counts.cached * cached_price
        + counts.completion * entry.output_cost_per_1k
    ) / 1000
