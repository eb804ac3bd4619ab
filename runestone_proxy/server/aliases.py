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

import attrs
import structlog
import trio

from runestone_proxy.config import Config, ConfigError
from runestone_proxy.config.aliases import MAX_CHAIN, AliasError, validate
from runestone_proxy.gateway.service_state import ServiceState

log = structlog.get_logger("runestone.aliases")

__all__ = [
    "MAX_CHAIN",
    "POLL_INTERVAL_S",
    "AliasError",
    "ServiceAliases",
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


def read_table(path: Path, config: Config) -> dict[str, str]:
    """The file's aliases, validated together with ``config``'s (AliasError if they do not
    fit); only the file's own entries are returned."""
    raw = load_file(path)
    merged = {**config.aliases, **raw}
    table = validate(merged, [p.name for p in config.providers], [m.id for m in config.models])
    return {name: table[name] for name in raw}


@attrs.define(eq=False)
class ServiceAliases:
    """The aliases file as the request service sees it: read at start, on a change of the
    file (:func:`watch` calls :meth:`reload_aliases`) and on a config reload (:meth:`reload`,
    a reload hook). The service is handed tables, never a path."""

    service: ServiceState
    path: Path | None

    @staticmethod
    def at_start(config: Config, env: Mapping[str, str]) -> tuple[Path | None, dict[str, str]]:
        """The file's path and table at start; ConfigError for a bad file."""
        path = path_from_env(env)
        if path is None:
            return None, {}
        try:
            return path, read_table(path, config)
        except AliasError as exc:
            raise ConfigError(str(path), [str(exc)]) from None

    def _read(self, config: Config) -> dict[str, str] | None:
        if self.path is None:
            return None
        try:
            return read_table(self.path, config)
        except AliasError as exc:
            log.error("aliases.reload.failed", path=str(self.path), error=str(exc))
            return None

    def reload_aliases(self) -> bool:
        """Re-read the file; install it only if valid. Returns whether it was."""
        table = self._read(self.service.config)
        if table is None:
            return False
        self.service.use_aliases(table)
        log.info("aliases.reloaded", path=str(self.path), count=len(table))
        return True

    def reload(self, config: Config) -> None:
        """Swap a validated config into the service, with the file re-read against it."""
        table = self._read(config)
        if table is not None:
            log.info("aliases.reloaded", path=str(self.path), count=len(table))
        dropped = self.service.reload(config, table)
        if dropped is not None:
            log.error("aliases.dropped", error=dropped)
