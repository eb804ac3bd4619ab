"""Health endpoints: ``/``, ``/health``, ``/health/live``, ``/health/ready``,
``/health/providers``, and ``/metrics``.

``GET /`` and ``HEAD /`` answer 200 with a tiny JSON (an origin probe: Claude Code sends
``HEAD /`` before it starts). Liveness answers as long as the event loop runs; readiness is
503 while starting and while draining, so a load balancer stops sending before we stop
serving. ``/health`` lists the components later subsystems register on the gateway
(upstream pool, SQLite store, drainer), each reporting its own status.

Who sees what. ``/``, ``/health/live`` and ``/health/ready`` answer anyone, on every port:
probes carry no key and the answers say nothing about tenants. The detailed views
(``/health``, ``/health/providers``, ``/metrics``) name tenants, their in-flight counts and
limits, so a :data:`Scope` decides per request what the caller may see:

* on ``health_port`` (the operator's listener, kept on loopback or a private network) and on
  a gateway running open (no key configured), everything, without a key, as before;
* on the main port with keys configured, a valid API key is needed (401 in OpenAI's
  envelope otherwise), and a key sees its own tenant only: rows and series that name
  another tenant are left out (:func:`tenant_view`, ``Registry.render(tenant=...)``).
  Gateway-wide figures that name no tenant (provider health, open connections, totals) stay.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from runestone_proxy import __version__
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.http import JSON_HEADERS, Request, Responder
from runestone_proxy.api.router import Router
from runestone_proxy.gateway.auth import ANONYMOUS, Principal
from runestone_proxy.metrics import REGISTRY


class Served(Protocol):
    """What health reports about the front end serving it (``server.frontend.Frontend``)."""

    phase: Phase
    started_at: float
    components: dict[str, Callable[[], dict[str, Any]]]
    open_connections: int


_NO_STORE = (*JSON_HEADERS, (b"cache-control", b"no-store"))
_LIVE_BODY = b'{"status":"ok"}'
_ROOT_BODY = b'{"name":"runestone","status":"ok"}'
_METRICS_HEADERS = (
    (b"content-type", b"text/plain; version=0.0.4; charset=utf-8"),
    (b"cache-control", b"no-store"),
)

#: What a caller may see of the detailed views: ``None`` is the operator's whole view, a
#: tenant name is that tenant's view; a caller who may see nothing gets
#: :class:`~runestone_proxy.errors.AuthenticationFailed` (401) raised.
Scope = Callable[[Request], str | None]

#: With ``server.workers`` > 1 (``server/supervisor_worker.py``): the ``workers`` component
#: of ``/health``, gathered from every worker of the gateway.
WorkersView = Callable[[], Awaitable[dict[str, Any]]]
#: ... and ``/metrics`` summed over every worker, for a scope's tenant (None: all).
MetricsRender = Callable[[str | None], Awaitable[bytes]]


def operator_scope(_request: Request) -> None:
    """The health port's scope: its listener is the operator's, so no key and no filter."""
    return None


def key_scope(authenticate: Callable[[Request], Principal]) -> Scope:
    """The main port's scope: what the caller's key allows (``authenticate`` raises 401 for
    a missing or bad key, and returns the anonymous principal when the gateway runs open)."""

    def scope(request: Request) -> str | None:
        principal = authenticate(request)
        return None if principal is ANONYMOUS else principal.tenant

    return scope


def tenant_view(components: dict[str, dict[str, Any]], tenant: str) -> dict[str, dict[str, Any]]:
    """``components`` as ``tenant`` may see them: in a component that lists ``tenants``
    (capacity, say), only that tenant's row is kept."""
    scoped: dict[str, dict[str, Any]] = {}
    for name, component in components.items():
        rows = component.get("tenants")
        if isinstance(rows, dict):
            own = {tenant: rows[tenant]} if tenant in rows else {}
            component = {**component, "tenants": own}
        scoped[name] = component
    return scoped


def _json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def add_health_routes(
    router: Router,
    gateway: Served,
    scope: Scope = operator_scope,
    workers: WorkersView | None = None,
) -> None:
    """Register the health handlers for ``gateway`` on ``router`` (main or health port);
    ``scope`` guards ``/health`` (liveness and readiness answer anyone). ``workers`` adds the
    whole gateway's worker processes to ``/health`` as a component; liveness and readiness
    stay this process's own (a connection only reaches a worker that is accepting)."""

    async def root(_request: Request, responder: Responder) -> None:
        # Claude Code probes its origin with ``HEAD /`` before it starts; the router answers
        # HEAD with this GET handler and the connection layer drops the body (RFC 9110 §9.3.2).
        await responder.respond(200, _NO_STORE, _ROOT_BODY)

    async def live(_request: Request, responder: Responder) -> None:
        await responder.respond(200, _NO_STORE, _LIVE_BODY)

    async def ready(_request: Request, responder: Responder) -> None:
        status = 200 if gateway.phase is Phase.READY else 503
        await responder.respond(status, _NO_STORE, _json({"status": gateway.phase.value}))

    async def health(request: Request, responder: Responder) -> None:
        tenant = scope(request)
        components: dict[str, dict[str, Any]] = {}
        for name, probe in gateway.components.items():
            try:
                components[name] = probe()
            except Exception as exc:  # a broken probe is a down component
                components[name] = {"status": "down", "error": type(exc).__name__}
        if workers is not None:
            components["workers"] = await workers()
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
            "components": components if tenant is None else tenant_view(components, tenant),
        }
        await responder.respond(200 if status != "down" else 503, _NO_STORE, _json(body))

    router.add("GET", "/", root)
    router.add("GET", "/health", health)
    router.add("GET", "/health/live", live)
    router.add("GET", "/health/ready", ready)


def add_metrics_route(
    router: Router, scope: Scope = operator_scope, render: MetricsRender | None = None
) -> None:
    """``/metrics``: Prometheus text exposition; a tenant's key sees no other tenant's
    series (scrape the whole set on ``health_port``). ``render`` replaces this process's
    registry (several workers: their sum)."""

    async def metrics_handler(request: Request, responder: Responder) -> None:
        tenant = scope(request)
        body = REGISTRY.render(tenant=tenant) if render is None else await render(tenant)
        await responder.respond(200, _METRICS_HEADERS, body)

    router.add("GET", "/metrics", metrics_handler)


def add_providers_route(
    router: Router, view: Callable[[], dict[str, Any]], scope: Scope = operator_scope
) -> None:
    """``/health/providers``: each deployment's breaker state, in-flight count, recent error
    rate and latency percentiles. Providers are shared by every tenant, so any caller
    ``scope`` admits sees them all."""

    async def providers(request: Request, responder: Responder) -> None:
        scope(request)
        await responder.respond(200, _NO_STORE, _json({"providers": view()}))

    router.add("GET", "/health/providers", providers)
