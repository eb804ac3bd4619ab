"""What the gateway is made of, wired together: :func:`wire` builds the parts
:class:`~runestone_proxy.server.app.App` runs (``App.build``), in the order they depend on
each other.

The upstream pool and the durable store (``server/``) go into the request service
(``gateway.service.Service``, over its ``transport``, ``queue`` and ``ledger``
interfaces); with ``[state] backend = "redis"`` its limits, budgets and provider health are
the fleet's (``redis_limits``, ``redis_budgets``, ``redis_health``). The API handlers
(``api/``) go on the main frontend's route table over the service; health, metrics and the
admin API on the main and health ports' tables as ``[admin] listen`` says; the store, the
admin keys and the aliases file are the main frontend's reload hooks (SIGHUP). Lifecycle
(what runs, in which nursery, and when it stops) is ``App``'s.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

from runestone_proxy import metrics
from runestone_proxy.api.admin_auth import AdminAuth
from runestone_proxy.api.admin_keys import add_admin_key_routes
from runestone_proxy.api.admin_usage import add_usage_routes
from runestone_proxy.api.anthropic import AnthropicApi
from runestone_proxy.api.health import (
    add_health_routes,
    add_metrics_route,
    add_providers_route,
    key_scope,
    operator_scope,
)
from runestone_proxy.api.jobs import add_job_routes
from runestone_proxy.api.openai import Api
from runestone_proxy.api.pings import Pings
from runestone_proxy.api.responses import ResponsesApi
from runestone_proxy.api.responses_state import add_routes as add_response_state_routes
from runestone_proxy.api.router import Router
from runestone_proxy.config import Config
from runestone_proxy.gateway.api_keys import KeyManager
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.gateway.deployments import providers_view
from runestone_proxy.gateway.service import Service
from runestone_proxy.server import aliases, redis_budgets, redis_health, redis_limits
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.store import Store
from runestone_proxy.server.upstream import UpstreamPool

__all__ = ["Parts", "wire"]


@attrs.frozen
class Parts:
    """The gateway's parts, wired (see the module docstring)."""

    gateway: Frontend
    #: The health port's frontend: health only, reporting the main gateway's phase.
    health_gateway: Frontend
    pool: UpstreamPool
    service: Service
    api: Api
    #: The aliases file (RUNESTONE_ALIASES_PATH) as the service sees it.
    aliases: aliases.ServiceAliases
    store: Store
    #: The one task that pings quiet translated Messages streams.
    pings: Pings
    #: Admin keys, and the routers ``/admin/`` routes are added to.
    admin: AdminAuth
    admin_routers: list[Router]
    #: The limits on Redis (``[state] backend = "redis"``), else None: in-process.
    shared: redis_limits.RedisLimits | None
    #: Run-time API keys: the admin API's changes, and the refresh that loads everyone's.
    keys: KeyManager


def wire(config: Config, env: Mapping[str, str]) -> Parts:
    """Build and connect the gateway's parts from ``config`` and the environment."""
    gateway = Frontend(config)
    # The health port serves health only, but reports the main gateway's phase.
    health_gateway = Frontend(config, router=Router())
    add_health_routes(health_gateway.router, gateway)
    up = config.upstream
    pool = UpstreamPool(
        max_connections_per_origin=up.max_connections_per_origin,
        idle_timeout_s=up.idle_timeout_s,
        proxy_env=env,
    )
    aliases_path, file_aliases = aliases.ServiceAliases.at_start(config, env)
    service = Service.build(config, env, pool, file_aliases)
    shared = None
    if config.state.backend == "redis":  # the limits shared by a fleet, on Redis
        shared = redis_limits.build(config, service.ratelimiter, service.capacity)
        service.limits = shared
        # Breaker transitions and the hedging p95 shared too (advisory: local if down).
        redis_health.attach(config, shared, service.deployments)
    api = Api(service)
    store = Store.from_config(config, env)
    service.store = store
    api.add_routes(gateway.router)
    pings = Pings()
    AnthropicApi(service, pings).add_routes(gateway.router)
    ResponsesApi(service).add_routes(gateway.router)
    # The main port's detailed health views need a key once keys exist (a tenant's key
    # sees its own tenant); the health port is the operator's and shows everything.
    main_scope = key_scope(api.authenticate)
    add_health_routes(gateway.router, gateway, main_scope)
    add_job_routes(gateway.router, store, api.authenticate)
    service.responses = store
    # Every request's usage record, in the writer's group commits ([ledger] enabled).
    service.ledger = store if config.ledger.enabled else None
    # Budgets seed their spend so far from the ledger (no ledger: memory only).
    service.budgets = LocalBudgetBook.from_config(config, store if config.ledger.enabled else None)
    if shared is not None:  # spend and holds shared by the fleet too (local: the fallback)
        service.budgets = redis_budgets.attach(config, shared, service.budgets)
    metrics.budget_gauge(service.budgets.remaining_usd)
    add_response_state_routes(gateway.router, store, api.authenticate)
    gateway.reload_hooks.append(store.apply_config)
    # The admin API's routes go on these routers ([admin] listen; fixed at start).
    admin = AdminAuth.build(config, env)
    gateway.reload_hooks.append(admin.apply_config)
    admin_routers = [health_gateway.router]
    if config.admin.listen == "main":
        admin_routers.append(gateway.router)
    gateway.components["capacity"] = service.limits.snapshot
    keys = KeyManager(store, service.keys.runtime, lambda: service.keys)
    for router in admin_routers:
        add_admin_key_routes(router, keys, admin)
    add_usage_routes(admin_routers, admin, store, lambda: store.clock())
    service_aliases = aliases.ServiceAliases(service, aliases_path)
    gateway.reload_hooks.append(service_aliases.reload)

    def providers_health() -> dict[str, Any]:
        return providers_view(service.deployments, service.routing.unavailable)

    for router, scope in (
        (gateway.router, main_scope),
        (health_gateway.router, operator_scope),
    ):
        add_providers_route(router, providers_health, scope)
        add_metrics_route(router, scope)
    _register_gauges(gateway, pool, service)
    gateway.components["upstream"] = lambda: {
        "status": "ok",
        "open_connections": pool.open_connections,
        "idle_connections": pool.idle_connections,
    }
    return Parts(
        gateway=gateway,
        health_gateway=health_gateway,
        pool=pool,
        service=service,
        api=api,
        aliases=service_aliases,
        store=store,
        pings=pings,
        admin=admin,
        admin_routers=admin_routers,
        shared=shared,
        keys=keys,
    )


_BREAKER_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}


def _register_gauges(gateway: Frontend, pool: UpstreamPool, service: Service) -> None:
    metrics.REGISTRY.gauge(
        "runestone_open_connections",
        "Client connections open on the main port.",
        lambda: [((), float(gateway.open_connections))],
    )
    metrics.REGISTRY.gauge(
        "runestone_upstream_connections",
        "Upstream connections open, by state.",
        lambda: [
            ((("state", "open"),), float(pool.open_connections)),
            ((("state", "idle"),), float(pool.idle_connections)),
        ],
    )
    metrics.REGISTRY.gauge(
        "runestone_provider_in_flight",
        "Requests in flight per provider deployment.",
        lambda: [
            ((("provider", n),), float(d.in_flight)) for n, d in service.deployments.by_name.items()
        ],
    )
    metrics.REGISTRY.gauge(
        "runestone_circuit_state",
        "Breaker state per deployment: 0 closed, 1 half-open, 2 open.",
        lambda: [
            ((("provider", n),), _BREAKER_VALUE[d.breaker.state.value])
            for n, d in service.deployments.by_name.items()
        ],
    )
