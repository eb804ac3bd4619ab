"""One HTTP/1.1 exchange's two ends for a handler: the response writer and the request body.

:class:`H1Responder` implements :class:`~runestone_proxy.api.http.Responder` for
:mod:`~runestone_proxy.server.h1conn`. It writes most heads itself
(:func:`~runestone_proxy.protocol.h1.response_head`, see "What a request costs" in
``h1conn``) and frames streamed bodies as chunks (RFC 9112 §7.1); 1xx, 204, 304 and an
HTTP/1.0 client's stream go through h11 whole.

A chunked stream's fixed writes ride with its data: on a loopback or LAN socket each
``write`` costs about as much as the Python that prepares it (the kernel runs the
receiver's TCP path in the sender's call), and a paced stream's chunks each come alone, so
a stream of n chunks paid n + 3 writes (head, chunks, ``[DONE]``, last chunk). Now
:meth:`H1Responder.start_with` writes the head with the first chunk (a relay starts with
its first payloads in hand; :meth:`~H1Responder.start` still writes the head at once, for
a handler that starts and then waits), and
:meth:`~H1Responder.send_final` keeps the body's last bytes for :meth:`~H1Responder.finish`
to write with the last chunk, after the handler returned (so after the stream's ledger
record and slot release, which a keep-alive client's next request must see): n + 1.
The body sources are what
``Request.body_source`` reads: :class:`BufferedBody` when the whole body came with the head,
:class:`StreamingBody` when the connection's watcher feeds it through a bounded channel.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import attrs
import h11
import trio

from runestone_proxy import errors
from runestone_proxy.api.http import JSON_HEADERS, HeaderList
from runestone_proxy.protocol.h1 import CLOSE, LAST_CHUNK, REASONS, response_head

if TYPE_CHECKING:
    from runestone_proxy.server.h1conn import H1Connection

_BODY_END = b""
_END = h11.EndOfMessage()


@attrs.define(eq=False)
class StreamingBody:
    """A request body that arrives after the head: fed by the watcher, read by the handler."""

    conn: H1Connection
    receiver: trio.MemoryReceiveChannel[bytes | errors.GatewayError]
    finished: bool = False

    async def receive(self) -> bytes:
        if self.finished:
            return b""
        proto = self.conn.take_h11()  # a body that streams in is read by h11
        if proto.they_are_waiting_for_100_continue:
            # RFC 9110 §10.1.1: the client waits for our go-ahead before sending the body.
            await self.conn.send_all(
                proto.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        try:
            item = await self.receiver.receive()
        except trio.EndOfChannel:
            item = _BODY_END
        if isinstance(item, errors.GatewayError):
            self.finished = True
            raise item
        if not item:
            self.finished = True
        return item


@attrs.define(eq=False)
class BufferedBody:
    """A request body that was complete in the buffer with its head."""

    data: bytes
    done: bool = False

    async def receive(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        return self.data


@attrs.define(eq=False)
class H1Responder:
    """Implements :class:`~runestone_proxy.api.http.Responder` over one h11 exchange."""

    conn: H1Connection
    request_id: str
    head_only: bool
    status: int = 0
    sent_bytes: int = 0
    #: The streamed body goes out chunked (an HTTP/1.1 client): frame chunks ourselves.
    chunked: bool = False
    #: The response was written without h11 (see h1conn's docstring).
    direct: bool = False
    #: A chunked head :meth:`start_with` keeps for its first :meth:`send`.
    head: bytes = b""
    #: The body's last chunk, from :meth:`send_final`, for :meth:`finish` to write.
    tail: bytes = b""

    @property
    def started(self) -> bool:
        return self.status != 0

    def _closes(self) -> bool:
        """Whether the connection ends after this response. Besides a drain, the client may
        not send another request (MUST_CLOSE: ``Connection: close``, HTTP/1.0), or we answer
        before its body was read (e.g. 401): then say so (RFC 9112 §9.6) rather than leave a
        keep-alive client to find a reset."""
        conn = self.conn
        if not conn.request_read():
            conn.closing = True
        return conn.closing

    def _head(self, status: int, headers: HeaderList, length: int | None) -> h11.Response:
        out = [*headers, (b"x-request-id", self.request_id.encode())]
        if length is not None:
            out.append((b"content-length", str(length).encode()))
        if self._closes():
            out.append(CLOSE)
        head = h11.Response(status_code=status, headers=out, reason=REASONS.get(status, b""))
        self.status = status  # only once h11 accepted the headers: else a 500 can follow
        return head

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        conn = self.conn
        head = response_head(
            status, headers, self.request_id, b"content-length: %d\r\n" % len(body), self._closes()
        )
        if head is not None:
            self.direct = True
            self.status = status
            if body and not self.head_only:
                self.sent_bytes = len(body)
                head += body
            await conn.send_all(head)
            return
        proto = conn.take_h11()  # a head only h11 writes
        data = proto.send(self._head(status, headers, len(body)))
        if body and not self.head_only:
            data += proto.send(h11.Data(data=body))
            self.sent_bytes = len(body)
        data += proto.send(_END)
        await conn.send_all(data)

    async def start(self, status: int, headers: HeaderList) -> None:
        self._start(status, headers)
        await self._send_head()

    async def start_with(self, status: int, headers: HeaderList, first: bytes) -> None:
        """:meth:`start` then :meth:`send` ``first``, in one write when the head is ours."""
        self._start(status, headers)
        if not (self.direct and first):  # else send's chunk framing takes the head along
            await self._send_head()
        await self.send(first)

    async def _send_head(self) -> None:
        head, self.head = self.head, b""
        await self.conn.send_all(head)

    def _start(self, status: int, headers: HeaderList) -> None:
        """The head, into ``head``: written by us (chunked) where we can, else by h11."""
        if self.started:
            raise RuntimeError("response already started")
        conn = self.conn
        if conn.http11() and not self.head_only:
            framing = b"transfer-encoding: chunked\r\n"
            head = response_head(status, headers, self.request_id, framing, self._closes())
            if head is not None:
                self.direct = self.chunked = True
                self.status = status
                self.head = head
                return
        head = conn.take_h11().send(self._head(status, headers, None))
        # h11 picked chunked framing iff it announced it (HTTP/1.1 client, no length).
        self.chunked = b"\r\ntransfer-encoding: chunked\r\n" in (head or b"").lower()
        self.head = head or b""

    async def send(self, data: bytes) -> None:
        if not data or self.head_only:
            return
        self.sent_bytes += len(data)
        if self.chunked:
            # RFC 9112 §7.1 chunk framing, done here rather than through an h11 Data event
            # per SSE chunk (and inline rather than in protocol/h1: it runs per chunk): h11
            # keeps no count in chunked mode, and still writes the last chunk
            # (EndOfMessage) itself. The write is FdStream.send_all's, inline for the same
            # reason (a coroutine fewer per chunk): whole to the fd when the kernel takes it.
            frame = b"%x\r\n%b\r\n" % (len(data), data)
            if self.head or self.tail:  # the kept head; a tail only if sent after it
                frame = self.head + self.tail + frame
                self.head = self.tail = b""
            conn = self.conn
            if conn.fd >= 0:
                try:
                    sent = os.write(conn.fd, frame)
                except OSError:  # BlockingIOError, or a reset: trio raises its own below
                    sent = 0
                if sent == len(frame):
                    return
                frame = frame[sent:]
            await conn.send_rest(frame)
            return
        await self.conn.send_all(self.conn.take_h11().send(h11.Data(data=data)))

    async def send_final(self, data: bytes) -> None:
        """The body's last bytes: a chunked body keeps them for :meth:`finish`, which
        writes them with the last chunk once the handler returned; else :meth:`send`."""
        if self.chunked and self.direct and data and not self.tail:
            self.sent_bytes += len(data)
            self.tail = b"%x\r\n%b\r\n" % (len(data), data)
            return
        await self.send(data)

    async def finish(self) -> None:
        if not self.started:
            await self.respond(500, JSON_HEADERS, errors.GatewayError("No response.").body())
        elif self.direct:
            if self.chunked:
                end = self.head + self.tail + LAST_CHUNK
                self.head = self.tail = b""
                await self.conn.send_all(end)
        elif (proto := self.conn.take_h11()).our_state is h11.SEND_BODY:
            await self.conn.send_all(proto.send(h11.EndOfMessage()))
