"""Model-name patterns: the matcher, alias-pattern keys and ``[[providers]] model_patterns``
validated at load (the error names the key)."""

from __future__ import annotations

import fnmatch

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from runestone_proxy import config as config_mod
from runestone_proxy.config import ConfigError
from runestone_proxy.config.aliases import AliasError, is_pattern, matches, validate

PROVIDERS = ("openai", "local", "mock")
MODELS = ("gpt-4o", "qwen3-coder", "mock-1")


@pytest.mark.parametrize(
    ("pattern", "name", "expected"),
    [
        ("claude-*", "claude-sonnet-4-5-20250929", True),
        ("claude-*", "claude-", True),
        ("claude-*", "Claude-sonnet", False),  # case-sensitive
        ("claude-*", "xclaude-sonnet", False),  # the whole name
        ("claude-*haiku*", "claude-haiku-4-5-20251001", True),
        ("claude-*haiku*", "claude-3-5-haiku-latest", True),
        ("claude-*haiku*", "claude-sonnet-4-5", False),
        ("gpt-?o", "gpt-4o", True),
        ("gpt-?o", "gpt-o", False),
        ("gpt-[4]o", "gpt-[4]o", True),  # no character classes: '[' is literal
        ("gpt-[4]o", "gpt-4o", False),
        ("*", "", True),
        ("", "", True),
        ("", "x", False),
        ("a*b*c", "a" * 2000 + "b", False),  # no exponential backtracking
    ],
)
def test_matches(pattern: str, name: str, expected: bool) -> None:
    assert matches(pattern, name) is expected


_ALPHABET = st.sampled_from("ab-.*?")


@settings(derandomize=True, max_examples=400)
@given(st.text(_ALPHABET, max_size=8), st.text(st.sampled_from("ab-.*?"), max_size=10))
@example("a*?b", "a-xb")
def test_matches_agrees_with_fnmatchcase_without_classes(pattern: str, name: str) -> None:
    assert matches(pattern, name) is fnmatch.fnmatchcase(name, pattern)


def test_is_pattern() -> None:
    assert is_pattern("claude-*")
    assert is_pattern("gpt-?o")
    assert not is_pattern("gpt-4o")
    assert not is_pattern("org/llama:free")


def test_alias_patterns_validate_like_aliases_and_keep_their_order() -> None:
    table = {"claude-*haiku*": "local:qwen3-coder", "fast": "gpt-4o", "claude-*": "fast"}
    assert list(validate(table, PROVIDERS, MODELS)) == list(table)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"claude-*": "claude-x"}, "alias pattern 'claude-*': 'claude-x' is neither"),
        ({"claude-*": ""}, "alias pattern 'claude-*': target must be a non-empty string"),
        ({"claude-*": "local:"}, "alias pattern 'claude-*': 'local:' names no model"),
        # A pattern names no one thing, so no alias may point at one.
        ({"a*": "gpt-4o", "b": "a*"}, "alias 'b': 'a*' is neither"),
        ({"": "gpt-4o"}, "alias names must be non-empty strings"),
    ],
)
def test_bad_alias_patterns_are_refused(table: dict[str, object], message: str) -> None:
    with pytest.raises(AliasError) as info:
        validate(table, PROVIDERS, MODELS)
    assert message in str(info.value)


def test_alias_patterns_are_validated_at_load() -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.structure({"aliases": {"claude-*haiku*": "nope"}}, "config.toml")
    assert any(
        "$.aliases" in m and "alias pattern 'claude-*haiku*'" in m for m in info.value.messages
    )


def _provider(**fields: object) -> dict[str, object]:
    return {"name": "anthropic", "kind": "anthropic", "base_url": "http://127.0.0.1:9", **fields}


def test_model_patterns_load() -> None:
    raw = {"providers": [{"name": "mock", "kind": "mock"}, _provider(model_patterns=["claude-*"])]}
    config = config_mod.structure(raw, "config.toml")
    assert config.providers[1].model_patterns == ("claude-*",)
    assert config.providers[0].model_patterns == ()


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (
            [""],
            "invalid value (entry 0 must be a non-empty pattern) @ $.providers[0].model_patterns",
        ),
        (["claude-*", " "], "entry 1 must be a non-empty pattern) @ $.providers[0].model_patterns"),
        ([3], "$.providers[0].model_patterns[0]"),
        ("claude-*", "$.providers[0].model_patterns"),
    ],
)
def test_bad_model_patterns_name_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_mod.structure({"providers": [_provider(model_patterns=value)]}, "config.toml")
    assert any(message in m for m in info.value.messages), info.value.messages
