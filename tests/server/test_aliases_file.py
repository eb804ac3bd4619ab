"""The aliases file (``RUNESTONE_ALIASES_PATH``): reading it, and its mtime watcher."""

from __future__ import annotations

import os
from functools import partial
from pathlib import Path

import pytest
import trio
import trio.testing

from runestone_proxy.server import aliases
from runestone_proxy.server.aliases import AliasError, load_file, validate

PROVIDERS = ("openai", "anthropic", "mock")
MODELS = ("gpt-4o", "claude-sonnet", "mock-1", "org/llama:free")


def check(table: dict[str, object]) -> dict[str, str]:
    return validate(table, PROVIDERS, MODELS)


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
