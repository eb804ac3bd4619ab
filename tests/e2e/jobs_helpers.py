"""Helpers for the overflow-queue end-to-end tests (and the crash test's child process).

* :class:`FakeCapacity`: per-tenant slots with the drainer's interface (``has_capacity``,
  ``job_slot``, ``wait_freed``), standing in for gateway/capacity.py.
* :class:`WebhookReceiver`: a real HTTP/1.1 server on 127.0.0.1 (trio + h11) that records
  every delivery, checks its ``x-runestone-signature`` and answers with scripted statuses.
* :func:`async_route`: ``POST /test/async`` -> :func:`accept_async`, standing in for the
  /v1 handlers until the product API enqueues on its own.
* :func:`start_jobs_gateway`: the in-process gateway (``App.build``) plus the store, the
  jobs routes and the drainer, all owned by the caller's nursery.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

import attrs
import h11
import trio

from runestone_proxy.config import Config
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.overflow import verify
from runestone_proxy.server.api import parse_object
from runestone_proxy.server.app import App
from runestone_proxy.server.drainer import Drainer, Runner, run_drainer
from runestone_proxy.server.http import Handler, Request, Responder
from runestone_proxy.server.jobs_api import accept_async, add_job_routes
from runestone_proxy.server.store import Store

HOST = "127.0.0.1"
SECRET = "whsec_e2e_0123456789"


@attrs.define
class FakeCapacity:
    per_tenant: int = 2
    in_flight: Counter[str] = attrs.Factory(Counter)
    peak: Counter[str] = attrs.Factory(Counter)
    _freed: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)

    def has_capacity(self, tenant: str) -> bool:
        return self.in_flight[tenant] < self.per_tenant

    @asynccontextmanager
    async def job_slot(self, tenant: str) -> AsyncIterator[None]:
        while not self.has_capacity(tenant):
            await self._freed.park()
        self.in_flight[tenant] += 1
        self.peak[tenant] = max(self.peak[tenant], self.in_flight[tenant])
        try:
            yield
        finally:
            self.in_flight[tenant] -= 1
            self._freed.unpark_all()

    async def wait_freed(self) -> None:
        await self._freed.park()


@attrs.frozen
class Delivery:
    job_id: str
    headers: Mapping[str, str]
    body: bytes
    verified: bool
    status: int


@attrs.define(eq=False)
class WebhookReceiver:
    """Answers ``script`` statuses in order (then 200) and records every delivery."""

    secret: bytes = SECRET.encode()
    script: list[int] = attrs.Factory(list)
    deliveries: list[Delivery] = attrs.Factory(list)
    port: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/hooks/runestone"

    def delivered(self) -> dict[str, Delivery]:
        """job id -> its first accepted (2xx) delivery."""
        found: dict[str, Delivery] = {}
        for d in self.deliveries:
            if 200 <= d.status < 300:
                found.setdefault(d.job_id, d)
        return found

    async def wait_for(self, job_ids: set[str]) -> dict[str, Delivery]:
        while not job_ids <= set(self.delivered()):
            self._changed = trio.Event()
            await self._changed.wait()
        return self.delivered()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        headers: dict[str, str] = {}
        body = b""
        try:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Request):
                    headers = {k.decode(): v.decode() for k, v in event.headers}
                    body = b""
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    status = self._record(headers, body)
                    response = h11.Response(status_code=status, headers=[("content-length", "0")])
                    await stream.send_all(conn.send(response) + conn.send(h11.EndOfMessage()))
                    conn.start_next_cycle()
                else:  # ConnectionClosed
                    return
        except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await trio.aclose_forcefully(stream)

    def _record(self, headers: Mapping[str, str], body: bytes) -> int:
        status = self.script.pop(0) if self.script else 200
        signature = headers.get("x-runestone-signature", "")
        verified = verify(self.secret, signature, body, now=int(time.time()))
        job_id = headers.get("x-runestone-job-id", "")
        self.deliveries.append(Delivery(job_id, headers, body, verified, status))
        self._changed.set()
        return status


def async_route(store: Store, authenticate: Callable[[Request], Principal]) -> Handler:
    """``POST /test/async``: what a /v1 handler will do for a request that must be queued."""

    async def handler(request: Request, responder: Responder) -> None:
        principal = authenticate(request)
        raw = await request.body()
        body = parse_object(raw)
        await accept_async(store, request, responder, principal, "chat", body, raw, None)

    return handler


@attrs.frozen
class JobsGateway:
    app: App
    store: Store
    drainer: Drainer
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


async def start_jobs_gateway(
    nursery: trio.Nursery,
    config: Config,
    env: Mapping[str, str],
    runner: Callable[[int], Runner],
    capacity: Any,
) -> JobsGateway:
    """The gateway with the overflow queue wired in: the store first, then the listener,
    then the drainer, whose runner is ``runner(port)`` (so it may call the gateway back)."""
    app = App.build(config, None, env)
    store = Store.from_config(config, env)
    add_job_routes(app.gateway.router, store, app.api.authenticate)
    app.gateway.router.add("POST", "/test/async", async_route(store, app.api.authenticate))
    await nursery.start(store.run)
    bound = await nursery.start(app.run)
    drainer = await nursery.start(
        partial(run_drainer, store, runner(bound.port), capacity, config.overflow, env=env)
    )
    return JobsGateway(app, store, drainer, bound.port)
