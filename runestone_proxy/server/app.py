"""``serve(config)``: the process's nursery tree, its lifecycle, and its signals.

The tree (every task has an owner; nothing runs in the background unparented)::

    serve(config)                         root nursery (inside the upstream pool's lifetime)
    ├── signals                           SIGTERM/SIGINT -> drain; SIGHUP -> reload config
    ├── slow-request sweeper              arms h1 disconnect watching for slow requests
    ├── upstream timeout sweeper          pool.watch: overdue upstream waits, idle expiry
    ├── aliases watcher                   RUNESTONE_ALIASES_PATH mtime (when set): .aliases
    ├── watchdog                          WATCHDOG=1 to systemd (when WatchdogSec is set)
    ├── health accept loop                health_port (optional): /health*, /metrics, no key
    │                                     needed (the operator's port), kept until the end
    │   └── health connections
    ├── SQLite store                      one writer task, group commit
    ├── shared limits (state = redis)     Redis connection, subscriber, slot dispatcher,
    │                                     lease renewal of slots and budget holds,
    │                                     breaker/p95 sync (one subscriber for both)
    │                                     (server/redis_limits.py, redis_budgets.py,
    │                                     redis_health.py)
    ├── worker side (server.workers > 1)  private socket for siblings' scrapes; lifeline
    ├── keys refresh                      polls the store's keys_version (0.5 s): run-time
    │                                     API keys made by any process, in force here
    ├── pings                             event: ping into quiet translated Messages streams
    ├── services                          overflow drainer (claims, webhooks, sweeps);
    │   └── job tasks                     Service.run_job; cancelled before the store so
    │                                     jobs are released
    └── connections nursery               one task per connection (h1 or h2)
        │   └── request / stream tasks    owned by their connection: Frontend.dispatch ->
        │                                 api handler -> gateway.service (a hedged stream
        │                                 alone opens a nursery here, for its two attempts)
        └── accept loops                  main port(s); cancelled first when draining

What ``App.build`` wires is :mod:`.wiring`'s (``wire``): the pool, the store, the service,
the API handlers and the route tables; this module runs them.

Lifecycle: STARTING (readiness 503) -> READY (READY=1 to systemd) -> DRAINING on SIGTERM or
SIGINT: readiness turns 503, STOPPING=1, the accept loops stop (listening sockets close),
``gateway.draining`` tells connections to finish what they have (h1 closes idle keep-alives,
h2 sends GOAWAY), and after ``shutdown_grace_s`` whatever is left is cancelled. Then the root
nursery is cancelled and ``serve`` returns: exit status 0. A second SIGTERM/SIGINT during the
drain cancels at once.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import attrs
import structlog
import trio

from runestone_proxy import config as config_mod
from runestone_proxy import logs, metrics, telemetry
from runestone_proxy.api.admin_auth import AdminAuth
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.openai import Api
from runestone_proxy.api.pings import Pings
from runestone_proxy.api.router import Router
from runestone_proxy.config import Config, ConfigError
from runestone_proxy.gateway.api_keys import KeyManager
from runestone_proxy.gateway.service import Service
from runestone_proxy.server import (
    aliases,
    redis_limits,
    supervisor_worker,
    systemd,
)
from runestone_proxy.server.drainer import RESULT_OVERHEAD_BYTES, run_drainer
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.listener import ACCEPT_BATCH, accept_loop, make_ssl_context
from runestone_proxy.server.store import Store
from runestone_proxy.server.upstream import UpstreamPool
from runestone_proxy.server.wiring import wire

log = structlog.get_logger("runestone.app")

#: Keys whose change needs a restart (the listening sockets are bound once).
_RESTART_ONLY = ("host", "port", "health_port", "tls_cert", "tls_key", "backlog")


@attrs.frozen
class Bound:
    """What ``serve`` reports through ``task_status`` once it is listening."""

    port: int
    health_port: int | None


@attrs.define(eq=False)
class App:
    config: Config
    config_path: Path | None
    env: Mapping[str, str]
    gateway: Frontend
    health_gateway: Frontend
    notifier: systemd.Notifier
    shutdown: trio.Event = attrs.Factory(trio.Event)
    pool: UpstreamPool = attrs.field(kw_only=True)
    service: Service = attrs.field(kw_only=True)
    api: Api = attrs.field(kw_only=True)
    #: The aliases file (RUNESTONE_ALIASES_PATH) as the service sees it.
    aliases: aliases.ServiceAliases = attrs.field(kw_only=True)
    store: Store = attrs.field(kw_only=True)
    #: The one task that pings quiet translated Messages streams.
    pings: Pings = attrs.field(kw_only=True, factory=Pings)
    #: Admin keys, and the routers ``/admin/`` routes are added to.
    admin: AdminAuth = attrs.field(kw_only=True)
    admin_routers: list[Router] = attrs.field(kw_only=True)
    #: The limits on Redis (``[state] backend = "redis"``), else None: in-process.
    shared: redis_limits.RedisLimits | None = attrs.field(kw_only=True, default=None)
    #: One of ``server.workers`` > 1 (server/supervisor.py): whole-gateway health/metrics.
    worker: supervisor_worker.WorkerSide | None = attrs.field(kw_only=True, default=None)
    #: Run-time API keys: the admin API's changes, and the refresh that loads everyone's.
    keys: KeyManager = attrs.field(kw_only=True)

    @classmethod
    def build(cls, config: Config, config_path: Path | None, env: Mapping[str, str]) -> App:
        parts = wire(config, env)
        app = cls(
            config,
            config_path,
            env,
            parts.gateway,
            parts.health_gateway,
            systemd.Notifier.from_env(env),
            pool=parts.pool,
            service=parts.service,
            api=parts.api,
            aliases=parts.aliases,
            store=parts.store,
            pings=parts.pings,
            admin=parts.admin,
            admin_routers=parts.admin_routers,
            shared=parts.shared,
            keys=parts.keys,
        )
        app.worker = supervisor_worker.attach(app, env)
        return app

    def _warn_if_open(self) -> None:
        if not self.service.keys.open:
            return
        host = self.config.server.host
        loopback = host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")
        reason = "auth disabled" if not self.config.auth.enabled else "no API key configured"
        if loopback:
            log.warning(
                "auth.open", reason=reason, host=host, hint="any local process may call the API"
            )
        else:
            log.error(
                "auth.open.public",
                reason=reason,
                host=host,
                hint="ANYONE who can reach this address may call the API; set "
                "RUNESTONE_API_KEYS or [[auth.keys]]",
            )

    # --- listening ----------------------------------------------------------------------------

    async def _listeners(self) -> tuple[list[trio.SocketListener], list[trio.SocketListener]]:
        """Main and health listeners: inherited from systemd (LISTEN_FDS) or bound here."""
        server = self.config.server
        inherited = systemd.listen_fds_with_names(self.env)
        if inherited:
            roles = systemd.assign_roles(inherited)

            def wrap(socks: tuple[socket.socket, ...]) -> list[trio.SocketListener]:
                return [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]

            return wrap(roles.main), wrap(roles.health)
        bound = await trio.open_tcp_listeners(server.port, host=server.host, backlog=server.backlog)
        if server.health_port is None:
            return bound, []
        health_bound = await trio.open_tcp_listeners(
            server.health_port, host=server.host, backlog=server.backlog
        )
        return bound, health_bound

    async def run(self, task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED) -> None:
        removers = [
            telemetry.add_handler(metrics.on_event),
            telemetry.add_handler(logs.telemetry_to_log),
        ]
        try:
            await self._run(task_status)
        finally:
            for remove in removers:
                remove()
            self.notifier.close()  # the NOTIFY_SOCKET datagram socket, if one was opened

    async def _run(self, task_status: trio.TaskStatus[Bound]) -> None:
        ssl_context = make_ssl_context(self.config.server)
        main, health = await self._listeners()
        bound = Bound(
            port=main[0].socket.getsockname()[1],
            health_port=health[0].socket.getsockname()[1] if health else None,
        )
        async with self.pool, trio.open_nursery() as root:
            await root.start(self._signals)
            await root.start(self.gateway.slow_watch.run)
            await root.start(self.pool.watch.run)
            if self.aliases.path is not None:
                await root.start(aliases.watch, self.aliases.path, self.aliases.reload_aliases)
            interval = systemd.watchdog_interval(self.env)
            if interval is not None:
                await root.start(systemd.watchdog_loop, self.notifier, interval)
            for listener in health:
                await root.start(
                    partial(accept_loop, listener, self.health_gateway, root, capped=False)
                )
            await root.start(self.store.run)
            if self.shared is not None:
                await root.start(self.shared.run)
            await root.start(self.keys.refresh)  # the stored keys, loaded before READY
            self._warn_if_open()
            await root.start(self.pings.run)
            if self.worker is not None:
                await root.start(self.worker.run, self.begin_drain)
            services = await root.start(self._services)
            async with trio.open_nursery() as connections:
                async with trio.open_nursery() as accepting:
                    for listener in main:
                        serve_main = partial(
                            accept_loop,
                            listener,
                            self.gateway,
                            connections,
                            ssl_context=ssl_context,
                            batch=0 if self.worker is not None else ACCEPT_BATCH,
                        )
                        await accepting.start(serve_main)
                    self.gateway.phase = Phase.READY
                    log.info(
                        "gateway.ready",
                        port=bound.port,
                        health_port=bound.health_port,
                        tls=ssl_context is not None,
                    )
                    await self.notifier.ready(f"listening on port {bound.port}")
                    task_status.started(bound)
                    await self.shutdown.wait()
                    accepting.cancel_scope.cancel()
                await self._drain(connections)
            services.cancel()  # the drainer stops before the store, so running jobs are released
            if self.shared is not None:
                await self.shared.flush()  # the last slots' releases reach Redis
            root.cancel_scope.cancel()
        log.info("gateway.stopped")

    async def _services(
        self, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """The overflow drainer (with its webhook and sweep loops), cancelled as one unit."""
        with trio.CancelScope() as scope:
            drain = partial(
                run_drainer,
                self.store,
                self.service.run_job,
                self.service.limits.jobs,
                self.config.overflow,
                env=self.env,
                max_result_bytes=self.config.upstream.max_response_bytes + RESULT_OVERHEAD_BYTES,
            )
            async with trio.open_nursery() as nursery:
                await nursery.start(drain)
                task_status.started(scope)

    async def _drain(self, connections: trio.Nursery) -> None:
        grace = self.config.server.shutdown_grace_s
        log.info("gateway.draining", open_connections=self.gateway.open_connections, grace_s=grace)
        with trio.move_on_after(grace):
            if self.gateway.open_connections:
                self.gateway.connections_idle = trio.Event()
                await self.gateway.connections_idle.wait()
        if self.gateway.open_connections:
            log.warning("gateway.drain.cancelled", open_connections=self.gateway.open_connections)
        connections.cancel_scope.cancel()

    # --- signals and reload ------------------------------------------------------------------

    async def _signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await self.reload()
                elif self.shutdown.is_set():
                    log.warning("gateway.shutdown.forced", signal=signal.Signals(signum).name)
                    self.gateway.connections_idle.set()  # the drain stops waiting
                else:
                    log.info("gateway.shutdown", signal=signal.Signals(signum).name)
                    await self.begin_drain()

    async def begin_drain(self) -> None:
        self.gateway.phase = Phase.DRAINING
        with trio.CancelScope(shield=True):
            await self.notifier.stopping()
        self.gateway.draining.set()
        self.shutdown.set()

    async def reload(self) -> None:
        """Re-read and validate the config; swap what may change at run time, else keep it."""
        await self.notifier.reloading()
        try:
            new = config_mod.load(self.config_path, self.env)
        except ConfigError as exc:
            log.error("config.reload.failed", source=exc.source, errors=exc.messages)
        else:
            for key in _RESTART_ONLY:
                if getattr(new.server, key) != getattr(self.config.server, key):
                    # Not ``key=``: the log redactor masks fields named like secrets.
                    log.warning("config.reload.needs_restart", setting=f"server.{key}")
            self.config = new
            self.gateway.apply_config(new)
            self.health_gateway.apply_config(new)
            logs.configure(new.logging.level, new.logging.format)
            log.info("config.reloaded", source=exc_source(self.config_path))
        await self.notifier.ready("reloaded")


def exc_source(path: Path | None) -> str:
    return str(path) if path is not None else "<embedded defaults>"


async def serve(
    config: Config,
    *,
    config_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    task_status: trio.TaskStatus[Bound] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the gateway until SIGTERM/SIGINT. Reports :class:`Bound` once listening."""
    app = App.build(config, config_path, os.environ if env is None else env)
    await app.run(task_status)
