"""Model resolution and routing policies, as plain data: no event loop, no sockets.

``RoutingTable.resolve`` (provider field, ``provider:model``, aliases and their chains, the
``[[models]]`` table and its groups, ``auto``), ``constraints_for`` (what a body implies),
``filter_and_order`` (cost order, ``max_cost_per_token``, the 400 that says what excluded
what), ``smooth_wrr`` and ``Deployments.order_groups``.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from runestone_proxy import config as config_mod
from runestone_proxy.config import Config, ModelConfig, ProviderConfig, RoutingConfig
from runestone_proxy.errors import InvalidParam, ModelNotFound, NoCandidate
from runestone_proxy.gateway import routing as routing_mod
from runestone_proxy.gateway import routing_policy
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.routing import (
    AUTO_MODEL,
    Constraints,
    RoutingTable,
    Target,
    constraints_for,
    filter_and_order,
    smooth_wrr,
)

URL = "http://127.0.0.1:9/v1"
ALL = ("chat", "streaming", "tools", "vision", "json_mode")
PROVIDERS = (
    ProviderConfig("openai", "openai", base_url=URL, api_key_env="OPENAI_KEY"),
    ProviderConfig("azure", "openai", base_url=URL, api_key_env="AZURE_KEY"),
    ProviderConfig("anthropic", "anthropic", base_url=URL, api_key_env="ANTHROPIC_KEY"),
    ProviderConfig("off", "mock", enabled=False),
    ProviderConfig("mock", "mock"),
)
MODELS = (
    ModelConfig("gpt-4o", "openai", capabilities=ALL, family="gpt"),
    ModelConfig("gpt-4o", "azure", upstream_id="gpt-4o-2024-08-06", capabilities=ALL),
    ModelConfig("claude", "anthropic", upstream_id="claude-sonnet-4-5"),
    ModelConfig("only-off", "off"),
    ModelConfig("gone-or-off", "anthropic"),
    ModelConfig("gone-or-off", "off"),
    ModelConfig("mock-1", "mock"),
    ModelConfig("org/llama:free", "mock"),
    ModelConfig("embed", "mock", capabilities=("embeddings",)),
)
ALIASES = {
    "fast": "openai:gpt-4o-mini",
    "best": "gpt-4o",
    "chain": "best",
    "smart": "claude",
    "pinned": "azure:gpt-4o",
}
#: ANTHROPIC_KEY is deliberately unset.
ENV = {"OPENAI_KEY": "sk-1", "AZURE_KEY": "sk-2"}


def make_table(**changes: Any) -> RoutingTable:
    fields: dict[str, Any] = {"providers": PROVIDERS, "models": MODELS, "aliases": ALIASES}
    fields.update(changes)
    return RoutingTable.build(Config(**fields), ENV)


def pairs(targets: tuple[Target, ...] | list[Target]) -> list[tuple[str, str]]:
    return [(t.provider, t.upstream_model) for t in targets]


# --- resolution -----------------------------------------------------------------------------


def test_a_model_id_served_twice_is_a_group_in_config_order() -> None:
    res = make_table().resolve("gpt-4o")
    assert res.via == "model"
    assert pairs(res.targets) == [("openai", "gpt-4o"), ("azure", "gpt-4o-2024-08-06")]
    assert {t.model for t in res.targets} == {"gpt-4o"}
    assert all(t.entry is not None for t in res.targets)


def test_provider_field_picks_that_deployment_and_its_table_entry() -> None:
    res = make_table().resolve("gpt-4o", provider="azure")
    assert res.via == "provider"
    assert pairs(res.targets) == [("azure", "gpt-4o-2024-08-06")]
    assert res.targets[0].entry is MODELS[1]


def test_provider_field_with_a_model_outside_the_table_passes_it_through() -> None:
    (target,) = make_table().resolve("gpt-4.1-nano", provider="openai").targets
    assert target == Target("openai", "gpt-4.1-nano", "gpt-4.1-nano", None)


def test_provider_prefix_syntax() -> None:
    table = make_table()
    res = table.resolve("openai:gpt-4o-mini")
    assert res.via == "prefix"
    assert pairs(res.targets) == [("openai", "gpt-4o-mini")]
    # A prefixed id that is in the table uses its entry (upstream id, prices, capabilities).
    (target,) = table.resolve("azure:gpt-4o").targets
    assert target.upstream_model == "gpt-4o-2024-08-06"
    assert target.entry is MODELS[1]


def test_a_colon_that_is_not_a_provider_prefix_is_part_of_the_model_id() -> None:
    res = make_table().resolve("org/llama:free")
    assert res.via == "model"
    assert pairs(res.targets) == [("mock", "org/llama:free")]


def test_alias_to_provider_model() -> None:
    res = make_table().resolve("fast")
    assert (res.via, res.alias, res.requested) == ("alias", "fast", "fast")
    assert pairs(res.targets) == [("openai", "gpt-4o-mini")]


def test_alias_chain_resolves_to_the_group_and_remembers_the_first_alias() -> None:
    res = make_table().resolve("chain")
    assert (res.via, res.alias) == ("alias", "chain")
    assert pairs(res.targets) == [("openai", "gpt-4o"), ("azure", "gpt-4o-2024-08-06")]
    assert pairs(make_table().resolve("pinned").targets) == [("azure", "gpt-4o-2024-08-06")]


def test_alias_to_an_unavailable_model_says_why() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_table().resolve("smart")
    assert "`smart`" in info.value.message
    assert "anthropic: ANTHROPIC_KEY is not set" in info.value.message


@pytest.mark.parametrize(
    ("model", "reasons"),
    [
        ("claude", ["anthropic: ANTHROPIC_KEY is not set"]),
        ("only-off", ["off: disabled in config"]),
        ("gone-or-off", ["anthropic: ANTHROPIC_KEY is not set", "off: disabled in config"]),
    ],
)
def test_a_configured_model_with_no_available_provider_is_404_with_reasons(
    model: str, reasons: list[str]
) -> None:
    with pytest.raises(ModelNotFound) as info:
        make_table().resolve(model)
    exc = info.value
    assert (exc.http_status, exc.code, exc.param) == (404, "model_not_found", "model")
    assert "is configured but no provider serving it is available" in exc.message
    for reason in reasons:
        assert reason in exc.message


def test_unknown_model_is_openai_404() -> None:
    with pytest.raises(ModelNotFound) as info:
        make_table().resolve("gpt-9")
    exc = info.value
    assert exc.http_status == 404
    assert exc.envelope() == {
        "error": {
            "message": "The model `gpt-9` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


@pytest.mark.parametrize(
    ("model", "provider", "message"),
    [
        ("gpt-4o", "nope", "Unknown provider `nope`."),
        ("claude", "anthropic", "Provider `anthropic` is not available: ANTHROPIC_KEY is not set."),
        ("x", "off", "Provider `off` is not available: disabled in config."),
        ("anthropic:claude", None, "Provider `anthropic` is not available"),
        ("openai:", None, "you must provide a model parameter"),
        ("", None, "you must provide a model parameter"),
    ],
)
def test_bad_provider_or_model_is_400(model: str, provider: str | None, message: str) -> None:
    with pytest.raises(InvalidParam) as info:
        make_table().resolve(model, provider)
    assert info.value.http_status == 400
    assert message in info.value.message


def test_auto_lists_every_routable_deployment() -> None:
    res = make_table().resolve(AUTO_MODEL)
    assert res.via == "auto"
    assert pairs(res.targets) == [
        ("openai", "gpt-4o"),
        ("azure", "gpt-4o-2024-08-06"),
        ("mock", "mock-1"),
        ("mock", "org/llama:free"),
        ("mock", "embed"),
    ]


def test_an_alias_named_auto_wins_over_the_router() -> None:
    res = make_table(aliases={**ALIASES, "auto": "mock-1"}).resolve("auto")
    assert res.via == "alias"
    assert pairs(res.targets) == [("mock", "mock-1")]


def test_listed_models_shows_routable_models_and_alias_targets() -> None:
    listed = make_table().listed_models()
    assert ("gpt-4o", "openai", None) in listed
    assert not any(mid in ("claude", "only-off") for mid, _, _ in listed)
    assert ("chain", "runestone", "best") in listed
    assert ("fast", "runestone", "openai:gpt-4o-mini") in listed


def test_extra_aliases_win_over_config() -> None:
    config = Config(providers=PROVIDERS, models=MODELS, aliases=ALIASES)
    table = RoutingTable.build(config, ENV, {"fast": "mock-1"})
    assert pairs(table.resolve("fast").targets) == [("mock", "mock-1")]


def test_resolutions_are_cached_per_table_and_a_reload_starts_afresh() -> None:
    config = Config(providers=PROVIDERS, models=MODELS, aliases=ALIASES)
    table = RoutingTable.build(config, ENV)
    first = table.resolve("fast")
    assert table.resolve("fast") is first  # cached
    assert table.resolve("gpt-4o", "azure") is not table.resolve("gpt-4o", "azure")  # not
    # A reload builds a new table: the new alias target is seen at once.
    reloaded = RoutingTable.build(config, ENV, {"fast": "mock-1"})
    assert pairs(reloaded.resolve("fast").targets) == [("mock", "mock-1")]
    assert pairs(table.resolve("fast").targets) == [("openai", "gpt-4o-mini")]


def test_the_resolution_cache_is_bounded_and_keeps_no_errors() -> None:
    table = make_table()
    for i in range(routing_mod._RESOLVED_MAX + 10):
        table.resolve(f"mock:model-{i}")
    assert len(table._resolved) <= routing_mod._RESOLVED_MAX
    for _ in range(2):
        with pytest.raises(ModelNotFound):
            table.resolve("nope")
    assert "nope" not in table._resolved


def test_router_policy_comes_from_the_environment() -> None:
    loaded = config_mod.load(None, {"RUNESTONE_ROUTER_POLICY": "COST"})
    assert loaded.routing.policy == "cost"


# --- constraints ----------------------------------------------------------------------------

MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, {"chat"}),
        ({"stream": True}, {"chat", "streaming"}),
        ({"stream": False}, {"chat"}),
        ({"tools": [{"type": "function"}]}, {"chat", "tools"}),
        ({"functions": [{"name": "f"}]}, {"chat", "tools"}),
        ({"tools": []}, {"chat"}),
        ({"response_format": {"type": "json_object"}}, {"chat", "json_mode"}),
        ({"response_format": {"type": "json_schema"}}, {"chat", "json_mode"}),
        ({"response_format": {"type": "text"}}, {"chat"}),
        ({"capabilities": ["vision", "tools"]}, {"chat", "vision", "tools"}),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "what is this?"},
                            {"type": "image_url", "image_url": {"url": "data:,"}},
                        ],
                    }
                ],
                "stream": True,
            },
            {"chat", "streaming", "vision"},
        ),
    ],
)
def test_capabilities_implied_by_the_body(fields: dict[str, Any], expected: set[str]) -> None:
    c = constraints_for("chat", {"messages": MESSAGES, **fields}, 256)
    assert c.capabilities == expected


def test_endpoint_capabilities_and_estimates() -> None:
    emb = constraints_for("embeddings", {"input": "x" * 400}, 256)
    assert emb.capabilities == {"embeddings"}
    assert (emb.est_input_tokens, emb.est_output_tokens) == (100, 0)
    comp = constraints_for("completions", {"prompt": "abcd", "max_tokens": 7}, 256)
    assert comp.capabilities == {"completions"}
    assert (comp.est_input_tokens, comp.est_output_tokens) == (1, 7)
    chat = constraints_for("chat", {"messages": MESSAGES, "max_completion_tokens": 9}, 256)
    assert chat.est_output_tokens == 9
    assert constraints_for("chat", {"messages": MESSAGES}, 256).est_output_tokens == 256


def test_family_and_max_cost() -> None:
    c = constraints_for(
        "chat", {"messages": MESSAGES, "model_family": "gpt", "max_cost_per_token": 1}, 1
    )
    assert c.family == "gpt"
    assert c.max_cost_per_token == 1.0
    assert isinstance(c.max_cost_per_token, float)
    zero = constraints_for("chat", {"messages": MESSAGES, "max_cost_per_token": 0}, 1)
    assert zero.max_cost_per_token == 0.0


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_cost_per_token": -0.1}, "max_cost_per_token"),
        ({"max_cost_per_token": "0.1"}, "max_cost_per_token"),
        ({"max_cost_per_token": True}, "max_cost_per_token"),
        ({"max_cost_per_token": [1]}, "max_cost_per_token"),
        ({"model_family": 3}, "model_family"),
        ({"capabilities": "tools"}, "capabilities"),
        ({"capabilities": ["tools", 1]}, "capabilities"),
    ],
)
def test_bad_routing_fields_are_400(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        constraints_for("chat", {"messages": MESSAGES, **fields}, 256)
    assert (info.value.http_status, info.value.param) == (400, param)


# --- filter and order -----------------------------------------------------------------------


def target(provider: str, model: str, **entry: Any) -> Target:
    return Target(provider, model, model, ModelConfig(model, provider, **entry))


#: Per 1k tokens: input, output. With 1000 input and 1000 output tokens, costs are the sums.
CHEAP = target("p1", "cheap", input_cost_per_1k=0.1, output_cost_per_1k=0.2)
MID = target(
    "p2", "mid", input_cost_per_1k=0.5, output_cost_per_1k=1.5, capabilities=("chat", "tools")
)
PRICEY = target(
    "p3",
    "pricey",
    input_cost_per_1k=2.0,
    output_cost_per_1k=8.0,
    capabilities=("chat", "tools", "vision"),
    family="frontier",
)
CANDIDATES = (PRICEY, MID, CHEAP)


def needs(*caps: str, **fields: Any) -> Constraints:
    return Constraints(
        frozenset({"chat", *caps}), est_input_tokens=1000, est_output_tokens=1000, **fields
    )


def test_cost_policy_picks_the_cheapest_capable_model() -> None:
    ordered, reason = filter_and_order(CANDIDATES, needs(), "cost")
    assert ordered == [CHEAP, MID, PRICEY]
    assert reason == "cheapest capable"
    ordered, _ = filter_and_order(CANDIDATES, needs("tools"), "cost")
    assert ordered == [MID, PRICEY]
    ordered, _ = filter_and_order(CANDIDATES, needs("vision"), "cost")
    assert ordered == [PRICEY]


def test_cost_estimate_weighs_input_and_output_prices() -> None:
    # Cheap to read, dear to write, and the reverse: the request's shape decides.
    reader = target("p1", "reader", input_cost_per_1k=0.1, output_cost_per_1k=10.0)
    writer = target("p2", "writer", input_cost_per_1k=5.0, output_cost_per_1k=0.5)
    long_prompt = Constraints(frozenset({"chat"}), est_input_tokens=10_000, est_output_tokens=10)
    long_answer = Constraints(frozenset({"chat"}), est_input_tokens=10, est_output_tokens=10_000)
    assert filter_and_order((writer, reader), long_prompt, "cost")[0][0] == reader
    assert filter_and_order((reader, writer), long_answer, "cost")[0][0] == writer


def test_cost_ties_keep_the_configured_order() -> None:
    a = target("p1", "a", input_cost_per_1k=1.0)
    b = target("p2", "b", input_cost_per_1k=1.0)
    assert filter_and_order((b, a), needs(), "cost")[0] == [b, a]


def test_default_policy_keeps_the_configured_order_but_still_filters() -> None:
    ordered, reason = filter_and_order(CANDIDATES, needs("tools"), "default")
    assert ordered == [PRICEY, MID]
    assert reason == "configured order"


def test_max_cost_per_token_is_honoured() -> None:
    # Price per token is the dearer of input and output: mid is 1.5/1k = 0.0015.
    ordered, _ = filter_and_order(CANDIDATES, needs(max_cost_per_token=0.0015), "cost")
    assert ordered == [CHEAP, MID]
    ordered, _ = filter_and_order(CANDIDATES, needs(max_cost_per_token=0.0014), "cost")
    assert ordered == [CHEAP]


def test_family_constraint() -> None:
    ordered, _ = filter_and_order(CANDIDATES, needs(family="frontier"), "cost")
    assert ordered == [PRICEY]


def test_no_candidate_says_which_constraint_excluded_what() -> None:
    with pytest.raises(NoCandidate) as info:
        filter_and_order(CANDIDATES, needs("tools", max_cost_per_token=0.001), "cost")
    exc = info.value
    assert (exc.http_status, exc.code, exc.param) == (400, "no_candidate", "model")
    assert exc.message.startswith("No model can serve this request: ")
    assert "p3:pricey (price 0.008/token exceeds max_cost_per_token 0.001)" in exc.message
    assert "p2:mid (price 0.0015/token exceeds max_cost_per_token 0.001)" in exc.message
    assert "p1:cheap (lacks tools)" in exc.message
    with pytest.raises(NoCandidate) as info:
        filter_and_order((MID, CHEAP), needs("vision", "json_mode"), "default")
    assert "p2:mid (lacks json_mode, vision)" in info.value.message
    with pytest.raises(NoCandidate) as info:
        filter_and_order((CHEAP,), needs(family="frontier"), "default")
    assert "p1:cheap (family 'general' is not 'frontier')" in info.value.message


@pytest.mark.parametrize("caps", [(), ("tools",), ("vision",), ("tools", "vision")])
@pytest.mark.parametrize("family", [None, "general", "frontier"])
@pytest.mark.parametrize("max_cost", [None, 0.0, 0.0015, 0.0014, 1.0, float("nan")])
def test_the_fast_filter_agrees_with_the_worded_exclusion(
    caps: tuple[str, ...], family: str | None, max_cost: float | None
) -> None:
    c = needs(*caps, family=family, max_cost_per_token=max_cost)
    for candidate in CANDIDATES:
        assert candidate.entry is not None
        assert routing_policy._fits(candidate, c) == (
            routing_policy._exclusion(candidate.entry, c) is None
        )


def test_a_target_outside_the_table_is_never_excluded() -> None:
    bare = Target("p9", "whatever", "whatever")
    ordered, _ = filter_and_order((bare,), needs("vision", max_cost_per_token=0.0), "cost")
    assert ordered == [bare]


# --- smooth weighted round-robin and group order ---------------------------------------------


def test_smooth_wrr_proportions_and_spread() -> None:
    current: dict[str, float] = {}
    picks = [smooth_wrr({"a": 3, "b": 1}, current) for _ in range(400)]
    assert Counter(picks) == {"a": 300, "b": 100}
    # Evenly spread: every run of four picks holds exactly one b, never two b's in a row.
    for start in range(0, 400, 4):
        assert picks[start : start + 4].count("b") == 1
    assert "bb" not in "".join(picks)


def test_smooth_wrr_is_nginx_sequence() -> None:
    current: dict[str, float] = {}
    picks = [smooth_wrr({"a": 5, "b": 1, "c": 1}, current) for _ in range(7)]
    assert "".join(picks) == "aabacaa"  # nginx's documented example


def group_config(strategy: str, **weights: float) -> Config:
    providers = tuple(ProviderConfig(name, "mock") for name in weights)
    models = tuple(ModelConfig("m", name, weight=w) for name, w in weights.items())
    return Config(
        providers=providers,
        models=(*models, ModelConfig("solo", next(iter(weights)))),
        routing=RoutingConfig(group_strategy=strategy),  # type: ignore[arg-type]
    )


def test_order_groups_round_robin_by_weight() -> None:
    config = group_config("round_robin", a=3.0, b=1.0)
    deployments = Deployments.from_config(config)
    table = RoutingTable.build(config, {})
    group = list(table.resolve("m").targets)
    firsts = [deployments.order_groups(group)[0].provider for _ in range(8)]
    assert Counter(firsts) == {"a": 6, "b": 2}
    # Every ordering still holds every deployment once.
    assert sorted(t.provider for t in deployments.order_groups(group)) == ["a", "b"]


def test_order_groups_least_in_flight_and_distinct_models_keep_their_place() -> None:
    config = group_config("least_in_flight", a=1.0, b=1.0, c=1.0)
    deployments = Deployments.from_config(config)
    table = RoutingTable.build(config, {})
    solo = table.resolve("solo").targets[0]
    group = list(table.resolve("m").targets)
    deployments.by_name["a"].in_flight = 2
    deployments.by_name["b"].in_flight = 1
    ordered = deployments.order_groups([solo, *group])
    assert [(t.model, t.provider) for t in ordered] == [
        ("solo", "a"),
        ("m", "c"),
        ("m", "b"),
        ("m", "a"),
    ]
