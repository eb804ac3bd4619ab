"""Health endpoints: ``/health``, ``/health/live``, ``/health/ready``.

They need no API key and are served on the main port and, when ``health_port`` is set, on
the health listener too. Liveness answers as long as the event loop runs; readiness is 503
while starting and while draining, so a load balancer stops sending before we stop serving.
``/health`` lists the components later subsystems register on the gateway (upstream pool,
SQLite store, drainer), each reporting its own status.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from runestone_proxy import __version__
from runestone_proxy.metrics import REGISTRY
from runestone_proxy.server.gateway import Gateway, Phase
from runestone_proxy.server.http import JSON_HEADERS, Request, Responder
from runestone_proxy.server.router import Router

_NO_STORE = (*JSON_HEADERS, (b"cache-control", b"no-store"))
_LIVE_BODY = b'{"status":"ok"}'
_METRICS_HEADERS = ((b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),)


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def add_health_routes(router: Router, gateway: Gateway) -> None:
    """Register the health handlers for ``gateway`` on ``router`` (main or health port)."""

    async def live(_request: Request, responder: Responder) -> None:
        await responder.respond(200, _NO_STORE, _LIVE_BODY)

    async def ready(_request: Request, responder: Responder) -> None:
        status = 200 if gateway.phase is Phase.READY else 503
        await responder.respond(status, _NO_STORE, _json({"status": gateway.phase.value}))

    async def health(_request: Request, responder: Responder) -> None:
        components: dict[str, dict[str, Any]] = {}
        for name, probe in gateway.components.items():
            try:
                components[name] = probe()
            except Exception as exc:  # a broken probe is a down component
                components[name] = {"status": "down", "error": type(exc).__name__}
        if gateway.phase is not Phase.READY:
            status = gateway.phase.value
        elif any(c.get("status") == "down" for c in components.values()):
            status = "down"
        elif any(c.get("status") != "ok" for c in components.values()):
            status = "degraded"
        else:
            status = "ok"
        body = {
            "status": status,
            "version": __version__,
            "uptime_s": round(time.monotonic() - gateway.started_at, 3),
            "open_connections": gateway.open_connections,
            "components": components,
        }
        await responder.respond(200 if status != "down" else 503, _NO_STORE, _json(body))

    router.add("GET", "/health", health)
    router.add("GET", "/health/live", live)
    router.add("GET", "/health/ready", ready)


def add_metrics_route(router: Router) -> None:
    """``/metrics``: Prometheus text exposition (no API key; expose it on health_port)."""

    async def metrics_handler(_request: Request, responder: Responder) -> None:
        await responder.respond(200, _METRICS_HEADERS, REGISTRY.render())

    router.add("GET", "/metrics", metrics_handler)


def add_providers_route(router: Router, view: Callable[[], dict[str, Any]]) -> None:
    """``/health/providers``: each deployment's breaker state, in-flight count, recent error
    rate and latency percentiles (no API key needed, like the other health endpoints)."""

    async def providers(_request: Request, responder: Responder) -> None:
        await responder.respond(200, _NO_STORE, _json({"providers": view()}))

    router.add("GET", "/health/providers", providers)
