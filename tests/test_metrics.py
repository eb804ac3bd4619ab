"""``Registry.render``: the whole exposition, or one tenant's view of it; ``merge``: several
workers' expositions as one; the usage counters (kept in cells) render as the plain
counters they replace."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.metrics import Labels, Registry, UsageCounters, merge


def registry() -> Registry:
    reg = Registry()
    blocks = reg.counter("blocks_total", "Blocks.")
    blocks.inc((("tenant", "acme"),))
    blocks.inc((("provider", "p"), ("tenant", "globex")), 2)
    reg.counter("requests_total", "Requests.").inc((("status", "200"),), 5)
    reg.gauge(
        "queued",
        "Queued.",
        lambda: [((("tenant", "acme"),), 1.0), ((("tenant", "globex"),), 4.0), ((), 7.0)],
    )
    return reg


def test_render_everything_by_default() -> None:
    text = registry().render().decode()
    assert 'blocks_total{tenant="acme"} 1' in text
    assert 'blocks_total{provider="p",tenant="globex"} 2' in text
    assert 'queued{tenant="globex"} 4' in text


def test_a_tenant_sees_no_other_tenants_series() -> None:
    text = registry().render(tenant="acme").decode()
    assert 'blocks_total{tenant="acme"} 1' in text
    assert 'queued{tenant="acme"} 1' in text
    assert "globex" not in text
    # Series that name no tenant stay, and so do every metric's HELP and TYPE lines.
    assert 'requests_total{status="200"} 5' in text
    assert "\nqueued 7\n" in text
    assert "# TYPE blocks_total counter" in text


def test_merge_sums_series_and_keeps_families_together() -> None:
    one = registry().render()
    other = Registry()
    other.counter("requests_total", "Requests.").inc((("status", "200"),), 2)
    other.counter("requests_total", "Requests.").inc((("status", "500"),), 1)
    other.gauge("runestone_circuit_state", "Breakers.", lambda: [((("provider", "p"),), 2.0)])
    again = Registry()
    again.gauge("runestone_circuit_state", "Breakers.", lambda: [((("provider", "p"),), 1.0)])
    lines = merge([one, other.render(), again.render()]).decode().splitlines()
    assert 'requests_total{status="200"} 7' in lines
    assert 'requests_total{status="500"} 1' in lines
    # A series only a sibling has stays under its family's TYPE line, not at the end.
    at = lines.index("# TYPE requests_total counter")
    assert lines[at + 1 : at + 3] == [
        'requests_total{status="200"} 7',
        'requests_total{status="500"} 1',
    ]
    assert lines.count("# TYPE requests_total counter") == 1
    assert 'runestone_circuit_state{provider="p"} 2' in lines  # a state: the worst, not a sum


@settings(max_examples=50, derandomize=True)
@given(
    st.dictionaries(
        st.sampled_from(["200", "404", "429", "500"]), st.integers(0, 10**6), min_size=1
    ),
    st.integers(1, 5),
)
def test_merging_copies_multiplies(counts: dict[str, int], copies: int) -> None:
    reg = Registry()
    for status, n in counts.items():
        reg.counter("requests_total", "Requests.").inc((("status", status),), n)
    text = reg.render()
    assert merge([text]) == text
    merged = merge([text] * copies).decode()
    for status, n in counts.items():
        assert f'requests_total{{status="{status}"}} {n * copies}\n' in merged


def usage_registries() -> tuple[Registry, UsageCounters, Registry]:
    """A registry counting usage in cells, and one counting it as plain counters did."""
    cells, plain = Registry(), Registry()
    usage = UsageCounters(cells.counter("tokens_total", "T."), cells.counter("cost_total", "C."))
    plain.counter("tokens_total", "T.")
    plain.counter("cost_total", "C.")
    return cells, usage, plain


def count_plainly(reg: Registry, tenant: str, model: str, counts: tuple[int, int, int]) -> float:
    base: Labels = (("model", model), ("tenant", tenant))
    prompt, completion, cached = counts
    reg.counters["tokens_total"].inc((("kind", "prompt"), *base), prompt)
    reg.counters["tokens_total"].inc((("kind", "completion"), *base), completion)
    if cached:
        reg.counters["tokens_total"].inc((("kind", "cached"), *base), cached)
    cost = (prompt + 3 * completion) / 1000
    reg.counters["cost_total"].inc(base, cost)
    return cost


@settings(max_examples=50, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["acme", "globex", 'we"ird\\']),
            st.sampled_from(["gpt-4o", "claude", "m\nx"]),
            st.tuples(st.integers(0, 10**6), st.integers(0, 10**6), st.integers(0, 3)),
        ),
        max_size=30,
    )
)
def test_usage_cells_render_as_plain_counters(
    records: list[tuple[str, str, tuple[int, int, int]]],
) -> None:
    cells, usage, plain = usage_registries()
    for tenant, model, counts in records:
        cost = count_plainly(plain, tenant, model, counts)
        usage.count(tenant, model, counts[0], counts[1], counts[2], cost)
    assert cells.render() == plain.render()
    assert cells.render(tenant="acme") == plain.render(tenant="acme")
    assert merge([cells.render()] * 2) == merge([plain.render()] * 2)


def test_a_series_counted_both_ways_is_summed() -> None:
    cells, usage, _ = usage_registries()
    usage.count("acme", "m", 1, 2, 0, 0.5)
    cells.counters["cost_total"].inc((("model", "m"), ("tenant", "acme")), 0.25)
    assert 'cost_total{model="m",tenant="acme"} 0.75' in cells.render().decode()
