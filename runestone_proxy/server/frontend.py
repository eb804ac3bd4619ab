"""The Frontend: what every connection hands its requests to.

The API's :class:`~runestone_proxy.api.dispatch.Dispatcher` (route table, config, lifecycle
phase, health components, ``dispatch`` with its error envelope), plus what the connections
share: how many are open, the draining signal, and the slow-request watch.
"""

from __future__ import annotations

import attrs
import trio

from runestone_proxy.api.dispatch import Dispatcher
from runestone_proxy.server.slowwatch import SlowWatch


@attrs.define(eq=False)
class Frontend(Dispatcher):
    open_connections: int = 0
    #: Set when draining starts: connections stop taking new requests (h1 answers with
    #: ``Connection: close``, idle keep-alives close, h2 sends GOAWAY) and let work finish.
    draining: trio.Event = attrs.Factory(trio.Event)
    #: Arms HTTP/1.1 disconnect watching for requests still running after a few ms.
    slow_watch: SlowWatch = attrs.Factory(SlowWatch)
    #: Set whenever ``open_connections`` drops to zero (the drain waits on a fresh one).
    connections_idle: trio.Event = attrs.Factory(trio.Event)
