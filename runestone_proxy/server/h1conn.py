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
  chunks (RFC 9112 §7.1). h11 still parses every request: once a request was read to its
  end and answered this way, the next one goes to a fresh ``h11.Connection`` fed what the
  old one still holds (``trailing_data``: pipelined bytes, EOF). That costs a microsecond,
  against ten for telling the old one about a response it did not write. An HTTP/1.0
  client's stream, 1xx, 204 and 304 go through h11 whole (it picks close-delimited
  framing), and the connection then cycles as h11 says.

Where the pieces live
---------------------
The head writer, the head checks and the phase table (:class:`Phase`: which transitions
``_next_request`` may make, and what the scope firing means in each) are sans-IO in
:mod:`runestone_proxy.protocol.h1`; the raw-fd reads and writes are
:class:`~runestone_proxy.server.fdstream.FdStream`, shared with the upstream pool; the
responder and body sources are :mod:`.h1respond`; the watcher is :mod:`.h1watch`. This
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
from runestone_proxy.server.fdstream import FdStream
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h1respond import BufferedBody, H1Responder, StreamingBody
from runestone_proxy.server.h1watch import watch

log = structlog.get_logger("runestone.h1")

#: A request whose wait left less than this on the connection's deadline gets none at once
#: (see _next_request); otherwise only once it runs longer than h1watch.WATCH_AFTER_S.
_DEADLINE_MARGIN_S = 1.0
#: How early (as a share of the timeout) a keep-alive or header deadline may fire: a wait
#: keeps the deadline an earlier wait set if it is this close to its own (see _next_request).
_DEADLINE_SLACK = 0.02
#: A response cut short by the client: the connection ends without its last chunk.
_ABORTED = (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ResponseAborted)


@attrs.define(eq=False)
class H1Connection(FdStream):
    """One server connection: the request loop, its one cancel scope, the watcher."""

    stream: trio.abc.Stream
    gateway: Frontend
    limits: LimitsConfig
    client: str | None
    proto: h11.Connection
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
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self = cls(stream, gateway, limits, client, conn, max_head=max_head)
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
        if initial:
            self.proto.receive_data(initial)
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
            request = await self._next_request()
            if request is None:
                return
            started = time.perf_counter()
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
            proto = self.proto
            if proto.their_state is not h11.DONE or not (direct or proto.our_state is h11.DONE):
                # MUST_CLOSE or CLOSED on either side, or a body left unread (an error
                # answered early): the connection ends here.
                return
            if direct:
                self._next_cycle()
            else:
                proto.start_next_cycle()

    def _next_cycle(self) -> None:
        """After a response h11 did not write: a fresh h11 connection for the next request,
        fed what the old one received and has not parsed (pipelined bytes, EOF)."""
        data, closed = self.proto.trailing_data
        self.proto = proto = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head)
        if data:
            proto.receive_data(data)
        if closed:
            proto.receive_data(b"")

    async def _watch_drain(self) -> None:
        await self.gateway.draining.wait()
        self.closing = True
        if self.phase is Phase.IDLE:
            self.scope.cancel()

    async def _next_request(self) -> h11.Request | None:
        """Read until a request head; answer and return None on errors or EOF. The keep-alive
        and header timeouts fire the connection scope (``serve`` answers the 408)."""
        proto = self.proto
        scope = self.scope
        waiting = False
        while True:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError as exc:
                await self._reject(request_error(exc, self.proto.trailing_data[0], self.limits))
                return None
            if type(event) is h11.Request:
                self.phase = Phase.BUSY  # HEAD_DONE
                if scope.deadline - trio.current_time() < _DEADLINE_MARGIN_S:
                    scope.deadline = math.inf
                # Otherwise the wait's deadline stays while the handler runs: most answer
                # in well under _DEADLINE_MARGIN_S, and one still running after
                # WATCH_AFTER_S lifts it (_arm_watch). One deadline move per request.
                return event
            if event is not h11.NEED_DATA:
                # ConnectionClosed (EOF between requests) or PAUSED: nothing more to serve.
                return None
            if not waiting:  # the first wait for this request starts its clock
                waiting = True
                buffered = proto.their_state is not h11.IDLE or bool(proto.trailing_data[0])
                if not buffered and self.closing:
                    return None
                self.phase = Phase.HEAD if buffered else Phase.IDLE  # WAIT_BUFFERED, WAIT_EMPTY
                limits = self.limits
                timeout = limits.header_timeout_s if buffered else limits.keepalive_timeout_s
                due = trio.current_time() + timeout
                # A busy connection waits many times a second; moving a deadline is a heap
                # operation. One already within _DEADLINE_SLACK of the timeout is kept.
                if not due - timeout * _DEADLINE_SLACK <= scope.deadline <= due:
                    scope.deadline = due
            elif self.phase is Phase.IDLE:
                # Bytes came, but not yet a whole head (the usual first read is one): the
                # header timeout applies from now on.
                self.phase = Phase.HEAD  # BYTES
                scope.deadline = trio.current_time() + self.limits.header_timeout_s
            # Between requests, a client (one that does not pipeline) is still reading our
            # answer: its next request cannot be here yet.
            data = await self.receive(waiting=self.phase is Phase.IDLE)
            proto.receive_data(data)
            if not data and not proto.trailing_data[0]:
                return None

    async def _reject(self, exc: errors.GatewayError) -> None:
        """Answer an error found before any handler ran, then close (nginx's behaviour)."""
        self.closing = True
        if self.proto.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
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
            data = self.proto.send(head)
            data += self.proto.send(h11.Data(data=body)) + self.proto.send(h11.EndOfMessage())
            await self.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            pass

    async def _run(self, event: h11.Request, headers: HeaderList, started: float) -> bool:
        """Serve one request whose head passed its checks; True if h11 did not write it."""
        path, _, query = event.target.decode("latin-1").partition("?")
        request_id = request_id_from(headers)
        method = event.method.decode("ascii")
        responder = H1Responder(self, request_id, head_only=method == "HEAD")
        parts: list[bytes] = []  # the body may be buffered already (small JSON usually is)
        try:
            next_event = self.proto.next_event()
            while isinstance(next_event, h11.Data):
                parts.append(next_event.data)
                next_event = self.proto.next_event()
        except h11.RemoteProtocolError as exc:
            await self._reject(request_error(exc, self.proto.trailing_data[0], self.limits))
            return False
        buffered = sum(map(len, parts))
        if buffered > self.limits.max_body_bytes:  # a chunked body has no length to check
            await self._reject(too_large(self.limits))
            return False
        body_source: StreamingBody | BufferedBody
        send_channel: trio.MemorySendChannel[bytes | errors.GatewayError] | None = None
        if isinstance(next_event, h11.EndOfMessage):
            body_source = BufferedBody(parts[0] if len(parts) == 1 else b"".join(parts))
        else:
            send_channel, receive_channel = trio.open_memory_channel[bytes | errors.GatewayError](1)
            body_source = StreamingBody(self, receive_channel)
            if parts:
                send_channel.send_nowait(b"".join(parts))
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            http_version=event.http_version.decode("ascii"),
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

    def _arm_watch(
        self,
        body: trio.MemorySendChannel[bytes | errors.GatewayError] | None = None,
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
