"""The pooled HTTP/1.1 client to providers: keep-alive connections per origin, bounded.

Owns every socket the gateway opens to an upstream on the hot path. The I/O of one
connection lives in :mod:`.upstream_h11`; the outbound-proxy fallback in
:mod:`.upstream_httpx`. Failures reach callers only as :mod:`runestone_proxy.errors`
(``UpstreamConnectError``, ``UpstreamTimeout``, ``UpstreamProtocolError``), mapped once.

    async with pool.request("POST", url, headers, body) as resp:
        ... resp.status, resp.headers, await resp.receive() / await resp.read()

How this works
--------------
1. *Route.* A URL is split once and cached: the origin's pool (scheme, host, port) and the
   request-target. Each origin has a ``trio.Semaphore`` of ``max_connections_per_origin``
   slots and a LIFO list of idle connections. A socket is opened only by a slot holder
   that found no usable idle connection, so an origin never has more open sockets (idle +
   busy) than slots.
2. *Checkout.* Take a slot (waiting at most ``connect_s``); pop the most recently used idle
   connection, dropping it if it idled past ``idle_timeout_s`` or its socket is readable
   (the peer closed it); otherwise connect (TCP, then TLS with SNI and hostname checks).
3. *Exchange.* Head and bytes body go out in one ``send_all`` (an async-iterable body goes
   out chunked); the response head must arrive within ``first_byte_s``. If a *reused*
   connection dies before a byte of the response, the server most likely closed it as we
   sent (RFC 9112 §9.3.1, §9.5): the request is retried once on a fresh connection when
   that is safe (:func:`_may_replay`).
4. *Body.* ``resp.receive()`` returns the next chunk within ``between_chunks_s``; every
   step is also bounded by ``total_s`` from the start of the request. While the pool's
   ``watch`` runs (the app starts it), the head and body waits register their due times
   with it rather than entering a cancel scope each; it wakes an overdue wait within
   ``WATCH_INTERVAL_S`` of its limit.
5. *Release.* Leaving the ``async with`` cleanly with the response read to its end and both
   h11 sides DONE parks the connection for reuse. Any other exit (early, exception,
   cancellation) closes it in a shielded, bounded scope. The slot is always returned.
6. *Idle expiry.* A parked connection is closed once it has idled ``idle_timeout_s``, not
   only when a later checkout finds it stale: providers drop idle sockets on their side
   (often after a minute or less), and a quiet gateway should not hold half-dead ones.
   While ``watch`` runs, each origin with idle connections has one entry there, due when
   its longest-idle connection expires (the LIFO list is ordered by idle time, so that is
   its head); the sweep closes the expired prefix and re-registers for the next. Parking
   a connection costs one flag check; the entry is added only when none is pending.

Where ``HTTPS_PROXY``/``HTTP_PROXY``/``ALL_PROXY`` cover an origin (and ``NO_PROXY`` does
not exempt it), its requests go through httpx instead, behind the same interface; the
socket counters here count only the direct transport.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from functools import partial
from types import TracebackType
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit

import attrs
import trio

from runestone_proxy.errors import UpstreamConnectError
from runestone_proxy.gateway.transport import Body, Headers, UpstreamTimeouts
from runestone_proxy.server.slowwatch import SlowWatch
from runestone_proxy.server.upstream_dial import Origin
from runestone_proxy.server.upstream_h11 import EarlyClose, H11Connection
from runestone_proxy.server.upstream_response import H11Response, UpstreamResponse, timed_out

if TYPE_CHECKING:
    from runestone_proxy.server.upstream_httpx import ProxyTransport

__all__ = ["Body", "Headers", "UpstreamPool", "UpstreamResponse", "UpstreamTimeouts"]

_ROUTE_CACHE_MAX: Final = 1024
#: How often the pool's sweeper looks for overdue head and body waits: a first-byte or
#: between-chunks timeout fires up to this much after its limit.
WATCH_INTERVAL_S: Final = 0.05
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_PROXY_VARS: Final = ("https_proxy", "http_proxy", "all_proxy")


def _may_replay(exc: EarlyClose, method: str, headers: Headers) -> bool:
    """Whether a request that died on a reused connection may be sent again, as Go's
    net/http decides (RFC 9112 §9.3.1): the body can be replayed, and either the write
    itself failed (the server had dropped the connection, so it never saw the request) or
    the request is idempotent by method (RFC 9110 §9.2.2) or by an ``Idempotency-Key``."""
    if not exc.replayable:
        return False
    if exc.during_send or method in _IDEMPOTENT:
        return True
    return any(name.lower() == b"idempotency-key" for name, _ in headers)


def _ssl_or_default(ctx: ssl.SSLContext | None) -> ssl.SSLContext:
    if ctx is None:
        ctx = ssl.create_default_context()  # system CAs, hostname check, SNI
        ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _env_or_os(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


@attrs.define(eq=False)
class _OriginPool:
    origin: Origin
    slots: trio.Semaphore
    idle: list[H11Connection] = attrs.Factory(list)  # LIFO: the warmest connection is last
    #: An idle-expiry entry for this origin is pending in the pool's ``watch``.
    sweep_pending: bool = False


@attrs.define(eq=False)
class _Exchange:
    """What ``pool.request(...)`` returns: one request's ``async with`` lifetime."""

    pool: UpstreamPool
    method: str
    url: str
    headers: Headers
    body: Body
    timeouts: UpstreamTimeouts
    #: The caller's own bound (a failover attempt's), when earlier than ``total_s``.
    deadline: float | None = None
    _op: _OriginPool | None = None
    _response: H11Response | None = None
    _proxied: AbstractAsyncContextManager[UpstreamResponse] | None = None

    async def __aenter__(self) -> UpstreamResponse:
        pool = self.pool
        op, target = pool._route(self.url)
        t = self.timeouts
        deadline = trio.current_time() + t.total_s
        if self.deadline is not None and self.deadline < deadline:
            deadline = self.deadline
            if op.origin.proxy is not None:  # that transport takes a budget, not a deadline
                t = attrs.evolve(t, total_s=max(0.0, deadline - trio.current_time()))
        if op.origin.proxy is not None:
            self._proxied = pool._proxy_transport().request(
                op.origin, self.method, self.url, self.headers, self.body, t
            )
            return await self._proxied.__aenter__()
        await pool._take_slot(op, t, deadline)
        try:
            self._response = await pool._start(op, self, target, deadline)
        except BaseException:
            op.slots.release()
            raise
        self._op = op
        return self._response

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._proxied is not None:
            await self._proxied.__aexit__(exc_type, exc, tb)
            return
        op, response = self._op, self._response
        assert op is not None
        assert response is not None
        response.detached = True
        pool, conn = self.pool, response.conn
        try:
            if exc_type is None and not pool._closed and conn.recycle(trio.current_time()):
                op.idle.append(conn)
                pool._idle += 1
                if not op.sweep_pending:
                    pool._schedule_idle_sweep(op)
            else:
                await pool._discard(conn)
        finally:
            op.slots.release()


@attrs.define
class UpstreamPool:
    """Keep-alive HTTP/1.1 connections per origin, bounded; see the module docstring."""

    max_connections_per_origin: int = attrs.field(default=100, validator=attrs.validators.ge(1))
    idle_timeout_s: float = 90
    ssl_context: ssl.SSLContext = attrs.field(default=None, converter=_ssl_or_default, repr=False)
    timeouts: UpstreamTimeouts = attrs.field(factory=UpstreamTimeouts)
    proxy_env: Mapping[str, str] = attrs.field(default=None, converter=_env_or_os, repr=False)
    _origins: dict[tuple[str, str, int], _OriginPool] = attrs.field(init=False, factory=dict)
    _routes: dict[str, tuple[_OriginPool, bytes]] = attrs.field(
        init=False, factory=dict, repr=False
    )
    _proxy: ProxyTransport | None = attrs.field(init=False, default=None, repr=False)
    #: Bounds head and body waits without a cancel scope each, once ``run`` by the owner
    #: (``App`` starts it in the nursery tree); until then every wait is a cancel scope.
    watch: SlowWatch = attrs.field(factory=lambda: SlowWatch(interval_s=WATCH_INTERVAL_S))
    _open: int = attrs.field(init=False, default=0)
    _idle: int = attrs.field(init=False, default=0)
    _closed: bool = attrs.field(init=False, default=False)

    @property
    def open_connections(self) -> int:
        """Sockets the direct transport has open now, idle and busy."""
        return self._open

    @property
    def idle_connections(self) -> int:
        return self._idle

    def request(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body = b"",
        timeouts: UpstreamTimeouts | None = None,
        deadline: float | None = None,
    ) -> AbstractAsyncContextManager[UpstreamResponse]:
        """``async with pool.request(...) as resp``: send one request, yield its response.

        ``headers`` must not carry framing (Host, Content-Length, Transfer-Encoding,
        Connection): the pool writes its own. A bytes body is sent with Content-Length, an
        async iterable one chunked, as it is produced. ``deadline`` (trio time) tightens
        ``total_s`` for this exchange: every wait in it, up to the last body byte read
        inside the block, raises :class:`UpstreamTimeout` once it passes (so a caller's
        per-attempt bound needs no cancel scope of its own)."""
        if self._closed:
            raise trio.ClosedResourceError("the upstream pool is closed")
        t = timeouts or self.timeouts
        return _Exchange(self, method, url, headers, body, t, deadline)

    async def prune_idle(self) -> int:
        """Close idle connections that expired or that the peer closed; return how many.
        Checkout does this lazily; an owner may also call it from a periodic task."""
        now, pruned = trio.current_time(), 0
        for op in self._origins.values():
            stale = [c for c in op.idle if not c.usable(now, self.idle_timeout_s)]
            op.idle[:] = [c for c in op.idle if c not in stale]
            self._idle -= len(stale)
            pruned += len(stale)
            for conn in stale:
                await self._discard(conn)
        return pruned

    def _schedule_idle_sweep(self, op: _OriginPool) -> None:
        """Have ``watch`` close ``op``'s longest-idle connection when it expires (see
        "Idle expiry" in the module docstring). Without a running ``watch`` (a pool used on
        its own), checkout and :meth:`prune_idle` still drop expired connections."""
        if op.idle and self.watch.running:
            op.sweep_pending = True
            due = op.idle[0].idle_since + self.idle_timeout_s
            self.watch.add(op, partial(self._sweep_idle, op), due)

    def _sweep_idle(self, op: _OriginPool) -> None:
        """The sweeper's callback: close ``op``'s expired idle connections at once. They
        run no request, so their sockets are closed synchronously (a TLS connection skips
        close_notify, as any abrupt close of an idle connection would, RFC 8446 §6.1)."""
        op.sweep_pending = False
        idle, now, expired = op.idle, trio.current_time(), 0
        while expired < len(idle) and now - idle[expired].idle_since >= self.idle_timeout_s:
            idle[expired].sock.close()
            expired += 1
        if expired:
            del idle[:expired]
            self._idle -= expired
            self._open -= expired
        self._schedule_idle_sweep(op)

    async def aclose(self) -> None:
        """Close idle connections now; busy ones close when their request ends."""
        self._closed = True
        for op in self._origins.values():
            self.watch.discard(op)
            op.sweep_pending = False
            while op.idle:
                self._idle -= 1
                await self._discard(op.idle.pop())
        if self._proxy is not None:
            await self._proxy.aclose()

    async def __aenter__(self) -> UpstreamPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def _route(self, url: str) -> tuple[_OriginPool, bytes]:
        hit = self._routes.get(url)
        if hit is not None:
            return hit
        parts = urlsplit(url)
        scheme, host = parts.scheme.lower(), parts.hostname
        if scheme not in ("http", "https") or not host:
            raise ValueError(f"unsupported upstream URL (scheme {scheme!r})")  # no query: secrets
        if parts.username is not None or parts.password is not None:
            raise ValueError("credentials in upstream URLs are not supported; send a header")
        host = host if host.isascii() else host.encode("idna").decode()
        port = parts.port or (443 if scheme == "https" else 80)
        op = self._origins.get((scheme, host, port)) or self._new_origin(scheme, host, port)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if len(self._routes) >= _ROUTE_CACHE_MAX:
            self._routes.clear()
        route = self._routes[url] = (op, target.encode("ascii"))
        return route

    def _new_origin(self, scheme: str, host: str, port: int) -> _OriginPool:
        proxy = None
        if any(
            self.proxy_env.get(name) or self.proxy_env.get(name.upper()) for name in _PROXY_VARS
        ):
            from runestone_proxy.server.upstream_httpx import proxy_for  # imports httpx

            proxy = proxy_for(scheme, host, port, self.proxy_env)
        origin = Origin.of(scheme, host, port, proxy)
        op = _OriginPool(origin, trio.Semaphore(self.max_connections_per_origin))
        self._origins[(scheme, host, port)] = op
        return op

    def _proxy_transport(self) -> ProxyTransport:
        if self._proxy is None:
            from runestone_proxy.server.upstream_httpx import ProxyTransport

            limit, idle_s = self.max_connections_per_origin, self.idle_timeout_s
            self._proxy = ProxyTransport(self.ssl_context, limit, idle_s)
        return self._proxy

    async def _take_slot(self, op: _OriginPool, t: UpstreamTimeouts, deadline: float) -> None:
        try:
            op.slots.acquire_nowait()  # the common case: no wait, no cancel scope
            return
        except trio.WouldBlock:
            pass
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + t.connect_s)):
            await op.slots.acquire()
            return
        what = f"no free connection (max {self.max_connections_per_origin} per origin)"
        raise timed_out(op.origin.label, what, t.connect_s, t, deadline)

    async def _start(
        self, op: _OriginPool, ex: _Exchange, target: bytes, deadline: float
    ) -> H11Response:
        """Checkout, send, read the head; retry once on a fresh connection if allowed."""
        t = ex.timeouts
        conn = await self._checkout(op, t, deadline)
        while True:
            try:
                return await conn.start(ex.method, target, ex.headers, ex.body, t, deadline)
            except EarlyClose as exc:
                await self._discard(conn)
                if not (conn.reused and _may_replay(exc, ex.method, ex.headers)):
                    raise UpstreamConnectError(f"upstream {op.origin.label}: {exc}") from exc
            except BaseException:
                await self._discard(conn)
                raise
            conn = await self._connect(op, t, deadline)  # fresh, so never retried again

    async def _checkout(
        self, op: _OriginPool, t: UpstreamTimeouts, deadline: float
    ) -> H11Connection:
        idle = op.idle
        if idle:
            now = trio.current_time()
            while idle:
                conn = idle.pop()
                self._idle -= 1
                if conn.usable(now, self.idle_timeout_s):
                    conn.reused = True
                    return conn
                await self._discard(conn)
        return await self._connect(op, t, deadline)

    async def _connect(
        self, op: _OriginPool, t: UpstreamTimeouts, deadline: float
    ) -> H11Connection:
        conn = await H11Connection.connect(op.origin, self.ssl_context, t, deadline)
        conn.watch = self.watch
        self._open += 1
        return conn

    async def _discard(self, conn: H11Connection) -> None:
        self._open -= 1
        await conn.aclose()


if TYPE_CHECKING:
    from runestone_proxy.gateway.transport import Response, Transport
    from runestone_proxy.server.upstream_httpx import HttpxResponse

    def _fits(
        pool: UpstreamPool, direct: H11Response, proxied: HttpxResponse
    ) -> tuple[Transport, Response, Response]:
        """mypy's proof that both transports fit the gateway's interface (never run)."""
        return pool, direct, proxied
