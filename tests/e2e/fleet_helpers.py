"""The config a fleet test writes: gateways sharing state on Redis in front of the tenancy
fake (:mod:`tenancy_fakes`). Each test names only what it adds: the ``[state]`` fields
beyond backend and URL, its models' fields, and its keys', tenants' and overflow tables.

Also any child gateway's config (:func:`gateway_config`; :func:`mock_models` for tests that
queue jobs behind a held slot) and a fleet of child gateways, each in its own directory
(:func:`start_fleet`)."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
from helpers import GatewayProcess, gateway_process
from tenancy_fakes import HOST

#: JSON log lines (the tests read the events), no access log.
JSON_LOGS: Mapping[str, object] = {"level": "info", "format": "json", "access_log": False}
#: The tenancy fake's two models: one answers at once, one holds until released.
MODELS: Mapping[str, Mapping[str, object]] = {"t-fast": {}, "t-hold": {}}


def table(header: str, fields: Mapping[str, object]) -> str:
    """One TOML table: ``header`` then ``key = value`` lines (values as JSON, which TOML
    reads alike for the strings, numbers and booleans used here)."""
    return "\n".join([header, *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]) + "\n"


def redis_fleet_config(
    upstream: str,
    redis_url: str,
    *,
    state: Mapping[str, object],
    tables: Sequence[tuple[str, Mapping[str, object]]],
    models: Mapping[str, Mapping[str, object]] = MODELS,
    logging: Mapping[str, object] = JSON_LOGS,
) -> str:
    """A gateway on Redis (``[state]``: ``state`` beside backend and URL) routing ``models``
    to the tenancy fake at ``upstream``, with ``tables`` after (keys, tenants, overflow)."""
    head = [
        table("[server]", {"host": HOST, "port": 0, "shutdown_grace_s": 0.5}),
        table("[logging]", logging),
        table("[routing]", {"max_attempts": 1}),
        table("[state]", {"backend": "redis", "url": redis_url, **state}),
        table(
            "[[providers]]",
            {
                "name": "tenancy",
                "kind": "openai",
                "base_url": upstream,
                "api_key_env": "TENANCY_UPSTREAM_KEY",
            },
        ),
    ]
    head += [table("[[models]]", {"id": m, "provider": "tenancy", **f}) for m, f in models.items()]
    return "\n".join([*head, *(table(header, fields) for header, fields in tables)])


# --- a child gateway's config, and a fleet of them on one PostgreSQL -------------------------


def gateway_config(
    server: Mapping[str, object],
    tables: Sequence[tuple[str, Mapping[str, object]]],
    *,
    logging: Mapping[str, object] = JSON_LOGS,
) -> str:
    """A ``python -m runestone_proxy`` config: ``[server]`` on 127.0.0.1, port 0, with
    ``server``'s fields; JSON logs; then ``tables`` in order."""
    head = [table("[server]", {"host": HOST, "port": 0, **server}), table("[logging]", logging)]
    return "\n".join([*head, *(table(header, fields) for header, fields in tables)])


def mock_models(latency_ms: float) -> list[tuple[str, Mapping[str, object]]]:
    """Two mock providers: model ``mock-1`` answers after ``latency_ms``, ``hold-1`` after
    1.5 s (a live request on it holds a tenant's slot while jobs queue behind it)."""
    return [
        ("[[providers]]", {"name": "mock", "kind": "mock", "latency_ms": latency_ms}),
        ("[[providers]]", {"name": "slow", "kind": "mock", "latency_ms": 1500.0}),
        ("[[models]]", {"id": "mock-1", "provider": "mock"}),
        ("[[models]]", {"id": "hold-1", "provider": "slow"}),
    ]


async def start_fleet(
    stack: AsyncExitStack,
    home: Path,
    names: Sequence[str],
    config: str,
    env: Callable[[str], Mapping[str, str]],
    *,
    timeout_s: float = 10,
) -> tuple[dict[str, GatewayProcess], dict[str, httpx.AsyncClient]]:
    """One gateway process per name, each with its own directory under ``home`` (its
    ``config.toml`` and ``RUNESTONE_STATE_DIR``) and ``env(name)``, and an httpx client to
    each; ``stack`` closes the clients and stops the processes the test left running."""
    processes: dict[str, GatewayProcess] = {}
    for name in names:
        directory = home / name
        directory.mkdir()
        path = directory / "config.toml"
        path.write_text(config)
        child_env = {"RUNESTONE_STATE_DIR": str(directory), **env(name)}
        processes[name] = await stack.enter_async_context(gateway_process(path, child_env))
    clients = {
        name: await stack.enter_async_context(
            httpx.AsyncClient(base_url=f"http://{HOST}:{p.port}", timeout=timeout_s)
        )
        for name, p in processes.items()
    }
    return processes, clients
