"""What the bench's own servers share: listen on 127.0.0.1, announce the port, serve.

A bench server is started as ``python -m bench.<name> --port 0``; once it listens it prints
its port alone on the first line of stdout, so the parent never has to guess or race for
one (:func:`bench.procs.spawn` reads that line).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable

import trio

StreamHandler = Callable[[trio.SocketStream], Awaitable[None]]


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
    await trio.serve_listeners(handler, listeners)


def run(handler: StreamHandler, host: str, port: int) -> None:
    """``trio.run`` the server; Ctrl-C / SIGINT exits quietly."""
    try:
        trio.run(announce_and_serve, handler, host, port)
    except KeyboardInterrupt:
        pass
