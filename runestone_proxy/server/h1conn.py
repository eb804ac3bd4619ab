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
  one scope loses nothing; a slow head is answered 408 after it (``_Phase.HEAD``).
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
"""

from __future__ import annotations

import enum
import math
import os
import time
from http import HTTPStatus

import attrs
import h11
import structlog
import trio

from runestone_proxy import errors
from runestone_proxy.config import LimitsConfig
from runestone_proxy.server.gateway import Gateway, log_access, new_request_id, request_id_from
from runestone_proxy.server.http import JSON_HEADERS, HeaderList, Request, ResponseAborted
from runestone_proxy.server.slowbody import body_pace, body_timeout

log = structlog.get_logger("runestone.h1")

_READ_SIZE = 65536
_BODY_END = b""
_CLOSE = (b"connection", b"close")
#: Delay before the watcher starts reading for EOF (disconnects are noticed within this).
_WATCH_AFTER_S = 0.02
#: A request whose wait left less than this on the connection's deadline gets none at once
#: (see _next_request); otherwise only once it runs longer than _WATCH_AFTER_S.
_DEADLINE_MARGIN_S = 1.0
#: How early (as a share of the timeout) a keep-alive or header deadline may fire: a wait
#: keeps the deadline an earlier wait set if it is this close to its own (see _next_request).
_DEADLINE_SLACK = 0.02
_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}
#: Status lines as h11 writes them, for the heads we write ourselves.
_STATUS_LINES = {code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in _REASONS.items()}
#: Statuses whose framing h11 treats specially (no body): those go through h11 whole.
_BODYLESS = frozenset({204, 304})
_END = h11.EndOfMessage()
#: The last chunk of a chunked body, with no trailers (RFC 9112 §7.1).
_LAST_CHUNK = b"0\r\n\r\n"


class _Phase(enum.Enum):
    """Where the connection is, which decides what its one cancel scope firing means."""

    IDLE = "idle"  # waiting for a request, nothing received: a drain may close it
    HEAD = "head"  # part of a request head received: a timeout is answered 408
    BUSY = "busy"  # a handler runs: the scope is its cancel scope


class _ClientGone(Exception):
    """The peer closed or reset the connection."""


@attrs.define(eq=False)
class _StreamingBody:
    """A request body that arrives after the head: fed by the watcher, read by the handler."""

    conn: H1Connection
    receiver: trio.MemoryReceiveChannel[bytes | errors.GatewayError]
    finished: bool = False

    async def receive(self) -> bytes:
        if self.finished:
            return b""
        if self.conn.proto.they_are_waiting_for_100_continue:
            # RFC 9110 §10.1.1: the client waits for our go-ahead before sending the body.
            await self.conn.write(
                self.conn.proto.send(h11.InformationalResponse(status_code=100, headers=[]))
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
class H1Responder:
    """Implements :class:`~runestone_proxy.server.http.Responder` over one h11 exchange."""

    conn: H1Connection
    request_id: str
    head_only: bool
    status: int = 0
    sent_bytes: int = 0
    #: The streamed body goes out chunked (an HTTP/1.1 client): frame chunks ourselves.
    chunked: bool = False
    #: The response was written without h11 (see the module docstring): the connection
    #: takes a fresh h11.Connection for the next request.
    direct: bool = False

    @property
    def started(self) -> bool:
        return self.status != 0

    def _closes(self) -> bool:
        """Whether the connection ends after this response. Besides a drain, the client may
        not send another request (MUST_CLOSE: ``Connection: close``, HTTP/1.0), or we answer
        before its body was read (e.g. 401): then say so (RFC 9112 §9.6) rather than leave a
        keep-alive client to find a reset."""
        conn = self.conn
        if conn.proto.their_state is not h11.DONE:
            conn.closing = True
        return conn.closing

    def _head(self, status: int, headers: HeaderList, length: int | None) -> h11.Response:
        out = [*headers, (b"x-request-id", self.request_id.encode())]
        if length is not None:
            out.append((b"content-length", str(length).encode()))
        if self._closes():
            out.append(_CLOSE)
        head = h11.Response(status_code=status, headers=out, reason=_REASONS.get(status, b""))
        self.status = status  # only once h11 accepted the headers: else a 500 can follow
        return head

    def _direct_head(self, status: int, headers: HeaderList, framing: bytes) -> bytes | None:
        """The head written without h11's serialiser (see the module docstring), ending in
        its blank line; None where h11 must do it (1xx, 204, 304, or a value with a CR or
        LF in it, which h11 then refuses)."""
        if status < 200 or status in _BODYLESS:
            return None
        closes = self._closes()
        parts = [_STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
        parts += [b"%b: %b\r\n" % pair for pair in headers]
        parts.append(b"x-request-id: %b\r\n%b" % (self.request_id.encode(), framing))
        if closes:
            parts.append(b"connection: close\r\n")
        head = b"".join(parts)
        # Each header line ends in exactly one CRLF: no CR or LF hides inside a value.
        lines = len(parts) + 1
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            return None
        return head + b"\r\n"

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        if self.started:
            raise RuntimeError("response already started")
        conn = self.conn
        proto = conn.proto
        head = self._direct_head(status, headers, b"content-length: %d\r\n" % len(body))
        if head is not None:
            self.direct = True
            self.status = status
            if body and not self.head_only:
                self.sent_bytes = len(body)
                head += body
            await conn.write(head)
            return
        data = proto.send(self._head(status, headers, len(body)))
        if body and not self.head_only:
            data += proto.send(h11.Data(data=body))
            self.sent_bytes = len(body)
        data += proto.send(_END)
        await conn.write(data)

    async def start(self, status: int, headers: HeaderList) -> None:
        if self.started:
            raise RuntimeError("response already started")
        conn = self.conn
        proto = conn.proto
        if proto.their_http_version == b"1.1" and not self.head_only:
            head = self._direct_head(status, headers, b"transfer-encoding: chunked\r\n")
            if head is not None:
                self.direct = self.chunked = True
                self.status = status
                await conn.write(head)
                return
        head = proto.send(self._head(status, headers, None))
        # h11 picked chunked framing iff it announced it (HTTP/1.1 client, no length).
        self.chunked = b"\r\ntransfer-encoding: chunked\r\n" in (head or b"").lower()
        await conn.write(head)

    async def send(self, data: bytes) -> None:
        if not data or self.head_only:
            return
        self.sent_bytes += len(data)
        if self.chunked:
            # RFC 9112 §7.1 chunk framing, done here rather than through an h11 Data event
            # per SSE chunk: h11 keeps no count in chunked mode, and still writes the last
            # chunk (EndOfMessage) itself.
            await self.conn.write(b"%x\r\n%b\r\n" % (len(data), data))
            return
        await self.conn.write(self.conn.proto.send(h11.Data(data=data)))

    async def finish(self) -> None:
        if not self.started:
            await self.respond(500, JSON_HEADERS, errors.GatewayError("No response.").body())
        elif self.direct:
            if self.chunked:
                await self.conn.write(_LAST_CHUNK)
        elif self.conn.proto.our_state is h11.SEND_BODY:
            await self.conn.write(self.conn.proto.send(h11.EndOfMessage()))


@attrs.define(eq=False)
class H1Connection:
    stream: trio.abc.Stream
    gateway: Gateway
    limits: LimitsConfig
    client: str | None
    proto: h11.Connection
    #: Set once this connection will close after the current response.
    closing: bool = False
    #: The connection's one cancel scope (see "What a request costs"); its deadline moves.
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    phase: _Phase = _Phase.IDLE
    #: Set by the watcher once it touches the socket; the next request waits for its exit.
    watch_done: trio.Event | None = None
    watch_scope: trio.CancelScope | None = None
    nursery: trio.Nursery | None = None
    #: The socket's fd when the stream is a plain SocketStream (not TLS), for direct writes.
    fd: int = -1
    #: h11's ``max_incomplete_event_size``: the largest request line plus header block.
    max_head: int = 0
    #: A write is blocked, bounded by the scope's deadline (``send_timeout_s``).
    send_blocked: bool = False

    @classmethod
    def new(cls, stream: trio.abc.Stream, gateway: Gateway, client: str | None) -> H1Connection:
        limits = gateway.config.limits
        max_head = limits.max_request_line_bytes + limits.max_header_bytes
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self = cls(stream, gateway, limits, client, conn, max_head=max_head)
        if isinstance(stream, trio.SocketStream):
            self.fd = stream.socket.fileno()
        return self

    async def write(self, data: bytes) -> None:
        """One flush, bounded by ``send_timeout_s``. While a handler runs, the bound is the
        connection scope's deadline (cheaper than a scope per write); a client that stops
        reading then cancels the handler and the connection closes."""
        if self.fd >= 0:
            # Fast path: a plain socket usually takes a whole response at once; only what the
            # kernel refused goes through trio (and its timeout). The caller's loop awaits
            # the next read right after, so this costs the scheduler no fairness.
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError:
                sent = 0  # let trio raise its own BrokenResourceError below
            if sent == len(data):
                return
            data = data[sent:]
        if self.phase is not _Phase.BUSY:
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

    async def receive(self, *, waiting: bool = False) -> bytes:
        """The next bytes from the client; ``b""`` at EOF or when the socket broke.
        ``waiting``: nothing is expected yet (the client has its answer to read before it
        sends again), so wait for readiness first rather than pay a read that fails."""
        fd = self.fd
        if fd < 0:
            try:
                data = await self.stream.receive_some(_READ_SIZE)
                return data if type(data) is bytes else bytes(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        # A plain socket: read it directly (trio's SocketStream adds a conflict detector and
        # a generic non-blocking helper per call). One reader at a time is this class's own
        # rule, and wait_readable still refuses a second waiter.
        if not waiting:
            try:
                data = os.read(fd, _READ_SIZE)
            except BlockingIOError:
                pass
            except OSError:
                return b""  # reset by the peer: as EOF
            else:
                await trio.lowlevel.checkpoint()  # bytes were waiting: let others run too
                return data
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError:
                return b""
            try:
                return os.read(fd, _READ_SIZE)
            except BlockingIOError:
                continue
            except OSError:
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
                if self.scope.cancelled_caught and self.phase is _Phase.HEAD and not self.closing:
                    await self._reject(errors.RequestTimeout("Timed out reading the request."))
            finally:
                nursery.cancel_scope.cancel()

    async def _loop(self) -> None:
        while not self.closing:
            request = await self._next_request()
            if request is None:
                return
            direct = await self._run(request)
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
        if self.phase is _Phase.IDLE:
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
                await self._reject(self._protocol_error(exc))
                return None
            if type(event) is h11.Request:
                self.phase = _Phase.BUSY
                if scope.deadline - trio.current_time() < _DEADLINE_MARGIN_S:
                    scope.deadline = math.inf
                # Otherwise the wait's deadline stays while the handler runs: most answer
                # in well under _DEADLINE_MARGIN_S, and one still running after
                # _WATCH_AFTER_S lifts it (_arm_watch). One deadline move per request.
                return event
            if event is not h11.NEED_DATA:
                # ConnectionClosed (EOF between requests) or PAUSED: nothing more to serve.
                return None
            if not waiting:  # the first wait for this request starts its clock
                waiting = True
                buffered = proto.their_state is not h11.IDLE or bool(proto.trailing_data[0])
                if not buffered and self.closing:
                    return None
                self.phase = _Phase.HEAD if buffered else _Phase.IDLE
                limits = self.limits
                timeout = limits.header_timeout_s if buffered else limits.keepalive_timeout_s
                due = trio.current_time() + timeout
                # A busy connection waits many times a second; moving a deadline is a heap
                # operation. One already within _DEADLINE_SLACK of the timeout is kept.
                if not due - timeout * _DEADLINE_SLACK <= scope.deadline <= due:
                    scope.deadline = due
            elif self.phase is _Phase.IDLE:
                # Bytes came, but not yet a whole head (the usual first read is one): the
                # header timeout applies from now on.
                self.phase = _Phase.HEAD
                scope.deadline = trio.current_time() + self.limits.header_timeout_s
            # Between requests, a client (one that does not pipeline) is still reading our
            # answer: its next request cannot be here yet.
            data = await self.receive(waiting=self.phase is _Phase.IDLE)
            proto.receive_data(data)
            if not data and not proto.trailing_data[0]:
                return None

    def _protocol_error(self, exc: h11.RemoteProtocolError) -> errors.GatewayError:
        if exc.error_status_hint == 431:
            buffered = self.proto.trailing_data[0]
            if b"\n" not in buffered[: self.limits.max_request_line_bytes + 2]:
                return errors.URITooLong("Request line too long.")
            return errors.HeaderFieldsTooLarge("Request header fields too large.")
        if exc.error_status_hint == 501:
            return errors.GatewayError(f"Not implemented: {exc}.", code="not_implemented")
        return errors.BadRequest(f"Malformed HTTP request: {exc}.", code="bad_request")

    async def _reject(self, exc: errors.GatewayError) -> None:
        """Answer an error found before any handler ran, then close (nginx's behaviour)."""
        self.closing = True
        if self.proto.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        status = 501 if exc.code == "not_implemented" else exc.http_status
        request_id = new_request_id().encode()
        headers = [*JSON_HEADERS, *exc.headers, _CLOSE, (b"x-request-id", request_id)]
        body = exc.body()
        headers.append((b"content-length", str(len(body)).encode()))
        try:
            head = h11.Response(
                status_code=status, headers=headers, reason=_REASONS.get(status, b"")
            )
            data = self.proto.send(head)
            data += self.proto.send(h11.Data(data=body)) + self.proto.send(h11.EndOfMessage())
            await self.write(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            pass

    def _check_head(
        self, event: h11.Request, headers: list[tuple[bytes, bytes]]
    ) -> errors.GatewayError | None:
        limits = self.limits
        if len(event.target) > limits.max_request_line_bytes:
            return errors.URITooLong("Request URI too long.")
        size = 0
        content_length: bytes | None = None
        chunked = False
        for name, value in headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                content_length = value
            elif name == b"transfer-encoding":
                chunked = True
        if size > limits.max_header_bytes:
            return errors.HeaderFieldsTooLarge("Request header fields too large.")
        if chunked and content_length is not None:
            # RFC 9112 §6.3: both present is how request smuggling starts; refuse and close.
            return errors.BadRequest(
                "Both Content-Length and Transfer-Encoding were sent.", code="bad_request"
            )
        if content_length is not None and int(content_length) > limits.max_body_bytes:
            return self._too_large()
        return None

    def _too_large(self) -> errors.PayloadTooLarge:
        return errors.PayloadTooLarge(
            f"Request body exceeds the limit of {self.limits.max_body_bytes} bytes."
        )

    async def _run(self, event: h11.Request) -> bool:
        """Serve one request; True if its response was written without h11."""
        started = time.perf_counter()
        # One pass over h11's Headers (a Sequence, slow to iterate) into a plain list.
        headers = list(event.headers)
        problem = self._check_head(event, headers)
        if problem is not None:
            await self._reject(problem)
            return False
        if self.gateway.draining.is_set():
            self.closing = True
        target = event.target.decode("latin-1")
        path, _, query = target.partition("?")
        request_id = request_id_from(headers)
        method = event.method.decode("ascii")
        responder = H1Responder(self, request_id, head_only=method == "HEAD")

        # The body may already be complete in the buffer (small JSON usually is).
        parts: list[bytes] = []
        try:
            next_event = self.proto.next_event()
            while isinstance(next_event, h11.Data):
                parts.append(next_event.data)
                next_event = self.proto.next_event()
        except h11.RemoteProtocolError as exc:
            await self._reject(self._protocol_error(exc))
            return False
        buffered = sum(map(len, parts))
        if buffered > self.limits.max_body_bytes:  # a chunked body has no length to check
            await self._reject(self._too_large())
            return False
        body_source: _StreamingBody | _BufferedBody
        send_channel: trio.MemorySendChannel[bytes | errors.GatewayError] | None = None
        if isinstance(next_event, h11.EndOfMessage):
            body_source = _BufferedBody(parts[0] if len(parts) == 1 else b"".join(parts))
        else:
            send_channel, receive_channel = trio.open_memory_channel[bytes | errors.GatewayError](1)
            body_source = _StreamingBody(self, receive_channel)
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
        self.watch_done = None
        self.watch_scope = None
        slow = self.gateway.slow_watch
        if send_channel is not None or not slow.running:
            self._arm_watch(send_channel, buffered, delay=True)
        else:
            slow.add(self, self._arm_watch)
        try:
            await self.gateway.dispatch(request, responder)
            await responder.finish()
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            trio.TooSlowError,
            ResponseAborted,
        ):
            self.closing = True  # an aborted response ends without its last chunk
        finally:
            # Also when the connection scope was cancelled (client gone, or not reading):
            # then Cancelled goes on up and ends the connection after this.
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
        self.nursery.start_soon(self._watch, body, self.scope, received, self.watch_scope, delay)

    async def _watch(
        self,
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
                await trio.sleep(_WATCH_AFTER_S)
            done = self.watch_done = trio.Event()
            try:
                if body is not None:
                    await self._feed_body(body, conn_scope, received)
                await self._watch_eof(conn_scope)
            finally:
                done.set()

    async def _watch_eof(self, conn_scope: trio.CancelScope) -> None:
        # Body complete: keep reading so EOF is noticed promptly. Pipelined bytes are
        # buffered in h11 (bounded); past the bound we stop reading until the response is done.
        budget = self.limits.max_pipelined_requests * (
            self.limits.max_request_line_bytes + self.limits.max_header_bytes
        )
        while budget > 0:
            data = await self.receive()
            if not data:
                conn_scope.cancel()
                return
            budget -= len(data)
            self.proto.receive_data(data)
        await trio.sleep_forever()

    async def _feed_body(
        self,
        body: trio.MemorySendChannel[bytes | errors.GatewayError],
        conn_scope: trio.CancelScope,
        received: int,
    ) -> None:
        body_done = False
        pace, started = body_pace(self.limits), trio.current_time()
        async with body:
            while not body_done:
                try:
                    event = self.proto.next_event()
                except h11.RemoteProtocolError as exc:
                    self.closing = True
                    await body.send(self._protocol_error(exc))
                    return
                if event is h11.NEED_DATA:
                    # Per read, and a minimum rate for the whole body (protocol/slowclient.py).
                    with trio.move_on_at(pace.deadline(trio.current_time(), started, received)):
                        data = await self.receive()
                        self.proto.receive_data(data)
                        if not data:
                            conn_scope.cancel()
                            return
                        continue
                    # Set before the send: the handler answers as soon as it receives this.
                    self.closing = True
                    await body.send(body_timeout(pace, started, received))
                    return
                if isinstance(event, h11.Data):
                    received += len(event.data)
                    if received > self.limits.max_body_bytes:
                        self.closing = True
                        await body.send(self._too_large())
                        return
                    await body.send(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    body_done = True
                else:
                    return


@attrs.define(eq=False)
class _BufferedBody:
    data: bytes
    done: bool = False

    async def receive(self) -> bytes:
        if self.done:
            return b""
        self.done = True
        return self.data


async def serve_h1(
    stream: trio.abc.Stream, gateway: Gateway, *, initial: bytes = b"", client: str | None = None
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
