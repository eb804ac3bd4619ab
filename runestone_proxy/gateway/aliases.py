"""Aliases (``fast``, ``smart``, ``cheap`` ...): validation, the optional aliases file, and its
hot reload.

Aliases live in ``[aliases]`` of config.toml and, optionally, in a separate TOML file named by
``RUNESTONE_ALIASES_PATH`` (a flat table ``name = "provider:model"``; its entries win over the
config's). The file is re-read on SIGHUP and whenever its modification time changes (the
watcher polls it from the nursery tree). A new table is validated before the swap; an
invalid one is refused with a logged reason and the old table stays. Requests in flight keep
the resolution they started with, because the routing table is swapped whole.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import structlog
import trio

log = structlog.get_logger("runestone.aliases")

POLL_INTERVAL_S = 2.0
#: The longest chain of aliases resolution follows (``fast -> smart -> ...``); validation
#: refuses longer ones, so that every table it accepts resolves to the end.
MAX_CHAIN = 8


class AliasError(ValueError):
    """An alias table that must not be installed; the message names the alias."""


def validate(
    aliases: Mapping[str, object], providers: Iterable[str], model_ids: Iterable[str]
) -> dict[str, str]:
    """Check every alias points at ``provider:model``, a model id, or another alias, with no
    cycles and no chain longer than :data:`MAX_CHAIN`. Returns the table as
    ``dict[str, str]`` or raises :class:`AliasError`."""
    known_providers = set(providers)
    known_models = set(model_ids)
    table: dict[str, str] = {}
    for name, target in aliases.items():
        if not isinstance(target, str) or not target:
            raise AliasError(f"alias {name!r}: target must be a non-empty string")
        table[name] = target
    for name, target in table.items():
        prefix, sep, rest = target.partition(":")
        if sep and prefix in known_providers:
            if not rest:
                raise AliasError(f"alias {name!r}: {target!r} names no model")
            continue
        if target in known_models or target in table:
            continue
        raise AliasError(
            f"alias {name!r}: {target!r} is neither provider:model, a configured model, "
            "nor another alias"
        )
    for name in table:
        seen = [name]
        current = table[name]
        while current in table:
            if current in seen:
                raise AliasError(f"alias cycle: {' -> '.join([*seen, current])}")
            seen.append(current)
            current = table[current]
        if len(seen) > MAX_CHAIN:
            raise AliasError(
                f"alias chain too long ({len(seen)} > {MAX_CHAIN}): {' -> '.join(seen)}"
            )
    return table


def load_file(path: Path) -> dict[str, object]:
    """Read an aliases file: a flat TOML table (an optional ``[aliases]`` header is allowed)."""
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise AliasError(f"{path}: cannot read: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise AliasError(f"{path}: not valid TOML: {exc}") from None
    inner = data.get("aliases")
    if isinstance(inner, dict) and len(data) == 1:
        data = inner
    return dict(data)


def path_from_env(env: Mapping[str, str]) -> Path | None:
    value = env.get("RUNESTONE_ALIASES_PATH")
    return Path(value) if value else None


def _mtime(path: Path) -> float | None:
    try:
        return os.stat(path).st_mtime_ns / 1e9
    except OSError:
        return None


async def watch(
    path: Path,
    reload: Callable[[], None],
    *,
    interval_s: float = POLL_INTERVAL_S,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Call ``reload`` whenever ``path``'s modification time changes. Runs until cancelled."""
    last = _mtime(path)
    task_status.started()
    while True:
        await trio.sleep(interval_s)  # a poll interval: file changes have no event to await
        current = _mtime(path)
        if current != last:
            last = current
            reload()
