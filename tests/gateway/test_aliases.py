"""Aliases: validation (targets, chains, cycles), the aliases file, and its mtime watcher."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from runestone_proxy import config as config_mod
from runestone_proxy.config import ConfigError
from runestone_proxy.gateway import aliases
from runestone_proxy.gateway.aliases import AliasError, load_file, validate
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


# --- the aliases file ------------------------------------------------------------------------


def test_load_file_flat_or_under_a_header(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('fast = "openai:gpt-4o-mini"\n"my-smart" = "claude-sonnet"\n')
    assert load_file(flat) == {"fast": "openai:gpt-4o-mini", "my-smart": "claude-sonnet"}
    headed = tmp_path / "headed.toml"
    headed.write_text('[aliases]\nfast = "mock-1"\n')
    assert load_file(headed) == {"fast": "mock-1"}


def test_load_file_errors(tmp_path: Path) -> None:
    with pytest.raises(AliasError, match="cannot read"):
        load_file(tmp_path / "missing.toml")
    broken = tmp_path / "broken.toml"
    broken.write_text('fast = "mock-1\n')
    with pytest.raises(AliasError, match="not valid TOML"):
        load_file(broken)
    nested = tmp_path / "nested.toml"
    nested.write_text('[aliases]\nfast = "mock-1"\n[other]\nx = "y"\n')
    with pytest.raises(AliasError, match="alias 'aliases': target must be a non-empty string"):
        check(load_file(nested))


def test_path_from_env() -> None:
    assert aliases.path_from_env({}) is None
    assert aliases.path_from_env({"RUNESTONE_ALIASES_PATH": ""}) is None
    assert aliases.path_from_env({"RUNESTONE_ALIASES_PATH": "/etc/a.toml"}) == Path("/etc/a.toml")


async def test_watch_reloads_when_the_mtime_changes(
    autojump_clock: trio.testing.MockClock, tmp_path: Path
) -> None:
    path = tmp_path / "aliases.toml"
    path.write_text('fast = "mock-1"\n')
    reloads: list[float] = []
    changed = trio.Event()

    def reload() -> None:
        nonlocal changed
        reloads.append(trio.current_time())
        changed.set()
        changed = trio.Event()

    def touch(seconds_later: int) -> None:
        mtime = path.stat().st_mtime_ns + seconds_later * 1_000_000_000
        os.utime(path, ns=(mtime, mtime))

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(aliases.watch, path, reload, interval_s=2.0))
            await trio.sleep(9.0)
            assert reloads == []  # nothing changed, nothing reloaded
            touch(5)
            await changed.wait()
            assert reloads == [10.0]  # seen at the next poll
            path.unlink()  # a vanished file is a change too (the reload refuses it)
            await changed.wait()
            assert reloads == [10.0, 12.0]
            await trio.sleep(10.0)
            assert len(reloads) == 2
            nursery.cancel_scope.cancel()
