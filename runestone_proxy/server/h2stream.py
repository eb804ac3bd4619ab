"""One HTTP/2 stream as a handler sees it: the request's body source and its responder.

:mod:`~runestone_proxy.server.h2conn` makes one :class:`H2Stream` per request and passes it
to ``Frontend.dispatch`` twice over: as the :class:`Request`'s ``body_source`` and as the
``Responder``. Everything here runs in that stream's own task; the connection's reader only
appends to it and wakes it.

How this works:

* Request body. The reader appends each DATA payload with its flow-controlled length
  (padding included) and unparks :meth:`H2Stream.receive`. Credit goes back to the client
  (``acknowledge_received_data``, RFC 9113 §6.9) only when the handler takes a chunk, so
  the client's window for this stream stays shut while the handler is busy. Each wait for
  more body is bounded by ``body_timeout_s``, and the body as a whole by a minimum rate
  after a grace period (:mod:`~runestone_proxy.protocol.slowclient`): a client that
  dribbles DATA gets 408 and the stream ends, freeing its slot on the connection.
* Response. Headers are lower-cased, stripped of connection-specific fields (RFC 9113
  §8.2.2) and given ``x-request-id``; ``respond`` adds ``content-length``. Data goes out in
  frames no larger than the stream's send window and the peer's SETTINGS_MAX_FRAME_SIZE
  (§6.5.2); at a shut window the stream parks until a WINDOW_UPDATE. One write (a whole
  response body, or one streamed chunk) may spend at most ``send_timeout_s`` in all waiting
  for window, as an HTTP/1.1 write must reach the socket within it: a client that opens
  its window a byte at a time (the HTTP/2 slow reader) cannot stretch it. Past that the
  stream resets itself with CANCEL. HEAD responses carry no body.
* Going away. ``gone`` marks a stream that no longer exists on the wire (reset by either
  side, or the connection is closing); whoever sets it also cancels :attr:`H2Stream.scope`.
  After every wait the stream checks it, so no h2 call is made for a dead stream and the
  handler sees Cancelled, never an h2 exception.
"""

from __future__ import annotations

import collections
import math
from typing import TYPE_CHECKING

import attrs
import trio
from h2.errors import ErrorCodes
from h2.exceptions import FlowControlError, FrameTooLargeError
from hpack import NeverIndexedHeaderTuple

from runestone_proxy.api.dispatch import new_request_id, valid_request_id
from runestone_proxy.api.http import HeaderList, Request
from runestone_proxy.protocol.h2headers import RequestHead
from runestone_proxy.server.slowbody import body_pace, body_timeout

if TYPE_CHECKING:
    from runestone_proxy.server.h2conn import H2ServerConnection

__all__ = ["H2Stream"]

# RFC 9113 §8.2.2: connection-specific header fields are malformed in HTTP/2 (``te`` is
# allowed only in requests, as "trailers").
_CONNECTION_HEADERS = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
#: Kept out of HPACK's dynamic table (RFC 7541 §7.1.3): credentials, as h2's own
#: normalisation did, and the values that change on every response.
_UNINDEXED = frozenset(
    {b"authorization", b"proxy-authorization", b"x-request-id", b"content-length"}
)


@attrs.define(eq=False, repr=False)
class H2Stream:
    """One exchange: the request's :class:`BodySource` and the handler's ``Responder``."""

    conn: H2ServerConnection
    sid: int
    head: bool
    #: The declared content-length is over ``max_body_bytes``: answer 413 unread.
    too_large: bool
    #: The cancel scope of the task serving this stream, which the connection may keep for
    #: later streams while none cancels it (h2conn): cancelling the stream cancels it.
    scope: trio.CancelScope
    #: The request's id, for the response's ``x-request-id``. The stream does not hold its
    #: :class:`Request` (which holds the stream as its body source): a cycle per request
    #: would leave every exchange to the cyclic garbage collector instead of freeing it at
    #: once, and the collector's passes were about 8% of an h2 request's CPU.
    request_id: str = ""
    #: The stream is gone from the wire (reset by either side, or the connection closes).
    gone: bool = False
    # Request body: (data, flow-controlled length) not yet read by the handler.
    chunks: collections.deque[tuple[bytes, int]] = attrs.Factory(collections.deque)
    unacked: int = 0
    #: Request body bytes received, and when the handler first waited for more (the rate's
    #: clock starts there: a body that arrived with its head never starts it).
    received: int = 0
    body_started: float | None = None
    body_ended: bool = False
    # Response.
    status: int = 0
    sent_bytes: int = 0
    ended: bool = False
    #: Where the stream's task waits for body or for window: one task, one wait at a time,
    #: so one lot, made at the first wait (most streams never wait). Every wake-up is
    #: re-checked by the waiting loop.
    _lot: trio.lowlevel.ParkingLot | None = None

    @classmethod
    def open(
        cls, conn: H2ServerConnection, sid: int, head: RequestHead, scope: trio.CancelScope
    ) -> tuple[H2Stream, Request]:
        """The stream for a request whose header block just arrived, checked and split
        (:func:`~runestone_proxy.protocol.h2headers.read_request`), and the request, whose
        body source it is."""
        method, path, fields, length, client_id = head
        raw_path, _, query = path.partition(b"?")
        limit = conn.limits.max_body_bytes
        request_id = (client_id and valid_request_id(client_id)) or new_request_id()
        too_large = length is not None and length.isdigit() and int(length) > limit
        st = cls(conn, sid, method == b"HEAD", too_large, scope, request_id)
        request = Request(
            method=method.decode("latin-1"),
            path=raw_path.decode("latin-1"),
            query=query.decode("latin-1"),
            headers=fields,
            http_version="2",
            body_source=st,
            request_id=request_id,
            client=conn.client,
            max_body_bytes=limit,
        )
        return st, request

    def __repr__(self) -> str:
        return f"<H2Stream {self.sid} status={self.status} gone={self.gone}>"

    # -- called by the connection's reader ---------------------------------------------------

    def on_data(self, data: bytes, flow: int) -> None:
        self.chunks.append((data, flow))
        self.unacked += flow
        self.received += len(data)
        self.wake()

    def on_end(self) -> None:
        self.body_ended = True
        self.wake()

    def wake(self) -> None:
        """Body, its end or window arrived: the task re-checks whatever it waits for."""
        if self._lot is not None:
            self._lot.unpark_all()

    async def _park(self) -> None:
        if self._lot is None:
            self._lot = trio.lowlevel.ParkingLot()
        await self._lot.park()

    def cancel(self) -> None:
        """The stream is gone: cancel its task (RST_STREAM, or the connection closes)."""
        self.gone = True
        self.scope.cancel()

    # -- BodySource --------------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next chunk of body, ``b""`` at its end. A body that is already here is read
        without yielding (as HTTP/1.1's ``BytesBody`` is): a checkpoint at its end cost
        every request one more trip through the scheduler."""
        while not self.chunks:
            if self.body_ended:
                return b""
            now, pace = trio.current_time(), body_pace(self.conn.limits)
            if self.body_started is None:
                self.body_started = now
            with trio.move_on_at(pace.deadline(now, self.body_started, self.received)) as waited:
                await self._park()
            if waited.cancelled_caught:
                raise body_timeout(pace, self.body_started, self.received)
            await self._alive()
        data, flow = self.chunks.popleft()
        self.unacked -= flow
        if self.body_ended and not self.chunks:
            # The body is all here: the stream's own window no longer matters (no more DATA
            # may come, RFC 9113 §5.1), only the connection's, whose credit is batched.
            if not self.conn.credit_connection(flow):
                return data
        else:
            self.conn.credit(self.sid, flow)
        if self.conn.queue_output():
            await self.conn.wait_writer()
        return data

    # -- Responder ---------------------------------------------------------------------------

    @property
    def started(self) -> bool:
        return self.status != 0

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        """Headers and body at once. The common small answer goes out in one HEADERS and
        one DATA frame queued together, with no await at all while the writer keeps up."""
        if self.gone:
            await self._alive()
        bodyless = self.head or not body
        self._send_headers(status, headers, len(body), end=bodyless)
        if bodyless or self._send_whole(body, end=True):
            if self.conn.queue_output():
                await self.conn.wait_writer()
                await self._alive()
        else:
            await self._send_framed(body, end=True)

    async def start(self, status: int, headers: HeaderList) -> None:
        await self._alive()
        self._send_headers(status, headers, None, end=self.head)
        await self.conn.flush()

    async def send(self, data: bytes) -> None:
        if not self.status or (self.ended and not self.head):
            raise RuntimeError("send() outside a started, unfinished response")
        if self.head or not data:
            await trio.lowlevel.checkpoint()
            return
        if self.gone:
            await self._alive()
        if not self._send_whole(data, end=False):
            await self._send_framed(data, end=False)
        elif self.conn.queue_output():
            await self.conn.wait_writer()
            await self._alive()

    async def finish(self) -> None:
        """End the response (END_STREAM) unless it already ended."""
        if not self.ended:
            await self._alive()
            self.conn.proto.end_stream(self.sid)
            self.ended = True
            await self.conn.flush()

    def _send_headers(
        self, status: int, headers: HeaderList, length: int | None, *, end: bool
    ) -> None:
        if self.status:
            raise RuntimeError("the response already started")
        # h2's outbound normalising and checking are off (h2conn): this loop does what they
        # did for a response: lower-case names, no connection-specific fields (RFC 9113
        # §8.2.2), no pseudo-fields from a handler (§8.3), values without surrounding
        # whitespace (§8.2.1), credentials never indexed. Values that differ on every
        # response (the request id, the length) are not indexed either: in HPACK's dynamic
        # table (RFC 7541 §2.3.2) they only push out the fields that repeat, and the
        # encoder searches the table entry by entry for every field it sends.
        block: list[tuple[bytes, bytes]] = [(b":status", b"%d" % status)]
        has_id = has_length = False
        for name, value in headers:
            name = name.lower()
            if name in _CONNECTION_HEADERS or name[:1] == b":":
                continue
            value = value.strip(b" \t")
            if name in _UNINDEXED:
                has_id = has_id or name == b"x-request-id"
                has_length = has_length or name == b"content-length"
                block.append(NeverIndexedHeaderTuple(name, value))
            else:
                block.append((name, value))
        if not has_id:
            block.append(NeverIndexedHeaderTuple(b"x-request-id", self.request_id.encode()))
        if length is not None and not has_length:
            block.append(NeverIndexedHeaderTuple(b"content-length", b"%d" % length))
        self.conn.proto.send_headers(self.sid, block, end_stream=end)
        self.status = status
        self.ended = end

    def _send_whole(self, data: bytes, *, end: bool) -> bool:
        """Queue ``data`` as one DATA frame if the stream's window and the peer's frame size
        allow it (most writes), else change nothing and return False. h2 checks both
        before it changes any state, so asking it is the cheapest way to know."""
        try:
            self.conn.proto.send_data(self.sid, data, end_stream=end)
        except (FlowControlError, FrameTooLargeError):
            return False
        self.sent_bytes += len(data)
        self.ended = end
        return True

    async def _send_framed(self, data: bytes, *, end: bool) -> None:
        """Send ``data`` in as many frames as the window and frame size take, waiting for
        window as needed (see the module docstring)."""
        proto = self.conn.proto
        view = memoryview(data)
        deadline = math.inf  # set at the first shut window: the whole write's bound
        while True:
            window = min(proto.local_flow_control_window(self.sid), proto.max_outbound_frame_size)
            if window <= 0:
                if deadline == math.inf:
                    deadline = trio.current_time() + self.conn.limits.send_timeout_s
                await self.conn.flush()
                await self._wait_window(deadline)
                continue
            size = min(window, len(view))
            last = size == len(view)
            proto.send_data(self.sid, view[:size], end_stream=end and last)
            self.sent_bytes += size
            if last:
                break
            view = view[size:]
        self.ended = end
        await self.conn.flush()
        await self._alive()

    async def _wait_window(self, deadline: float) -> None:
        await self._alive()
        with trio.move_on_at(deadline):
            while self.conn.proto.local_flow_control_window(self.sid) <= 0:
                await self._park()
                await self._alive()
            return
        # The client kept the window shut too long: a stream error (RFC 9113 §5.4.2).
        self.conn.reset(self, ErrorCodes.CANCEL)
        await self.conn.flush()
        await self._alive()

    async def _alive(self) -> None:
        """Raise Cancelled if the stream went away while this task was waiting."""
        if self.gone:
            self.scope.cancel()
            await trio.lowlevel.checkpoint()
