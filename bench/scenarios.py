"""The scenario registry: what to measure, against which target, at which concurrencies.

A :class:`Scenario` names a target (:mod:`bench.targets`), a protocol, the one request it
repeats and the concurrency levels to sweep. ``baseline`` names the scenario whose req/s
at the same concurrency is the denominator of this one's ratio column. ``groups`` let
``--scenarios health`` pick several scenarios at once; a selected scenario's baseline is
always measured too, in the same run.

To add one, call :func:`register` at import time (here, or in a module imported below)::

    register(Scenario(
        name="chat_h1",
        description="POST /v1/chat/completions (non-stream) through the gateway",
        target="gateway_upstream",
        protocol="h1",
        request=Request("POST", "/v1/chat/completions", JSON, CHAT_BODY),
        groups=("chat",),
    ))
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from bench.load import Protocol, Request
from bench.targets import TARGETS

DEFAULT_CONCURRENCY = (1, 16, 64)


@attrs.frozen
class Scenario:
    name: str
    description: str
    target: str
    protocol: Protocol
    request: Request
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    groups: tuple[str, ...] = ()
    baseline: str | None = None


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is already registered")
    if scenario.target not in TARGETS:
        raise ValueError(f"scenario {scenario.name!r}: unknown target {scenario.target!r}")
    if scenario.baseline is not None and scenario.baseline not in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r}: register {scenario.baseline!r} first")
    SCENARIOS[scenario.name] = scenario
    return scenario


def select(names: Iterable[str]) -> list[Scenario]:
    """Scenarios named, or in a group named, plus their baselines; in registry order.
    No names: every scenario."""
    wanted = set(names)
    if not wanted:
        return list(SCENARIOS.values())
    known = set(SCENARIOS) | {g for s in SCENARIOS.values() for g in s.groups}
    if unknown := wanted - known:
        raise KeyError(f"unknown scenario or group: {', '.join(sorted(unknown))}")
    chosen = {s.name for s in SCENARIOS.values() if s.name in wanted or wanted & set(s.groups)}
    chosen |= {b for name in chosen if (b := SCENARIOS[name].baseline) is not None}
    return [s for s in SCENARIOS.values() if s.name in chosen]


# --- built-in scenarios -------------------------------------------------------------------

HEALTH = Request("GET", "/health/live")

register(
    Scenario(
        name="baseline_h1",
        description="GET /health/live on the bare trio+h11 server: the listener's ceiling",
        target="baseline",
        protocol="h1",
        request=HEALTH,
        groups=("health", "baseline"),
    )
)
register(
    Scenario(
        name="health_h1",
        description="GET /health/live through the gateway over HTTP/1.1 keep-alive",
        target="gateway",
        protocol="h1",
        request=HEALTH,
        groups=("health",),
        baseline="baseline_h1",
    )
)
register(
    Scenario(
        name="health_h2",
        description="GET /health/live through the gateway over h2c (prior knowledge)",
        target="gateway",
        protocol="h2",
        request=HEALTH,
        groups=("health",),
        baseline="baseline_h1",
    )
)
