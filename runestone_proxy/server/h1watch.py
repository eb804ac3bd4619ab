"""The watcher of a running HTTP/1.1 request: it feeds the body, then notices the client leave.

While a handler runs, the connection's reading moves here (one reader at a time: the
request loop waits for ``watch_done`` before it reads again). With a body still to come,
the watcher feeds it to the handler through a bounded channel, so a slow handler
back-pressures the client, holding each read to the body's pace (``protocol/slowclient``)
and the whole body to ``max_body_bytes``. After the body it keeps reading: EOF means the
client went away, and it cancels the connection scope at once, so upstream work stops too.
Pipelined bytes that arrive meanwhile stay buffered (:meth:`H1Connection.pipelined
<runestone_proxy.server.h1conn.H1Connection.pipelined>`), bounded by
``max_pipelined_requests`` heads. :meth:`H1Connection._arm_watch
<runestone_proxy.server.h1conn.H1Connection._arm_watch>` starts it in the connection's
nursery, from the request itself or from the slow-request sweeper.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import h11
import trio

from runestone_proxy import errors
from runestone_proxy.protocol.h1 import request_error, too_large
from runestone_proxy.server.slowbody import body_pace, body_timeout

if TYPE_CHECKING:
    from runestone_proxy.server.h1conn import H1Connection

#: Delay before the watcher starts reading for EOF (disconnects are noticed within this).
WATCH_AFTER_S = 0.02


async def watch(
    conn: H1Connection,
    body: trio.MemorySendChannel[bytes | errors.GatewayError] | None,
    conn_scope: trio.CancelScope,
    received: int,
    watch_scope: trio.CancelScope,
    delay: bool = True,
) -> None:
    """Feed the body to the handler, then notice the client leaving (EOF) and cancel it.

    Runs in the connection's nursery (no nursery per request); ``watch_scope`` is
    cancelled when the request ends. Once it reads the socket it sets ``watch_done`` on
    exit so the connection never has two readers."""
    if watch_scope.cancel_called:
        # The request ended between start_soon and now, and the connection may already
        # be reading the next one: this watcher must not become a second reader.
        return
    with watch_scope:
        if body is None and delay:
            # Most handlers answer within milliseconds; watching the socket costs epoll
            # syscalls per request, so start only once the handler has run a while.
            await trio.sleep(WATCH_AFTER_S)
        done = conn.watch_done = trio.Event()
        try:
            if body is not None:
                await _feed_body(conn, body, conn_scope, received)
            await _watch_eof(conn, conn_scope)
        finally:
            done.set()


async def _watch_eof(conn: H1Connection, conn_scope: trio.CancelScope) -> None:
    # Body complete: keep reading so EOF is noticed promptly. Pipelined bytes are
    # buffered in h11 (bounded); past the bound we stop reading until the response is done.
    budget = conn.limits.max_pipelined_requests * (
        conn.limits.max_request_line_bytes + conn.limits.max_header_bytes
    )
    while budget > 0:
        data = await conn.receive()
        if not data:
            conn_scope.cancel()
            return
        budget -= len(data)
        conn.pipelined(data)
    await trio.sleep_forever()


async def _feed_body(
    conn: H1Connection,
    body: trio.MemorySendChannel[bytes | errors.GatewayError],
    conn_scope: trio.CancelScope,
    received: int,
) -> None:
    body_done = False
    pace, started = body_pace(conn.limits), trio.current_time()
    proto = conn.take_h11()  # a body that streams in is read by h11
    async with body:
        while not body_done:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError as exc:
                conn.closing = True
                await body.send(request_error(exc, proto.trailing_data[0], conn.limits))
                return
            if event is h11.NEED_DATA:
                # Per read, and a minimum rate for the whole body (protocol/slowclient.py).
                with trio.move_on_at(pace.deadline(trio.current_time(), started, received)):
                    data = await conn.receive()
                    proto.receive_data(data)
                    if not data:
                        conn_scope.cancel()
                        return
                    continue
                # Set before the send: the handler answers as soon as it receives this.
                conn.closing = True
                await body.send(body_timeout(pace, started, received))
                return
            if isinstance(event, h11.Data):
                received += len(event.data)
                if received > conn.limits.max_body_bytes:
                    conn.closing = True
                    await body.send(too_large(conn.limits))
                    return
                await body.send(event.data)
            elif isinstance(event, h11.EndOfMessage):
                body_done = True
            else:
                return
