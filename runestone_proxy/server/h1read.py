"""How an HTTP/1.1 server connection reads requests: without h11 while it can, else on h11.

:class:`RequestReader` is a mixin of :class:`~runestone_proxy.server.h1conn.H1Connection`
(as :class:`~runestone_proxy.server.fdstream.FdStream` is): the request loop there calls
:meth:`RequestReader.next_request`, the responder and the watcher call the rest. It owns
the choice between the two readers and the hand-over from one to the other (see "What a
request costs" in :mod:`.h1conn`):

* **Fast**: while no request needs h11, ``proto`` is None and the connection keeps what it
  received in ``buffer``; :func:`~runestone_proxy.protocol.h1request.parse_request_head`
  reads each head; a request whose body is all here runs as it is (``raw`` holds its
  bytes).
* **On h11**: a head the parser declines, a body still to come, an error to answer, a
  response only h11 writes: :meth:`RequestReader.take_h11` makes the state machine from the
  same bytes (the current request's replayed: the parser reads nothing h11 would not) and
  the request goes on as h11 says. After the response, :meth:`RequestReader.back_to_fast`
  hands h11's leftovers (pipelined bytes, EOF) back to ``buffer``.

Both readers move the connection through the same phases (the table in
:mod:`runestone_proxy.protocol.h1`) with the same deadlines.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import h11
import trio

from runestone_proxy import errors
from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.h1 import Phase, request_error
from runestone_proxy.protocol.h1request import RequestHead, parse_request_head
from runestone_proxy.server.fdstream import FdStream

#: A request whose wait left less than this on the connection's deadline gets none at once
#: (see _head_done); otherwise only once it runs longer than h1watch.WATCH_AFTER_S.
_DEADLINE_MARGIN_S = 1.0
#: How early (as a share of the timeout) a keep-alive or header deadline may fire: a wait
#: keeps the deadline an earlier wait set if it is this close to its own (see _first_wait).
_DEADLINE_SLACK = 0.02
#: Reads a request head may take on the fast path (one is usual); more go to h11.
_FAST_READS = 3


class RequestReader(FdStream):
    """The request-reading half of a server connection (a mixin: the fields are the
    connection's, declared here; no ``__slots__``, since it assigns them)."""

    limits: LimitsConfig
    proto: h11.Connection | None
    buffer: bytes
    eof: bool
    raw: bytes
    closing: bool
    scope: trio.CancelScope
    phase: Phase
    max_head: int

    if TYPE_CHECKING:  # the connection's own (server/h1conn.py), declared for the checker

        async def _reject(self, exc: errors.GatewayError) -> None:
            """Answer an error found before any handler ran, then close."""

    def take_h11(self) -> h11.Connection:
        """The connection's h11 state machine, made on first need from the bytes read so far:
        the current request's (``raw``, which it parses again, up to its end) and the rest
        (``buffer``, EOF). The request then continues on h11 as if h11 had read it."""
        proto = self.proto
        if proto is not None:
            return proto
        proto = self.proto = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        raw, self.raw = self.raw, b""
        proto.receive_data(raw + self.buffer)
        self.buffer = b""
        if self.eof:
            proto.receive_data(b"")
        if raw:  # parsed fast, so h11 reads it too (the property tests hold it): a
            # Request, its Data if any (all here), EndOfMessage.
            for _ in range(3):
                if type(proto.next_event()) is h11.EndOfMessage:
                    break
        return proto

    def request_read(self) -> bool:
        """Whether the current request was read to its end (a fast one always is)."""
        return self.proto is None or self.proto.their_state is h11.DONE

    def http11(self) -> bool:
        """Whether the client speaks HTTP/1.1 (a fast request always does)."""
        return self.proto is None or self.proto.their_http_version == b"1.1"

    def pipelined(self, data: bytes) -> None:
        """Bytes the watcher read behind the current request, kept for the next one."""
        if self.proto is None:
            self.buffer += data
        else:
            self.proto.receive_data(data)

    def back_to_fast(self, proto: h11.Connection) -> None:
        """After a response on h11: what it holds (pipelined bytes, EOF) goes back to
        ``buffer``, and the next request is read without it."""
        data, closed = proto.trailing_data
        self.buffer, self.eof, self.proto = bytes(data), closed, None

    async def next_request(self) -> RequestHead | h11.Request | None:
        """Read until a request head; answer and return None on errors or EOF. The keep-alive
        and header timeouts fire the connection scope (``serve`` answers the 408). Without
        h11 while the request allows it (see "What a request costs")."""
        if self.proto is None:
            request = await self._next_request_fast()
            if request is not False:
                return request
        # A request's clock runs once it waited (IDLE or HEAD), not yet after the last one.
        return await self._next_request_h11(self.take_h11(), self.phase is not Phase.BUSY)

    async def _next_request_fast(self) -> RequestHead | Literal[False] | None:
        """:meth:`next_request` without h11: a request whose head the parser reads and
        whose body is all here; None at EOF; False to hand the bytes to h11. A head
        that takes more than :data:`_FAST_READS` reads (a trickle) goes to h11, whose
        buffer does not copy and rescan what it holds on every read."""
        waiting = False
        reads = 0
        while True:
            buf = self.buffer
            head = parse_request_head(buf, self.max_head) if buf else None
            if type(head) is RequestHead:
                end = head.size + head.length
                if len(buf) < end and self.fd >= 0 and not self.eof:
                    # A client may write the body after the head (two segments): it is
                    # often here already.
                    more = self.read_ready()
                    if more is not None:
                        buf = self.buffer = buf + more
                        self.eof = not more
                if len(buf) < end:
                    return False  # the body is still coming: h11 streams it
                self.raw, self.buffer = buf[:end], buf[end:]
                self._head_done()
                return head
            if head is not None or self.eof:
                return None if not buf else False  # Unusual, or EOF mid-head: h11's
            if not waiting:
                waiting = True
                self._first_wait(bool(buf))
                if not buf and self.closing:
                    return None
            elif self.phase is Phase.IDLE:
                self._bytes_came()
            if reads == _FAST_READS:
                return False
            data = await self.receive(waiting=self.phase is Phase.IDLE)
            reads += 1
            if not data:
                self.eof = True
            else:
                self.buffer = buf + data if buf else data

    def _head_done(self) -> None:
        """A whole request head (HEAD_DONE): the handler runs."""
        self.phase = Phase.BUSY
        scope = self.scope
        if scope.deadline - trio.current_time() < _DEADLINE_MARGIN_S:
            scope.deadline = math.inf
        # Otherwise the wait's deadline stays while the handler runs: most answer in well
        # under _DEADLINE_MARGIN_S, and one still running after WATCH_AFTER_S lifts it
        # (_arm_watch). One deadline move per request.

    def _first_wait(self, buffered: bool) -> None:
        """A request's first wait for bytes starts its clock (WAIT_BUFFERED, WAIT_EMPTY)."""
        self.phase = Phase.HEAD if buffered else Phase.IDLE
        limits = self.limits
        timeout = limits.header_timeout_s if buffered else limits.keepalive_timeout_s
        due = trio.current_time() + timeout
        # A busy connection waits many times a second; moving a deadline is a heap
        # operation. One already within _DEADLINE_SLACK of the timeout is kept.
        if not due - timeout * _DEADLINE_SLACK <= self.scope.deadline <= due:
            self.scope.deadline = due

    def _bytes_came(self) -> None:
        """Bytes came, but not yet a whole head (the usual first read is one): the header
        timeout applies from now on (BYTES)."""
        self.phase = Phase.HEAD
        self.scope.deadline = trio.current_time() + self.limits.header_timeout_s

    async def _next_request_h11(self, proto: h11.Connection, waiting: bool) -> h11.Request | None:
        """:meth:`next_request` on h11; ``waiting``: the request's clock runs already."""
        while True:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(request_error(exc, proto.trailing_data[0], self.limits))
                return None
            if type(event) is h11.Request:
                self._head_done()
                return event
            if event is not h11.NEED_DATA:
                # ConnectionClosed (EOF between requests) or PAUSED: nothing more to serve.
                return None
            if not waiting:  # the first wait for this request starts its clock
                waiting = True
                buffered = proto.their_state is not h11.IDLE or bool(proto.trailing_data[0])
                if not buffered and self.closing:
                    return None
                self._first_wait(buffered)
            elif self.phase is Phase.IDLE:
                self._bytes_came()
            # Between requests, a client (one that does not pipeline) is still reading our
            # answer: its next request cannot be here yet.
            data = await self.receive(waiting=self.phase is Phase.IDLE)
            proto.receive_data(data)
            if not data and not proto.trailing_data[0]:
                return None
