"""Accept loops: the connection cap, TLS with ALPN, and HTTP/2-or-HTTP/1.1 sniffing.

Each accepted connection becomes one task in the *connections* nursery handed in by
``app.py``, not in the accept loop's own nursery: stopping the accept loops (the first step of
a drain) closes the listening sockets without touching the connections that are mid-request.

Protocol choice (RFC 9113 §3): over TLS, ALPN decides (``h2`` or ``http/1.1``); in cleartext,
a connection whose first 24 bytes are the HTTP/2 client preface is h2c with prior knowledge,
and anything else is HTTP/1.1. Sniffing costs nothing for HTTP/1.1: the first read of a
request is almost always longer than the preface and differs from it at the first byte.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl
from collections.abc import Iterator

import structlog
import trio

from runestone_proxy.config import ServerConfig
from runestone_proxy.errors import ServiceUnavailable
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h1conn import serve_h1
from runestone_proxy.server.h2conn import serve_h2

log = structlog.get_logger("runestone.listener")

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Out of file descriptors or buffers: back off instead of spinning (as trio.serve_listeners).
CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}
BACKOFF_S = 0.1
#: Connections taken from the backlog per wake-up of the accept loop, at most.
ACCEPT_BATCH = 256


def make_ssl_context(server: ServerConfig) -> ssl.SSLContext | None:
    """A server TLS context offering ALPN ``h2`` then ``http/1.1``; None without a cert."""
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(server.tls_cert, server.tls_key)
    context.set_alpn_protocols(["h2", "http/1.1"])
    return context


def _peer(stream: trio.abc.Stream) -> str | None:
    sock = getattr(stream, "socket", None)
    try:
        host, port, *_ = sock.getpeername() if sock is not None else (None, None)
    except (OSError, ValueError):
        return None
    return None if host is None else f"{host}:{port}"


async def _refuse(stream: trio.abc.Stream) -> None:
    """Over the connection cap: a short 503 (nginx would drop; a status helps clients)."""
    body = ServiceUnavailable("Too many open connections; retry shortly.").body()
    head = (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"connection: close\r\nretry-after: 1\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
    )
    with trio.move_on_after(1):
        try:
            await stream.send_all(head + body)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
    await trio.aclose_forcefully(stream)


async def handle_connection(
    stream: trio.abc.Stream, gateway: Frontend, ssl_context: ssl.SSLContext | None
) -> None:
    """Pick the protocol and serve the connection. Never raises (convention 7)."""
    client = _peer(stream)
    limits = gateway.config.limits
    try:
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True, https_compatible=True)
            with trio.fail_after(limits.header_timeout_s):
                await tls.do_handshake()
            if tls.selected_alpn_protocol() == "h2":
                await serve_h2(tls, gateway, client=client)
            else:
                await serve_h1(tls, gateway, client=client)
            return
        data = b""
        with trio.fail_after(limits.header_timeout_s):
            while len(data) < len(H2_PREFACE) and H2_PREFACE.startswith(data):
                chunk = await stream.receive_some(65536)
                if not chunk:
                    await trio.aclose_forcefully(stream)
                    return
                data += chunk
        if data.startswith(H2_PREFACE):
            await serve_h2(stream, gateway, initial=data, client=client)
        else:
            await serve_h1(stream, gateway, initial=data, client=client)
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        await trio.aclose_forcefully(stream)
    except ssl.SSLError:
        await trio.aclose_forcefully(stream)
    except Exception:
        log.exception("connection.crashed", client=client)
        await trio.aclose_forcefully(stream)


async def accept_loop(
    listener: trio.SocketListener,
    gateway: Frontend,
    connections: trio.Nursery,
    *,
    ssl_context: ssl.SSLContext | None = None,
    capped: bool = True,
    batch: int = ACCEPT_BATCH,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Accept until cancelled; each connection runs in ``connections``. Closes the socket.

    trio's ``accept`` yields to the scheduler once per connection, so under load a burst of
    N connects waits N scheduler rounds for its last connection (hundreds of milliseconds of
    tail latency when a pool of clients reconnects). After each awaited accept, the backlog
    is drained without yielding through a non-blocking duplicate of the listening socket, as
    nginx's ``multi_accept`` does, up to ``batch`` at a time. Workers sharing one socket
    (``server.workers`` > 1) pass ``batch=0``: the first worker to wake would otherwise
    take a whole burst, and accepting one connection per wake-up spreads it over them."""

    def admit(stream: trio.SocketStream) -> None:
        if capped:
            if gateway.open_connections >= gateway.config.limits.max_connections:
                connections.start_soon(_refuse, stream)
                return
            # Counted here, not in the new task: a burst of accepts runs before any of the
            # tasks it starts, and each must see the ones before it.
            gateway.open_connections += 1
        connections.start_soon(_tracked, stream, gateway, ssl_context, capped)

    async with listener:
        backlog = socket.socket(fileno=os.dup(listener.socket.fileno()))
        try:
            backlog.setblocking(False)
            task_status.started()
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno in CAPACITY_ERRNOS:
                        log.error("listener.accept.capacity", error=exc.strerror)
                        await trio.sleep(BACKOFF_S)
                        continue
                    raise
                admit(stream)
                for stream in waiting_connections(backlog, batch):
                    admit(stream)
        finally:
            backlog.close()


def waiting_connections(
    backlog: socket.socket, limit: int = ACCEPT_BATCH
) -> Iterator[trio.SocketStream]:
    """The connections already queued on a listening socket, accepted without yielding to
    the scheduler, up to ``limit``. ``backlog`` is a non-blocking duplicate of the listening
    socket (``socket.socket(fileno=os.dup(fd))`` then ``setblocking(False)``), so the
    trio listener's own socket is left alone."""
    for _ in range(limit):
        try:
            sock, _ = backlog.accept()
        except OSError:
            return  # drained (EAGAIN), or an error the awaited accept will report
        yield trio.SocketStream(trio.socket.from_stdlib_socket(sock))


async def _tracked(
    stream: trio.abc.Stream, gateway: Frontend, ssl_context: ssl.SSLContext | None, capped: bool
) -> None:
    """Serve one connection that ``accept_loop`` counted (when ``capped``); uncount it."""
    try:
        await handle_connection(stream, gateway, ssl_context)
    finally:
        if capped:
            gateway.open_connections -= 1
            if gateway.open_connections == 0:
                gateway.connections_idle.set()
