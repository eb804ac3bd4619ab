"""A worker's side of ``server.workers`` > 1: answering ``/metrics`` and ``/health`` for the
whole gateway, and draining when the supervisor is gone.

A worker is today's gateway (its sockets and its sd_notify come through :mod:`.systemd`);
this module adds only what only a worker needs, attached by ``App.build`` when the
supervisor's marker (``RUNESTONE_WORKER``) is in the environment:

* **A private socket per worker**, ``worker-<slot>.sock`` in the supervisor's 0700 runtime
  directory, speaking one tiny request per connection (a JSON line:
  ``{"op": "metrics", "tenant": null}`` or ``{"op": "health"}``; the answer is the bytes
  until EOF). Not HTTP on purpose: a sibling's scrape is not a request of the gateway, so it
  neither counts in ``runestone_http_requests_total`` nor writes an access line.
* **``/metrics`` for the gateway**: whichever worker takes the scrape renders its own
  registry, asks every sibling for theirs (concurrently, 1 s each), and sums them
  (:func:`runestone_proxy.metrics.merge`). No ``worker`` label: one Prometheus target, the
  same series names as a single process. ``runestone_workers`` says how many workers the
  sum covers; a sibling that did not answer (restarting) is missing from the sum for that
  scrape, so counters can dip (Prometheus' ``rate()`` treats a dip as a reset).
* **``/health`` for the gateway**: a ``workers`` component listing every worker (pid, phase,
  open connections), ``degraded`` while one does not answer or is not ready.
* **The lifeline**: the read end of a pipe only the supervisor writes to; EOF means the
  supervisor died (even by SIGKILL), and the worker drains instead of serving on alone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog
import trio

from runestone_proxy import metrics
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.health import add_health_routes, add_metrics_route, key_scope
from runestone_proxy.api.health import operator_scope as _operator_scope
from runestone_proxy.server.supervisor_spawn import (
    ENV_SUPERVISOR_FD,
    ENV_WORKER,
    ENV_WORKER_COUNT,
    ENV_WORKER_DIR,
)

if TYPE_CHECKING:
    from runestone_proxy.server.app import App

log = structlog.get_logger("runestone.worker")

#: A sibling that takes longer than this to answer is left out of the scrape.
ASK_TIMEOUT_S = 1.0
#: The largest answer read from a sibling (a /metrics body with many tenants and models).
_MAX_ANSWER_BYTES = 16 * 1024 * 1024


@attrs.frozen
class WorkerEnv:
    """What the supervisor told this worker: its slot, how many there are, where."""

    slot: int
    count: int
    directory: Path
    lifeline: int | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerEnv | None:
        if ENV_WORKER not in env:
            return None
        fd = env.get(ENV_SUPERVISOR_FD)
        return cls(
            int(env[ENV_WORKER]),
            int(env.get(ENV_WORKER_COUNT, "1")),
            Path(env.get(ENV_WORKER_DIR, ".")),
            int(fd) if fd else None,
        )

    def socket_path(self, slot: int) -> Path:
        return self.directory / f"worker-{slot}.sock"


async def ask(path: Path, op: dict[str, Any]) -> bytes | None:
    """One question to a sibling's private socket; None if it does not answer in time."""
    try:
        with trio.fail_after(ASK_TIMEOUT_S):
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(json.dumps(op).encode() + b"\n")
                parts, size = [], 0
                while data := await stream.receive_some(65536):
                    size += len(data)
                    if size > _MAX_ANSWER_BYTES:
                        return None
                    parts.append(data)
                return b"".join(parts)
    except (OSError, trio.TooSlowError, trio.BrokenResourceError):
        return None


@attrs.define(eq=False)
class WorkerSide:
    env: WorkerEnv
    app: App

    # --- what this worker tells its siblings --------------------------------------------------

    def own_health(self) -> dict[str, Any]:
        gateway = self.app.gateway
        return {
            "slot": self.env.slot,
            "pid": os.getpid(),
            "phase": gateway.phase.value,
            "open_connections": gateway.open_connections,
            "uptime_s": round(time.monotonic() - gateway.started_at, 3),
        }

    def answer(self, op: Any) -> bytes:
        if isinstance(op, dict) and op.get("op") == "metrics":
            tenant = op.get("tenant")
            return metrics.REGISTRY.render(tenant=tenant if isinstance(tenant, str) else None)
        if isinstance(op, dict) and op.get("op") == "health":
            return json.dumps(self.own_health()).encode()
        return b""

    async def _serve_one(self, stream: trio.SocketStream) -> None:
        """One sibling's question (catch, log, close: convention 7)."""
        async with stream:
            try:
                with trio.fail_after(ASK_TIMEOUT_S):
                    line = b""
                    while b"\n" not in line and len(line) < 4096:
                        data = await stream.receive_some(4096)
                        if not data:
                            break
                        line += data
                    await stream.send_all(self.answer(json.loads(line or b"null")))
            except (OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError):
                pass
            except Exception:
                log.exception("worker.private.crashed")

    # --- what this worker answers for the whole gateway ---------------------------------------

    async def _ask_all(self, op: dict[str, Any]) -> dict[int, bytes | None]:
        answers: dict[int, bytes | None] = {}

        async def one(slot: int) -> None:
            answers[slot] = await ask(self.env.socket_path(slot), op)

        async with trio.open_nursery() as nursery:
            for slot in range(self.env.count):
                if slot != self.env.slot:
                    nursery.start_soon(one, slot)
        return answers

    async def render_metrics(self, tenant: str | None) -> bytes:
        own = metrics.REGISTRY.render(tenant=tenant)
        answers = await self._ask_all({"op": "metrics", "tenant": tenant})
        texts = [own, *(a for a in answers.values() if a is not None)]
        summary = (
            "# HELP runestone_workers Worker processes, by state: configured, and summed "
            "into this scrape.\n# TYPE runestone_workers gauge\n"
            f'runestone_workers{{state="configured"}} {self.env.count}\n'
            f'runestone_workers{{state="scraped"}} {len(texts)}\n'
        ).encode()
        return metrics.merge(texts) + summary

    async def health_view(self) -> dict[str, Any]:
        answers = await self._ask_all({"op": "health"})
        each: dict[str, dict[str, Any]] = {str(self.env.slot): self.own_health()}
        for slot, raw in answers.items():
            try:
                each[str(slot)] = json.loads(raw) if raw else {"phase": "unreachable"}
            except ValueError:
                each[str(slot)] = {"phase": "unreachable"}
        ready = sum(1 for w in each.values() if w.get("phase") == Phase.READY.value)
        return {
            "status": "ok" if ready == self.env.count else "degraded",
            "count": self.env.count,
            "ready": ready,
            "answered_by": self.env.slot,
            "open_connections": sum(int(w.get("open_connections", 0)) for w in each.values()),
            "workers": dict(sorted(each.items(), key=lambda kv: int(kv[0]))),
        }

    # --- the worker's tasks (in the app's root nursery) ---------------------------------------

    async def run(
        self,
        begin_drain: Callable[[], Awaitable[None]],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        path = self.env.socket_path(self.env.slot)
        path.unlink(missing_ok=True)  # left by this slot's previous worker
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.listen(64)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._serve_one, [listener])
            if self.env.lifeline is not None:
                nursery.start_soon(self._lifeline, self.env.lifeline, begin_drain)
            task_status.started()

    async def _lifeline(self, fd: int, begin_drain: Callable[[], Awaitable[None]]) -> None:
        await trio.lowlevel.wait_readable(fd)
        if os.read(fd, 1):
            return  # nothing writes to the pipe; data would be a bug, not a death
        log.error("worker.supervisor_gone", slot=self.env.slot)
        await begin_drain()


def attach(app: App, env: Mapping[str, str]) -> WorkerSide | None:
    """In a worker: the whole-gateway ``/health`` and ``/metrics`` on the main and health
    ports (replacing the single-process routes), and log lines tagged ``worker=<slot>``."""
    worker_env = WorkerEnv.from_env(env)
    if worker_env is None:
        return None
    side = WorkerSide(worker_env, app)
    structlog.contextvars.bind_contextvars(worker=worker_env.slot)
    main_scope = key_scope(app.api.authenticate)
    for router, scope in (
        (app.gateway.router, main_scope),
        (app.health_gateway.router, _operator_scope),
    ):
        add_health_routes(router, app.gateway, scope, workers=side.health_view)
        add_metrics_route(router, scope, render=side.render_metrics)
    return side
