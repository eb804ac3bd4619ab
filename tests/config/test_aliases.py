"""Aliases: validation (targets, chains, cycles), at config load and for routing."""

from __future__ import annotations

import pytest

from runestone_proxy import config as config_mod
from runestone_proxy.config import ConfigError, aliases
from runestone_proxy.config.aliases import AliasError, validate
from runestone_proxy.gateway.routing import RoutingTable

PROVIDERS = ("openai", "anthropic", "mock")
MODELS = ("gpt-4o", "claude-sonnet", "mock-1", "org/llama:free")


def check(table: dict[str, object]) -> dict[str, str]:
    return validate(table, PROVIDERS, MODELS)


def test_valid_targets_and_chains() -> None:
    table = {
        "fast": "openai:gpt-4o-mini",  # provider:model, any model the provider serves
        "smart": "claude-sonnet",  # a configured model
        "best": "smart",  # another alias
        "top": "best",  # ... and a chain of them
        "free": "org/llama:free",  # a colon that is not a provider prefix
    }
    assert check(dict(table)) == table


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"x": 3}, "alias 'x': target must be a non-empty string"),
        ({"x": ""}, "alias 'x': target must be a non-empty string"),
        ({"x": "openai:"}, "alias 'x': 'openai:' names no model"),
        ({"x": "gpt-5"}, "alias 'x': 'gpt-5' is neither provider:model, a configured model"),
        ({"x": "nope:gpt-4o"}, "'nope:gpt-4o' is neither provider:model"),
        ({"x": "y", "y": "ghost"}, "alias 'y': 'ghost' is neither"),
    ],
)
def test_bad_targets_are_refused_with_the_alias_named(
    table: dict[str, object], message: str
) -> None:
    with pytest.raises(AliasError) as info:
        check(table)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("table", "cycle"),
    [
        ({"a": "a"}, "a -> a"),
        ({"a": "b", "b": "a"}, "a -> b -> a"),
        ({"a": "b", "b": "c", "c": "a", "d": "gpt-4o"}, "a -> b -> c -> a"),
        ({"top": "a", "a": "b", "b": "a"}, "top -> a -> b -> a"),
    ],
)
def test_cycles_are_refused(table: dict[str, object], cycle: str) -> None:
    with pytest.raises(AliasError) as info:
        check(table)
    assert str(info.value) == f"alias cycle: {cycle}"


def chain_of(length: int) -> dict[str, object]:
    chain: dict[str, object] = {f"a{i}": f"a{i + 1}" for i in range(length - 1)}
    chain[f"a{length - 1}"] = "mock-1"
    return chain


@pytest.mark.parametrize("length", [1, 2, aliases.MAX_CHAIN])
def test_every_chain_validation_accepts_resolves_to_the_end(length: int) -> None:
    table = check(chain_of(length))
    routing = RoutingTable.build(config_mod.Config(aliases=table), {})
    res = routing.resolve("a0")
    assert [(t.provider, t.upstream_model) for t in res.targets] == [("mock", "mock-1")]


def test_a_chain_longer_than_resolution_follows_is_refused() -> None:
    with pytest.raises(AliasError, match=r"alias chain too long \(9 > 8\): a0 -> a1 -> "):
        check(chain_of(aliases.MAX_CHAIN + 1))


def test_config_aliases_are_validated_at_load() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.structure({"aliases": {"fast": "gpt-9"}}, "config.toml")
    assert any("$.aliases" in m and "'gpt-9'" in m for m in info.value.messages)
