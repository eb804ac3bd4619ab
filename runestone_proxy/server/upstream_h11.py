"""One HTTP/1.1 connection to an upstream origin: connect, send, read the response.

The connection layer under :class:`~runestone_proxy.server.upstream.UpstreamPool`: a trio
stream (TCP, or TLS with SNI and hostname checks), the framing of its exchanges, and the
mapping of socket, TLS, h11 and timeout failures to :mod:`runestone_proxy.errors`.

Two ways to frame an exchange. The common one uses no h11 at all: a request with a bytes
body is written by :func:`~runestone_proxy.protocol.h1.request_head`, the response head
is read by :func:`~runestone_proxy.protocol.h1response.parse_response_head` and its body
by a :class:`~runestone_proxy.protocol.h1response.LengthDecoder` or
:class:`~runestone_proxy.protocol.chunked.ChunkedDecoder`; whether the connection may be
reused is the head's ``keep_alive`` and a body read to its end with nothing after it. An
h11 state machine is made only for an exchange that needs one (``proto``): a streamed
request body, a HEAD or CONNECT, a request head with an odd field, and any response head
the fast parser declines (1xx, 204/304, HTTP/1.0, odd bytes or framing: its module
docstring has the rule), which h11 then parses, or refuses, from the same bytes. After
such an exchange, if h11 would keep the connection and holds nothing unread, ``proto``
is dropped again: the next exchange starts on the fast path. The
pool decides which connection to use, and when to retry, reuse or close; this module does
the I/O of one exchange up to the response head; :mod:`.upstream_response` reads the body
(and defines the response base class both transports share). The values they exchange
(:class:`UpstreamTimeouts`, ``Headers``, ``Body``) are the domain's, in
:mod:`runestone_proxy.gateway.transport`.

Every wait is bounded by the earlier of the step's own limit (``connect_s``,
``first_byte_s``, ``between_chunks_s``) and the request's total deadline. The two waits on
the hot path (a response head, the next body bytes) register with the pool's sweeper
(:class:`~runestone_proxy.server.slowwatch.SlowWatch`) when it runs, which wakes an overdue
one with ``notify_closing``; every other wait, and these when no sweeper runs, is a cancel
scope (see :class:`~runestone_proxy.server.upstream_wait.Wait`).

Where the pieces live: the request head is written by
:func:`~runestone_proxy.protocol.h1.request_head` (sans-IO, shared with the listener's
response head); reads and writes take the raw-fd path of
:class:`~runestone_proxy.server.fdstream.FdStream`, the listener's too;
:mod:`.upstream_dial` opens and closes the stream; :mod:`.upstream_wait` bounds the waits.
"""

from __future__ import annotations

import select
import ssl
from collections.abc import AsyncIterable
from typing import Final, cast

import attrs
import h11
import trio

from runestone_proxy.errors import (
    UpstreamConnectError,
    UpstreamProtocolError,
)
from runestone_proxy.gateway.transport import Body, Headers, UpstreamTimeouts
from runestone_proxy.protocol.h1 import (
    BODYLESS,
    FRAMING_HEADERS,
    WITH_CONTENT,
    request_head,
    sent_request,
)
from runestone_proxy.protocol.h1response import (
    FRAMED_BY_REQUEST,
    ResponseHead,
    Unusual,
    parse_response_head,
)
from runestone_proxy.server.fdstream import FdStream
from runestone_proxy.server.slowwatch import SlowWatch
from runestone_proxy.server.upstream_dial import Origin, close, dial
from runestone_proxy.server.upstream_response import MAX_HEAD_BYTES, H11Response, timed_out
from runestone_proxy.server.upstream_wait import Wait

_END: Final = h11.EndOfMessage()
#: Reads a response head may take on the fast path (one is usual); a head that trickles in
#: goes to h11, whose buffer does not copy and rescan what it holds on every read.
_FAST_READS: Final = 4


class EarlyClose(Exception):
    """The peer closed or reset the connection before any byte of the response arrived."""

    def __init__(self, reason: str, *, during_send: bool, replayable: bool) -> None:
        super().__init__(reason)
        self.during_send = during_send
        self.replayable = replayable


@attrs.define(eq=False)
class H11Connection(FdStream):
    """One keep-alive connection. Used by one request at a time; the pool parks it between.
    Reads and writes take the raw-fd path of :class:`~runestone_proxy.server.fdstream.FdStream`
    on cleartext."""

    origin: Origin
    stream: trio.abc.Stream = attrs.field(repr=False)
    sock: trio.socket.SocketType = attrs.field(repr=False)
    #: The h11 state machine of an exchange that needs one (see the module docstring),
    #: else None: the fast path frames the exchange.
    proto: h11.Connection | None = attrs.field(default=None, repr=False)
    idle_since: float = 0.0
    reused: bool = False
    #: The socket's fd on a cleartext connection (the FdStream fast path), else -1.
    fd: int = -1
    #: The pool's sweeper: while it runs, head and body waits register with it (see Wait).
    watch: SlowWatch | None = attrs.field(default=None, repr=False)
    #: Set by the sweeper when a registered wait passed its due time.
    expired: bool = False
    #: The last response was read to its end beside h11, on a connection both sides keep
    #: alive, with nothing after it (:meth:`body_read`): ready for the next request.
    fresh: bool = False

    @classmethod
    async def connect(
        cls, origin: Origin, ssl_context: ssl.SSLContext, t: UpstreamTimeouts, deadline: float
    ) -> H11Connection:
        opened = await dial(origin, ssl_context, min(deadline, trio.current_time() + t.connect_s))
        if opened is None:
            raise timed_out(origin.label, "could not connect", t.connect_s, t, deadline)
        stream, tcp = opened
        fd = tcp.socket.fileno() if stream is tcp else -1
        return cls(origin, stream, tcp.socket, fd=fd)

    def expire(self) -> None:
        """The sweeper's callback for an overdue wait: wake it (``ClosedResourceError``, or a
        broken TLS stream); :class:`Wait` reports that as the timeout. The pool then
        discards the connection, as after any failed exchange."""
        self.expired = True
        trio.lowlevel.notify_closing(self.sock)

    def usable(self, now: float, idle_timeout_s: float) -> bool:
        """Whether an idle connection may carry another request: not expired, and nothing to
        read (an idle keep-alive peer has nothing to say; readable means it closed, RFC 9112
        §9.5). One zero-timeout poll(2)."""
        if now - self.idle_since >= idle_timeout_s:
            return False
        fd = self.sock.fileno()
        if hasattr(select, "poll"):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            return not poller.poll(0)
        return not select.select([fd], [], [], 0)[0]  # pragma: no cover (Windows)

    def recycle(self, now: float) -> bool:
        """After a response: ready the connection for the next one (RFC 9112 §9.3) if the
        body was read to its end, neither side asked to close, and the peer neither sent
        anything after the response (bytes no request asked for: such a peer is not
        trusted with another) nor closed (a body that ran to EOF). The fast path says so
        with :meth:`body_read`; after an exchange h11 framed, h11's states and buffer say
        it, and ``proto`` is dropped."""
        if self.fresh:
            self.fresh = False
        else:
            proto = self.proto
            if (
                proto is None
                or proto.our_state is not h11.DONE
                or proto.their_state is not h11.DONE
                or proto.trailing_data != (b"", False)  # bytes left, or EOF seen
            ):
                return False
            self.proto = None
        self.idle_since = now
        return True

    def body_read(self) -> None:
        """A response body decoded beside h11 ended cleanly on a keep-alive exchange with
        nothing after it: the next request starts on the fast path."""
        self.proto = None
        self.fresh = True

    def take_h11(self) -> h11.Connection:
        """A new h11 state machine for this exchange (see the module docstring)."""
        proto = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.proto = proto
        return proto

    async def aclose(self) -> None:
        await close(self.stream)

    def lost(self, exc: Exception) -> bytes:
        """A failed read raises: a reset as ``trio.BrokenResourceError`` naming the origin,
        the socket closed under a wait (the sweeper's expiry) as it came."""
        if isinstance(exc, OSError):
            raise trio.BrokenResourceError(f"upstream {self.origin.label}: {exc}") from exc
        raise exc

    async def start(
        self,
        method: str,
        target: bytes,
        headers: Headers,
        body: Body,
        t: UpstreamTimeouts,
        deadline: float,
    ) -> H11Response:
        """Send the request and read up to the response head. Raises :class:`EarlyClose`
        if the connection died before any response byte (the pool decides on a retry).

        With a bytes body, writing and waiting for the head share one bound:
        ``first_byte_s`` runs from the start of the write (one ``send_all``)."""
        origin = self.origin
        if isinstance(body, bytes):
            head = request_head(method, target, origin.host_header, headers, len(body))
            if head is not None:
                request = head + body if body else head
                return await self._exchange(request, method, t, deadline)
        proto = self.take_h11()
        fields = [(b"host", origin.host_header)]
        if not isinstance(body, bytes):
            fields.append((b"transfer-encoding", b"chunked"))  # RFC 9112 §7.1
        elif body or method in WITH_CONTENT:  # RFC 9110 §8.6: none for a GET without content
            fields.append((b"content-length", str(len(body)).encode()))
        for field in headers:
            if field[0].lower() not in FRAMING_HEADERS:
                fields.append(field)
        try:
            head = proto.send(h11.Request(method=method, target=target, headers=fields))
        except h11.LocalProtocolError as exc:
            raise ValueError(f"invalid upstream request to {origin.label}: {exc}") from exc
        if isinstance(body, bytes):
            if body:  # head and body in one write; under Content-Length, h11 passes body through
                parts = cast(list[bytes], proto.send_with_data_passthrough(h11.Data(data=body)))
                head = b"".join([head, *parts])
            proto.send(_END)  # writes nothing under Content-Length
            return await self._exchange(head, method, t, deadline)
        await self._send_streamed(proto, head, body, t, deadline)
        return await self._exchange(None, method, t, deadline)

    async def _exchange(
        self, request: bytes | None, method: str, t: UpstreamTimeouts, deadline: float
    ) -> H11Response:
        """Write ``request`` (a whole, replayable one; None when the body was streamed) and
        read the response head: with the fast parser when we wrote the request head
        ourselves (``proto`` is None), else, or when it declines the head, with h11.
        Writing and waiting share one bound (:class:`Wait`): ``first_byte_s`` runs from
        the start of the write."""
        label = self.origin.label
        replayable = request is not None
        with Wait(self, min(deadline, trio.current_time() + t.first_byte_s)):
            if request is not None:
                try:
                    await self.send_all(request)
                except trio.BrokenResourceError as exc:
                    raise EarlyClose(
                        "lost while sending", during_send=True, replayable=True
                    ) from exc
            proto = self.proto
            if proto is None:
                received, eof = b"", False
                if method not in FRAMED_BY_REQUEST:
                    head, received, eof = await self._receive_head_fast(replayable)
                    if head is not None:
                        return H11Response.fast(head, received, label, self, deadline, t)
                # h11 takes over as if it had written the request (its bytes are dropped)
                # and reads what came, or refuses it.
                proto = self.take_h11()
                proto.send(sent_request(method))
                proto.send(_END)
                if received:
                    proto.receive_data(received)
                if eof:
                    proto.receive_data(b"")
            event = await self._receive_head(replayable, bool(proto.trailing_data[0]))
            response = H11Response(event.status_code, list(event.headers), label, self, deadline, t)
            if method != "HEAD" and event.status_code not in BODYLESS:
                response.take_chunked(event)
            return response
        raise timed_out(label, "no response head", t.first_byte_s, t, deadline)

    async def _receive_head_fast(self, replayable: bool) -> tuple[ResponseHead | None, bytes, bool]:
        """Read until :func:`parse_response_head` has a head: it, the body bytes that came
        with it, False. If it declines the head, or the peer closes mid-head: None, every
        byte received, and whether the peer closed, for h11 to read (or refuse). A head that
        takes more than :data:`_FAST_READS` reads goes to h11 too (see there)."""
        buf = b""
        for _ in range(_FAST_READS):
            try:
                # Right after the request, or mid-head: the origin has yet to speak.
                data = await self.receive(waiting=True)
            except trio.BrokenResourceError as exc:
                if buf:
                    raise UpstreamConnectError(
                        f"upstream {self.origin.label}: reset in the head"
                    ) from exc
                raise EarlyClose(
                    "reset before the response", during_send=False, replayable=replayable
                ) from exc
            if not data:
                if not buf:
                    raise EarlyClose(
                        "closed before the response", during_send=False, replayable=replayable
                    )
                return None, buf, True
            buf = buf + data if buf else data
            head = parse_response_head(buf, MAX_HEAD_BYTES)
            if head is None:
                continue
            if isinstance(head, Unusual):
                return None, buf, False
            return head, buf[head.size :], False
        return None, buf, False

    async def _send_streamed(
        self,
        proto: h11.Connection,
        head: bytes,
        body: AsyncIterable[bytes],
        t: UpstreamTimeouts,
        deadline: float,
    ) -> None:
        """Chunked request body (RFC 9112 §7.1): one write per chunk, as the caller yields it,
        each within ``between_chunks_s``; the caller's producer counts against ``total_s``.
        Only the head can be replayed, so a retry is possible only before the first chunk."""
        with trio.CancelScope(deadline=deadline) as total:
            await self._send_within(head, t, deadline, replayable=True)
            async for chunk in body:
                if chunk:
                    data = cast(list[bytes], proto.send_with_data_passthrough(h11.Data(data=chunk)))
                    await self._send_within(b"".join(data), t, deadline, replayable=False)
            await self._send_within(proto.send(h11.EndOfMessage()), t, deadline, replayable=False)
        if total.cancelled_caught:
            raise timed_out(self.origin.label, "request body not sent", t.total_s, t, deadline)

    async def _send_within(
        self, data: bytes, t: UpstreamTimeouts, deadline: float, replayable: bool
    ) -> None:
        with trio.CancelScope(deadline=trio.current_time() + t.between_chunks_s) as scope:
            try:
                await self.send_all(data)
            except trio.BrokenResourceError as exc:
                raise EarlyClose(
                    "lost while sending", during_send=True, replayable=replayable
                ) from exc
        if scope.cancelled_caught:
            what = "request bytes not sent"
            raise timed_out(self.origin.label, what, t.between_chunks_s, t, deadline)

    async def _receive_head(self, replayable: bool, first_byte: bool) -> h11.Response:
        """Read the head through h11 (``proto``); ``first_byte``: bytes came already."""
        proto, label = self.proto, self.origin.label
        assert proto is not None
        while True:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"upstream {label}: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    # Right after the request, or mid-head: the origin has yet to speak.
                    data = await self.receive(waiting=True)
                except trio.BrokenResourceError as exc:
                    if first_byte:
                        raise UpstreamConnectError(f"upstream {label}: reset in the head") from exc
                    raise EarlyClose(
                        "reset before the response", during_send=False, replayable=replayable
                    ) from exc
                if not data and not first_byte:
                    raise EarlyClose(
                        "closed before the response", during_send=False, replayable=replayable
                    )
                first_byte = True
                proto.receive_data(data)
            elif isinstance(event, h11.Response):
                return event
            elif not isinstance(event, h11.InformationalResponse):  # skip 1xx, RFC 9110 §15.2
                raise UpstreamProtocolError(f"upstream {label}: unexpected {type(event).__name__}")
