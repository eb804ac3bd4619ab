"""The config a fleet test writes: gateways sharing state on Redis in front of the tenancy
fake (:mod:`tenancy_fakes`). Each test names only what it adds: the ``[state]`` fields
beyond backend and URL, its models' fields, and its keys', tenants' and overflow tables."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

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
