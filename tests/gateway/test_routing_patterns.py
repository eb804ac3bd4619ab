"""Model-name patterns in routing, as plain data: alias patterns and providers'
``model_patterns``, in the resolution order ``gateway/routing.py`` states.

Order: ``provider`` field, ``provider:model``, exact alias, exact ``[[models]]`` id, alias
patterns (first match; the aliases file's before config.toml's), provider patterns (first
available claimant, config order), else 404. Exact names always beat patterns.
"""

from __future__ import annotations

from typing import Any

import pytest

from runestone_proxy.config import Config, ModelConfig, ProviderConfig
from runestone_proxy.errors import ModelNotFound
from runestone_proxy.gateway.routing import RoutingTable, Target

URL = "http://127.0.0.1:9/v1"
PROVIDERS = (
    ProviderConfig("local", "openai", base_url=URL),
    ProviderConfig(
        "anthropic",
        "anthropic",
        base_url=URL,
        api_key_env="ANTHROPIC_API_KEY",
        model_patterns=("claude-*",),
    ),
    ProviderConfig("backup", "openai", base_url=URL, model_patterns=("claude-*", "gpt-?o")),
    ProviderConfig("mock", "mock"),
)
MODELS = (
    ModelConfig("claude-pinned", "mock"),
    ModelConfig("qwen3-coder", "local"),
    ModelConfig("claude-off", "anthropic"),
)
ALIASES = {
    "claude-*haiku*": "local:qwen3-coder",
    "claude-haiku-exact": "mock:exact",
    "claude-*": "qwen3-coder",  # shadowed by the haiku pattern above for haikus only
}
ENV = {"ANTHROPIC_API_KEY": "sk-ant"}


def make_table(env: dict[str, str] | None = None, **changes: Any) -> RoutingTable:
    fields: dict[str, Any] = {"providers": PROVIDERS, "models": MODELS, "aliases": {}}
    fields.update(changes)
    return RoutingTable.build(Config(**fields), ENV if env is None else env)


def only(table: RoutingTable, model: str, provider: str | None = None) -> tuple[str, Target]:
    res = table.resolve(model, provider)
    (target,) = res.targets
    return res.via, target


def test_a_provider_pattern_claims_a_dated_id_and_passes_it_as_given() -> None:
    via, target = only(make_table(), "claude-sonnet-4-5-20250929")
    assert via == "pattern"
    assert target == Target("anthropic", "claude-sonnet-4-5-20250929", "claude-sonnet-4-5-20250929")
    assert target.entry is None
    assert target.capabilities is None


def test_the_first_available_claimant_in_config_order_wins() -> None:
    assert only(make_table(), "claude-opus-4-1-20250805")[1].provider == "anthropic"
    # anthropic's key unset: the next provider claiming the name serves it.
    assert only(make_table(env={}), "claude-opus-4-1-20250805")[1].provider == "backup"
    # '?' is one character.
    assert only(make_table(), "gpt-4o")[1].provider == "backup"
    with pytest.raises(ModelNotFound):
        make_table().resolve("gpt-40o")


def test_patterns_are_case_sensitive_and_whole_name() -> None:
    for model in ("Claude-sonnet-4-5", "xclaude-sonnet", "gpt-4o-mini"):
        with pytest.raises(ModelNotFound, match="does not exist"):
            make_table().resolve(model)


def test_no_available_claimant_is_404_saying_why() -> None:
    providers = (PROVIDERS[1], ProviderConfig("off", "mock", enabled=False, model_patterns=("c*",)))
    with pytest.raises(ModelNotFound) as info:
        make_table(env={}, providers=providers, models=()).resolve("claude-haiku-4-5")
    exc = info.value
    assert (exc.http_status, exc.code, exc.param) == (404, "model_not_found", "model")
    assert "`claude-haiku-4-5` matches the model_patterns of a provider" in exc.message
    assert "anthropic: ANTHROPIC_API_KEY is not set" in exc.message
    assert "off: disabled in config" in exc.message


def test_an_exact_model_beats_every_pattern() -> None:
    table = make_table(aliases=ALIASES)
    assert only(table, "claude-pinned") == (
        "model",
        Target("mock", "claude-pinned", "claude-pinned", MODELS[0]),
    )
    # ... even when its only provider is unavailable: the exact entry's 404, not a pattern.
    with pytest.raises(ModelNotFound, match="is configured but no provider serving it"):
        make_table(env={}).resolve("claude-off")


def test_an_exact_alias_beats_alias_patterns() -> None:
    res = make_table(aliases=ALIASES).resolve("claude-haiku-exact")
    assert (res.via, res.alias) == ("alias", "claude-haiku-exact")
    assert res.targets[0] == Target("mock", "exact", "exact")


def test_an_alias_pattern_beats_provider_patterns_first_match_in_file_order() -> None:
    table = make_table(aliases=ALIASES)
    res = table.resolve("claude-haiku-4-5-20251001")
    assert (res.via, res.alias, res.requested) == (
        "alias",
        "claude-*haiku*",
        "claude-haiku-4-5-20251001",
    )
    assert [(t.provider, t.upstream_model) for t in res.targets] == [("local", "qwen3-coder")]
    # A later, broader pattern catches what the first leaves.
    res = table.resolve("claude-sonnet-4-5-20250929")
    assert (res.via, res.alias) == ("alias", "claude-*")
    assert res.targets[0].entry is MODELS[1]
    # The order is the file's: the broad pattern first takes every claude.
    swapped = make_table(aliases={"claude-*": "qwen3-coder", "claude-*haiku*": "mock:x"})
    assert swapped.resolve("claude-haiku-4-5").alias == "claude-*"


def test_prefix_and_provider_field_beat_patterns() -> None:
    table = make_table(aliases=ALIASES)
    assert only(table, "backup:claude-haiku-4-5") == (
        "prefix",
        Target("backup", "claude-haiku-4-5", "claude-haiku-4-5"),
    )
    assert only(table, "claude-haiku-4-5", provider="mock")[0] == "provider"
    assert only(table, "claude-haiku-4-5", provider="mock")[1].provider == "mock"


def test_the_aliases_file_wins_and_its_patterns_come_first() -> None:
    config = Config(providers=PROVIDERS, models=MODELS, aliases=ALIASES)
    table = RoutingTable.build(config, ENV, {"claude-*": "mock:from-file"})
    res = table.resolve("claude-haiku-4-5")
    assert (res.alias, res.targets[0].provider) == ("claude-*", "mock")
    assert res.targets[0].upstream_model == "from-file"


def test_an_alias_target_is_not_matched_against_patterns() -> None:
    # Validation refuses such a target; the resolver never follows one either.
    table = RoutingTable(
        available=frozenset({"anthropic"}),
        unavailable={},
        models={},
        aliases={"sonnet": "claude-sonnet-4-5"},
        providers=frozenset({"anthropic"}),
        provider_patterns=(("anthropic", ("claude-*",)),),
    )
    with pytest.raises(ModelNotFound):
        table.resolve("sonnet")
    assert table.resolve("claude-sonnet-4-5").via == "pattern"


def test_resolutions_by_pattern_are_cached_per_name() -> None:
    table = make_table(aliases=ALIASES)
    first = table.resolve("claude-haiku-4-5-20251001")
    assert table.resolve("claude-haiku-4-5-20251001") is first
    assert table.resolve("claude-opus-4-1") is table.resolve("claude-opus-4-1")


def test_patterns_are_not_listed() -> None:
    listed = make_table(aliases=ALIASES).listed_models()
    ids = [mid for mid, _, _ in listed]
    assert "claude-haiku-exact" in ids
    assert not any("*" in mid or "?" in mid for mid in ids)
