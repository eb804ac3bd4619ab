"""The aliases file: where ``RUNESTONE_ALIASES_PATH`` points, reading it, and watching it.

The file is a flat TOML table ``name = "provider:model"`` (an ``[aliases]`` header is
allowed); its entries win over config.toml's ``[aliases]``. It is re-read on SIGHUP and
whenever its modification time changes: :func:`watch` polls it, as a task of the nursery tree
(``server/app.py``). A new table is validated before the swap (the rule is config's,
:mod:`runestone_proxy.config.aliases`, re-exported here for the reader); an invalid one is
refused with a logged reason and the old table stays. Requests in flight keep the resolution
they started with, because the routing table is swapped whole.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path

import trio

from runestone_proxy.config.aliases import MAX_CHAIN, AliasError, validate

__all__ = [
    "MAX_CHAIN",
    "POLL_INTERVAL_S",
    "AliasError",
    "load_file",
    "path_from_env",
    "validate",
    "watch",
]

POLL_INTERVAL_S = 2.0


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
