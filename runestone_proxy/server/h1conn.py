"""One HTTP/1.1 connection on h11: keep-alive, pipelining, bodies, limits, disconnects.

How this works
--------------
The connection task is the only reader of the socket. It loops: wait for a request head
(bounded by the keep-alive timeout while idle and the header timeout once bytes arrived),
validate it against the limits, then run the request. While the handler runs, a *watcher*
task keeps reading: body bytes go to the handler through a bounded channel (so a slow handler
back-pressures the client), and after the body it watches for EOF, which means the client went
away: the watcher cancels the handler's scope at once, so upstream work stops too. Pipelined
bytes that arrive meanwhile stay buffered in h11 until the response is done (RFC 9112 §9.3.2:
responses go out in request order), bounded by ``max_pipelined_requests``.

Only the request side writes, one response at a time, so writes need no lock. Each write is
one ``send_all`` bounded by ``send_timeout_s``; streamed bodies go out chunked, one flush per
``send``. Errors found before a handler runs (400, 408, 413, 414, 431, 501) are answered in
OpenAI's envelope with ``Connection: close``, as nginx would, and the connection ends.

What a request costs
--------------------
This loop runs once per request, so it avoids per-request machinery where one object per
connection does the job:

* **One cancel scope per connection**, whose deadline is moved rather than a new scope per
  wait: the keep-alive deadline while idle, the header deadline once bytes arrived, none
  while a handler runs except ``send_timeout_s`` around a blocked write. Every way that scope
  can fire (idle, slow headers, a client gone or not reading) ends the connection anyway, so
  one scope loses nothing; a slow head is answered 408 after it (``Phase.HEAD``).
* **Responses skip h11's serialiser.** h11 validates every header of every event twice
  (on construction and again while adding framing headers) and walks its state machine per
  event. We write the head ourselves (our headers are constants or values h11 already
  parsed and validated, and a CR/LF count guards the rest) and frame streamed bodies as
  chunks (RFC 9112 §7.1). An HTTP/1.0 client's stream, 1xx, 204 and 304 go through h11
  whole (it picks close-delimited framing).
* **Plain requests skip h11's parser.** While no request needs h11, the connection keeps
  the bytes it received itself (``buffer``) and reads each head with
  :func:`~runestone_proxy.protocol.h1request.parse_request_head`; a request whose head it
  reads and whose body is all here (the common JSON POST; one non-blocking read is tried
  for a body sent in a second segment) runs without any h11 state machine (``proto`` is
  None). Anything else (a head the parser declines: HTTP/1.0, chunked, Expect, odd bytes;
  a body still to come; an error answer; a response only h11 writes) makes one
  (:meth:`H1Connection.take_h11`) from the same bytes, the current request's replayed, and the
  request continues on h11 exactly as before. After a response, h11's leftovers
  (pipelined bytes, EOF) go back to ``buffer`` and the next request starts fast again.

Where the pieces live
---------------------
The head writer, the head checks and the phase table (:class:`Phase`: which transitions
``next_request`` may make, and what the scope firing means in each) are sans-IO in
:mod:`runestone_proxy.protocol.h1`; the raw-fd reads and writes are
:class:`~runestone_proxy.server.fdstream.FdStream`, shared with the upstream pool; the
responder and body sources are :mod:`.h1respond`; the watcher is :mod:`.h1watch`; reading
a request, fast or on h11, and the hand-over between the two are :mod:`.h1read`. This
module is the request loop and its one cancel scope.
"""

from __future__ import annotations

import math
import time

import attrs
import h11
import structlog
import trio

from runestone_proxy import errors
from runestone_proxy.api.dispatch import log_access, new_request_id, request_id_from
from runestone_proxy.api.http import JSON_HEADERS, HeaderList, Request, ResponseAborted
from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.h1 import (
    CLOSE,
    REASONS,
    TIMEOUT_STATUS,
    Phase,
    check_request_head,
    request_error,
    too_large,
)
from runestone_proxy.protocol.h1request import RequestHead
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h1read import RequestReader
from runestone_proxy.server.h1respond import BufferedBody, H1Responder, StreamingBody
from runestone_proxy.server.h1watch import watch

log = structlog.get_logger("runestone.h1")

#: What the watcher feeds a streamed request body through.
_BodyChannel = trio.MemorySendChannel[bytes | errors.GatewayError]
#: A response cut short by the client: the connection ends without its last chunk.
_ABORTED = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ResponseAborted)


@attrs.define(eq=False)
class H1Connection(RequestReader):
    """One server connection: the request loop, its one cancel scope, the watcher."""

    stream: trio.abc.Stream
    gateway: Frontend
    limits: LimitsConfig
    client: str | None
    #: h11's state machine while a request needs it (see "What a request costs"), else None.
    proto: h11.Connection | None = None
    #: Bytes received and not yet parsed, while ``proto`` is None.
    buffer: bytes = b""
    #: The client closed its side (seen while ``proto`` is None).
    eof: bool = False
    #: The request being served, read without h11: its head and whole body (for h11 to
    #: replay if it is needed after all).
    raw: bytes = b""
    #: Set once this connection will close after the current response.
    closing: bool = False
    #: The connection's one cancel scope (see "What a request costs"); its deadline moves.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    #: Where the connection is (the table in :mod:`runestone_proxy.protocol.h1`).
    phase: Phase = Phase.IDLE
    #: Set by the watcher once it touches the socket; the next request waits for its exit.
    watch_done: trio.Event | None = None
    watch_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    #: The socket's fd when the stream is a plain SocketStream (not TLS): see FdStream.
    fd: int = -1
    #: h11's ``max_incomplete_event_size``: the largest request line plus header block.
    max_head: int = 0
    #: A write is blocked, bounded by the scope's deadline (``send_timeout_s``).
    send_blocked: bool = False

    @classmethod
    def new(cls, stream: trio.abc.Stream, gateway: Frontend, client: str | None) -> H1Connection:
        limits = gateway.config.limits
        max_head = limits.max_request_line_bytes + limits.max_header_bytes
        self = cls(stream, gateway, limits, client, max_head=max_head)
        if isinstance(stream, trio.SocketStream):
            self.fd = stream.socket.fileno()
        return self

    async def send_rest(self, data: bytes) -> None:
        """What :meth:`FdStream.send_all` could not write at once (all of it on TLS), bounded
        by ``send_timeout_s``. While a handler runs, the bound is the connection scope's
        deadline (cheaper than a scope per write); a client that stops reading then cancels
        the handler and the connection closes."""
        if self.phase is not Phase.BUSY:
            with trio.fail_after(self.limits.send_timeout_s):
                await self.stream.send_all(data)
            return
        scope = self.scope
        scope.deadline = trio.current_time() + self.limits.send_timeout_s
        self.send_blocked = True  # _arm_watch must leave this deadline alone
        try:
            await self.stream.send_all(data)
        finally:
            self.send_blocked = False
            scope.deadline = math.inf

    def lost(self, exc: Exception) -> bytes:
        """A reset, or the socket closed under a read: the client is gone, as at EOF."""
        return b""

    # --- the request loop -------------------------------------------------------------------

    async def serve(self, initial: bytes) -> None:
        self.buffer = initial
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._watch_drain)
            try:
                with self.scope:
                    await self._loop()
                fired = self.scope.cancelled_caught
                if fired and TIMEOUT_STATUS[self.phase] is not None and not self.closing:
                    await self._reject(errors.RequestTimeout("Timed out reading the request."))
            finally:
                nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while not self.closing:
            request = await self.next_request()
            if request is None:
                return
            started = time.perf_counter()
            if type(request) is RequestHead:
                headers = request.headers
                if not request.keep_alive:
                    self.closing = True  # RFC 9112 §9.6: the client's last request
            else:
                # One pass over h11's Headers (a Sequence, slow to iterate) into a plain list.
                headers = list(request.headers)
            problem = check_request_head(request.target, headers, self.limits)
            if problem is not None:
                await self._reject(problem)
                return
            if self.gateway.draining.is_set():
                self.closing = True
            self.watch_done = self.watch_scope = None
            direct = await self._run(request, headers, started)
            self.raw = b""
            proto = self.proto
            if proto is None:
                continue  # read and answered without h11 (``closing`` says if it was the last)
            if proto.their_state is not h11.DONE or not (direct or proto.our_state is h11.DONE):
                # MUST_CLOSE or CLOSED on either side, or a body left unread (an error
                # answered early): the connection ends here.
                return
            self.back_to_fast(proto)

    async def _watch_drain(self) -> None:
        await self.gateway.draining.wait()
        self.closing = True
        if self.phase is Phase.IDLE:
            self.scope.cancel()

    async def _reject(self, exc: errors.GatewayError) -> None:
        """Answer an error found before any handler ran, then close (nginx's behaviour)."""
        self.closing = True
        proto = self.take_h11()
        if proto.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = 501 if exc.code == "not_implemented" else exc.http_status
        request_id = new_request_id().encode()
        headers = [*JSON_HEADERS, *exc.headers, CLOSE, (b"x-request-id", request_id)]
        body = exc.body()
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            head = h11.Response(
                status_code=status, headers=headers, reason=REASONS.get(status, b"")
            )
            data = proto.send(head)
            data += proto.send(h11.Data(data=body)) + proto.send(h11.EndOfMessage())
            await self.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            pass

    async def _run(
        self, event: RequestHead | h11.Request, headers: HeaderList, started: float
    ) -> bool:
        """Serve one request whose head passed its checks; True if h11 did not write it."""
        path, _, query = event.target.decode("latin-1").partition("?")
        request_id = request_id_from(headers)
        method = event.method.decode("ascii")
        responder = H1Responder(self, request_id, head_only=method == "HEAD")
        body_source: StreamingBody | BufferedBody
        send_channel: _BodyChannel | None = None
        if type(event) is RequestHead:  # its length was checked with its head
            body_source = BufferedBody(self.raw[event.size :])
            buffered, http_version = event.length, "1.1"
        else:
            assert type(event) is h11.Request
            body = await self._body_h11(self.take_h11())
            if body is None:
                return False
            body_source, send_channel, buffered = body
            http_version = event.http_version.decode("ascii")
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            http_version=http_version,
            body_source=body_source,
            request_id=request_id,
            client=self.client,
            max_body_bytes=self.limits.max_body_bytes,
        )
        slow = self.gateway.slow_watch
        if send_channel is not None or not slow.running:
            self._arm_watch(send_channel, buffered, delay=True)
        else:
            slow.add(self, self._arm_watch)
        try:
            await self.gateway.dispatch(request, responder)
            await responder.finish()
        except _ABORTED:
            self.closing = True  # an aborted response ends without its last chunk
        finally:  # also when the connection scope was cancelled (client gone, not reading)
            slow.discard(self)
            if self.watch_scope is not None:
                self.watch_scope.cancel()
            if self.watch_done is not None:
                with trio.CancelScope(shield=True):
                    await self.watch_done.wait()  # one reader at a time: let the watcher leave
            log_access(
                self.gateway, request, responder.status or 499, responder.sent_bytes, started
            )
        return responder.direct

    async def _body_h11(
        self, proto: h11.Connection
    ) -> tuple[StreamingBody | BufferedBody, _BodyChannel | None, int] | None:
        """The body of a request h11 read: whole if it is all buffered, else a stream the
        watcher feeds (with its channel); and the bytes buffered. None once rejected."""
        parts: list[bytes] = []  # the body may be buffered already (small JSON usually is)
        try:
            next_event = proto.next_event()
            while isinstance(next_event, h11.Data):
                parts.append(next_event.data)
                next_event = proto.next_event()
        except h11.RemoteProtocolError as exc:
            await self._reject(request_error(exc, proto.trailing_data[0], self.limits))
            return None
        buffered = sum(map(len, parts))
        if buffered > self.limits.max_body_bytes:  # a chunked body has no length to check
            await self._reject(too_large(self.limits))
            return None
        if isinstance(next_event, h11.EndOfMessage):
            return BufferedBody(parts[0] if len(parts) == 1 else b"".join(parts)), None, buffered
        send_channel, receive_channel = trio.open_memory_channel[bytes | errors.GatewayError](1)
        if parts:
            send_channel.send_nowait(b"".join(parts))
        return StreamingBody(self, receive_channel), send_channel, buffered

    def _arm_watch(
        self,
        body: _BodyChannel | None = None,
        received: int = 0,
        delay: bool = False,
    ) -> None:
        """Start the watcher for the running request (from the request itself, or from the
        sweeper once the request has run a while)."""
        assert self.nursery is not None
        if not self.send_blocked:  # a blocked write's send_timeout_s still does
            self.scope.deadline = math.inf  # the wait's deadline no longer applies
        self.watch_scope = trio.CancelScope()
        self.nursery.start_soon(watch, self, body, self.scope, received, self.watch_scope, delay)


async def serve_h1(
    stream: trio.abc.Stream, gateway: Frontend, *, initial: bytes = b"", client: str | None = None
) -> None:
    """Serve one HTTP/1.1 connection until it closes. Catches, logs and closes (never raises)."""
    conn = H1Connection.new(stream, gateway, client)
    try:
        await conn.serve(initial)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError):
        pass
    except Exception:
        log.exception("h1.connection.crashed", client=client)
    finally:
        with trio.move_on_after(1) as cleanup:
            cleanup.shield = True
            await stream.aclose()
