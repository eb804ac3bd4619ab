"""The ledger's pure parts: usage counts from every dialect's shape, whole answers read from
their bytes, and cost at the model table's prices."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config import ModelConfig
from runestone_proxy.gateway.accounting import answer_counts, stream_counts
from runestone_proxy.gateway.ledger import UsageCounts, cost_usd, usage_counts

CHAT = {
    "prompt_tokens": 100,
    "completion_tokens": 40,
    "total_tokens": 140,
    "prompt_tokens_details": {"cached_tokens": 30},
    "completion_tokens_details": {"reasoning_tokens": 10},
}
RESPONSES = {
    "input_tokens": 100,
    "input_tokens_details": {"cached_tokens": 30},
    "output_tokens": 40,
    "output_tokens_details": {"reasoning_tokens": 10},
    "total_tokens": 140,
}
# Anthropic: input_tokens excludes the cache reads and writes.
MESSAGES = {
    "input_tokens": 50,
    "cache_read_input_tokens": 30,
    "cache_creation_input_tokens": 20,
    "output_tokens": 40,
}


@pytest.mark.parametrize(
    ("usage", "counts"),
    [
        (CHAT, UsageCounts(100, 40, 30, 10)),
        (RESPONSES, UsageCounts(100, 40, 30, 10)),
        (MESSAGES, UsageCounts(100, 40, 30, 0)),
        ({"input_tokens": 7, "output_tokens": 3}, UsageCounts(7, 3, 0, 0)),
        ({"prompt_tokens": 5, "total_tokens": 5}, UsageCounts(5, 0, 0, 0)),  # embeddings
        ({}, None),
        (None, None),
    ],
)
def test_usage_counts_in_every_shape(usage: object, counts: UsageCounts | None) -> None:
    assert usage_counts(usage) == counts  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("endpoint", "usage"),
    [("chat", CHAT), ("embeddings", CHAT), ("responses", RESPONSES), ("messages", MESSAGES)],
)
def test_a_whole_answer_is_read_from_its_bytes(endpoint: str, usage: dict[str, object]) -> None:
    """The byte scan agrees with the parse (usage closes the object; a prompt that mentions
    the key names earlier does not confuse it)."""
    body = {"id": "x", "echo": '"prompt_tokens": 1', "output": [], "usage": usage}
    raw = json.dumps(body).encode()
    assert answer_counts(endpoint, raw) == usage_counts(usage)
    assert answer_counts(endpoint, b'{"id":"x"}') is None


def test_a_stream_without_usage_is_estimated() -> None:
    counts, estimated = stream_counts(None, {"messages": [{"content": "x" * 40}]}, 7)
    assert estimated
    assert counts == UsageCounts(10, 7, 0, 0)
    counts, estimated = stream_counts(CHAT, {}, 7)
    assert not estimated
    assert counts == UsageCounts(100, 40, 30, 10)


ENTRY = ModelConfig(
    "m", "p", input_cost_per_1k=3.0, output_cost_per_1k=15.0, cached_input_cost_per_1k=0.3
)


def test_cost_prices_cached_input_apart() -> None:
    assert cost_usd(ENTRY, UsageCounts(1000, 1000, 400, 0)) == pytest.approx(
        (600 * 3.0 + 400 * 0.3 + 1000 * 15.0) / 1000
    )
    no_cached_price = ModelConfig("m", "p", input_cost_per_1k=3.0, output_cost_per_1k=15.0)
    assert cost_usd(no_cached_price, UsageCounts(1000, 0, 400, 0)) == pytest.approx(3.0)
    assert cost_usd(None, UsageCounts(1000, 1000, 0, 0)) == 0.0


@settings(max_examples=200, derandomize=True)
@given(
    records=st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 10**6)), min_size=1, max_size=50
    )
)
def test_costs_add_up_to_the_cent(records: list[tuple[int, int]]) -> None:
    """A sum of per-record costs equals the cost of the summed tokens, to the cent."""
    entry = ModelConfig("m", "p", input_cost_per_1k=0.15, output_cost_per_1k=0.6)
    each = sum(cost_usd(entry, UsageCounts(p, c)) for p, c in records)
    whole = cost_usd(entry, UsageCounts(sum(p for p, _ in records), sum(c for _, c in records)))
    assert round(each, 2) == round(whole, 2)
