"""Live state of each provider deployment: breaker, in-flight count, cap, pause, latencies.

Routing reads it to skip deployments that are open, paused (a provider 429 with
``retry-after`` pauses that deployment for that long) or at their ``max_concurrent`` cap, and
to order a group of deployments (weighted round-robin or least-in-flight). The failover
executor writes it: each attempt holds a :class:`Slot` (the in-flight count and the cap
place), taken at the moment the attempt is decided so that no other request can take the
last place before the call starts, and feeds the outcome to the breaker. ``changed`` wakes
requests waiting for a deployment (a slot given back, a breaker verdict).
``/health/providers`` renders ``snapshot()``.

``health`` is what a fleet shares of it (:mod:`.shared_health`): told of each breaker
transition (never of each result), and, in shared mode, keeping ``fleet_p95_s`` (the
fleet's pooled TTFT p95, which hedging then uses) and the breakers in step with the fleet.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from typing import Any

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, RoutingConfig
from runestone_proxy.gateway.breaker import Breaker, State
from runestone_proxy.gateway.routing import Target, smooth_wrr
from runestone_proxy.gateway.shared_health import LocalHealth, SharedHealth

_SAMPLES = 512


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 3)


@attrs.define(eq=False)
class Deployment:
    name: str
    breaker: Breaker
    max_concurrent: int | None
    in_flight: int = 0
    paused_until: float = 0.0
    latencies_ms: deque[float] = attrs.Factory(lambda: deque(maxlen=_SAMPLES))
    ttft_ms: deque[float] = attrs.Factory(lambda: deque(maxlen=_SAMPLES))
    #: The fleet's TTFT p95 (shared mode, enough samples pooled), else None: local.
    fleet_p95_s: float | None = None

    def at_cap(self) -> bool:
        return self.max_concurrent is not None and self.in_flight >= self.max_concurrent

    def ready_at(self, now: float) -> float:
        """When this deployment may next take a request, ignoring its cap."""
        return max(self.breaker.ready_at(now), self.paused_until)

    def p95_ttft_s(self) -> float | None:
        if self.fleet_p95_s is not None:
            return self.fleet_p95_s
        if len(self.ttft_ms) < 20:
            return None
        value = _percentile(list(self.ttft_ms), 0.95)
        return None if value is None else value / 1000


@attrs.define(eq=False)
class Slot:
    """One attempt's place on a deployment, taken by :meth:`Deployments.take` when the
    attempt is decided; ``with slot:`` around the attempt gives it back at the end."""

    deployments: Deployments
    deployment: Deployment
    #: The breaker let this attempt through as a half-open probe.
    probe: bool = False

    def release_probe(self) -> None:
        """The attempt ended without a verdict (cancelled, or a hedge lost): free its probe
        place, and only its own."""
        if self.probe:
            self.probe = False
            self.deployment.breaker.release_probe()

    def __enter__(self) -> Slot:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.deployment.in_flight -= 1
        self.deployments.notify()


@attrs.define(eq=False)
class Deployments:
    routing: RoutingConfig
    by_name: dict[str, Deployment]
    wrr: dict[str, dict[str, float]] = attrs.Factory(dict)
    #: Set, then replaced, whenever a slot is given back or a result recorded.
    changed: trio.Event = attrs.Factory(trio.Event)
    #: Requests parked in wait_changed().
    waiting: int = 0
    #: What the fleet shares (breaker transitions, TTFT p95); local: nothing.
    health: SharedHealth = attrs.Factory(LocalHealth)

    @classmethod
    def from_config(cls, config: Config) -> Deployments:
        return cls(
            config.routing,
            {
                p.name: Deployment(p.name, Breaker(config.routing.breaker), p.max_concurrent)
                for p in config.providers
            },
        )

    def reconfigure(self, config: Config) -> None:
        """Keep live state (breakers, in-flight) for deployments that still exist."""
        self.routing = config.routing
        fresh = {}
        for provider in config.providers:
            old = self.by_name.get(provider.name)
            if old is None:
                old = Deployment(provider.name, Breaker(config.routing.breaker), None)
            old.max_concurrent = provider.max_concurrent
            old.breaker.config = config.routing.breaker
            fresh[provider.name] = old
        self.by_name = fresh

    def order_groups(self, targets: list[Target]) -> list[Target]:
        """Reorder deployments of the same model id by the group strategy, in place of
        that model's first position; distinct models keep their order."""
        if len(targets) < 2:
            return targets
        model = targets[0].model
        for target in targets:  # a plain loop: all() over a generator costs more here
            if target.model != model:
                break
        else:
            return self._order_group(model, targets)  # one group: the usual shape
        groups: dict[str, list[Target]] = {}
        for target in targets:
            groups.setdefault(target.model, []).append(target)
        if all(len(g) == 1 for g in groups.values()):
            return targets
        out: list[Target] = []
        seen: set[str] = set()
        for target in targets:
            if target.model in seen:
                continue
            seen.add(target.model)
            group = groups[target.model]
            if len(group) > 1:
                group = self._order_group(target.model, group)
            out.extend(group)
        return out

    def _order_group(self, model: str, group: list[Target]) -> list[Target]:
        if self.routing.group_strategy == "least_in_flight":
            return sorted(group, key=lambda t: self.by_name[t.provider].in_flight)
        weights = {t.provider: (t.entry.weight if t.entry else 1.0) for t in group}
        current = self.wrr.get(model)
        if current is None:
            current = self.wrr[model] = {}
        first = smooth_wrr(weights, current)
        if len(group) == 2 and group[0].provider == first and group[1].provider != first:
            return group  # already in order: the sort below would copy it unchanged
        return sorted(group, key=lambda t: t.provider != first)

    def take(self, deployment: Deployment, probe: bool = False) -> Slot:
        """Count an attempt in flight now; the caller enters the slot before its first
        checkpoint."""
        deployment.in_flight += 1
        return Slot(self, deployment, probe)

    def notify(self) -> None:
        """Wake requests waiting for a deployment; free when nobody waits (the hot path)."""
        if self.waiting:
            self.changed.set()
            self.changed = trio.Event()

    async def wait_changed(self) -> None:
        self.waiting += 1
        try:
            await self.changed.wait()
        finally:
            self.waiting -= 1

    def record(
        self, deployment: Deployment, ok: bool, latency_ms: float | None, now: float | None = None
    ) -> None:
        """Feed one outcome to the breaker (and, if ok, its latency to the window); ``now``
        saves a clock read when the caller has just taken one."""
        if now is None:
            now = trio.current_time()
        if latency_ms is not None and ok:
            deployment.latencies_ms.append(latency_ms)
        moved = deployment.breaker.on_result(now, ok)
        if moved is not None:
            emit_transition(deployment.name, moved)
            self.health.on_transition(deployment, moved)
        self.notify()

    def snapshot(self) -> dict[str, Any]:
        now = trio.current_time()
        out: dict[str, Any] = {}
        for name, d in self.by_name.items():
            lat = list(d.latencies_ms)
            out[name] = {
                "state": d.breaker.state.value,
                "in_flight": d.in_flight,
                "max_concurrent": d.max_concurrent,
                "paused_for_s": round(max(0.0, d.paused_until - now), 3),
                "error_rate": round(d.breaker.error_rate(now), 4),
                "consecutive_failures": d.breaker.consecutive_failures,
                "latency_ms": {
                    "p50": _percentile(lat, 0.5),
                    "p95": _percentile(lat, 0.95),
                    "p99": _percentile(lat, 0.99),
                    "samples": len(lat),
                },
                "ttft_ms_p95": _percentile(list(d.ttft_ms), 0.95),
                **self.health.describe(name),
            }
        return out


def emit_transition(name: str, state: State, fleet: bool = False) -> None:
    """``circuit.*`` for a transition; ``fleet``: applied from another process's verdict."""
    event = {
        State.OPEN: "circuit.open",
        State.HALF_OPEN: "circuit.half_open",
        State.CLOSED: "circuit.close",
    }[state]
    if fleet:
        telemetry.emit(event, provider=name, at=time.time(), fleet=True)
    else:
        telemetry.emit(event, provider=name, at=time.time())


def providers_view(deployments: Deployments, unavailable: Mapping[str, str]) -> dict[str, Any]:
    snap = deployments.snapshot()
    for name, why in unavailable.items():
        if name in snap:
            snap[name]["available"] = False
            snap[name]["reason"] = why
    for entry in snap.values():
        entry.setdefault("available", True)
    return snap
