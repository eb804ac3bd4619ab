"""What the bench's own servers share: listen on 127.0.0.1, announce the port, serve.

A bench server is started as ``python -m bench.<name> --port 0``; once it listens it prints
its port alone on the first line of stdout, so the parent never has to guess or race for
one (:func:`bench.procs.spawn` reads that line).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from collections.abc import Awaitable, Callable

import h11
import trio

from runestone_proxy.server.listener import BACKOFF_S, CAPACITY_ERRNOS, waiting_connections

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]
MAX_RECV = 65536


async def next_request(
    stream: trio.SocketStream, conn: h11.Connection
) -> tuple[h11.Request, bytes] | None:
    """The next request on a server-side h11 connection and its whole body, or None once the
    client closed (or paused without a next request). h11 and stream errors propagate."""
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(MAX_RECV))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return request, bytes(body)
        else:
            return None


def server_args(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1", help="bind address (loopback only)")
    parser.add_argument("--port", type=int, default=0, help="0: let the OS choose")
    return parser


async def announce_and_serve(handler: StreamHandler, host: str, port: int) -> None:
    """Listen, print the bound port on stdout, then serve ``handler`` until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host, backlog=1024)
    bound = listeners[0].socket.getsockname()[1]
    sys.stdout.write(f"{bound}\n")
    sys.stdout.flush()
    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(_accept_loop, listener, handler, nursery)


async def _accept_loop(
    listener: trio.SocketListener, handler: StreamHandler, nursery: trio.Nursery
) -> None:
    """Accept like the gateway does (``multi_accept``): after each awaited accept, take what
    else is queued without yielding. ``trio.serve_listeners`` takes one connection per
    scheduler pass, so a busy fake upstream took seconds to accept the connections a
    gateway opens on demand, and the bench charged that to the gateway."""
    backlog = socket.socket(fileno=os.dup(listener.socket.fileno()))
    backlog.setblocking(False)
    async with listener:
        try:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in CAPACITY_ERRNOS:
                        raise
                    await trio.sleep(BACKOFF_S)  # out of descriptors: as serve_listeners does
                    continue
                nursery.start_soon(handler, stream)
                for stream in waiting_connections(backlog):
                    nursery.start_soon(handler, stream)
        finally:
            backlog.close()


def run(handler: StreamHandler, host: str, port: int) -> None:
    """``trio.run`` the server; Ctrl-C / SIGINT exits quietly."""
    try:
        trio.run(announce_and_serve, handler, host, port)
    except KeyboardInterrupt:
        pass
