"""One HTTP/1.1 connection to an upstream origin: connect, send, read the response.

The connection layer under :class:`~runestone_proxy.server.upstream.UpstreamPool`: a trio
stream (TCP, or TLS with SNI and hostname checks), the h11 state machine that frames it, and
the mapping of socket, TLS, h11 and timeout failures to :mod:`runestone_proxy.errors`. The
pool decides which connection to use, and when to retry, reuse or close; this module does
the I/O of one exchange. It also defines the response base both transports share
(:class:`UpstreamResponse`, which fits :class:`runestone_proxy.gateway.transport.Response`);
import it from ``upstream``.

Every wait is bounded by the earlier of the step's own limit (``connect_s``,
``first_byte_s``, ``between_chunks_s``) and the request's total deadline. The two waits on
the hot path (a response head, the next body bytes) register with the pool's sweeper
(:class:`~runestone_proxy.server.slowwatch.SlowWatch`) when it runs, which wakes an overdue
one with ``notify_closing``; every other wait, and these when no sweeper runs, is a cancel
scope (see :class:`_Wait`).
"""

from __future__ import annotations

import abc
import os
import select
import ssl
from collections.abc import AsyncIterable
from contextlib import suppress
from types import TracebackType
from typing import Final, cast

import attrs
import h11
import trio

from runestone_proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.gateway.transport import Body, Headers, UpstreamTimeouts
from runestone_proxy.server.slowwatch import SlowWatch

RECEIVE_BYTES: Final = 65536
MAX_HEAD_BYTES: Final = 64 * 1024  # h11 max_incomplete_event_size: the largest response head
CLOSE_TIMEOUT_S: Final = 1.0
# The pool owns framing and Host (RFC 9112 §6, §3.2); callers' copies are dropped.
FRAMING_HEADERS: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection"}
)
WITH_CONTENT: Final = frozenset({"POST", "PUT", "PATCH"})
#: Per method, the request head h11's state machine is told we sent when we write the head
#: ourselves (its bytes are dropped): with ``Content-Length: 0`` and ``EndOfMessage`` our
#: side is DONE, and h11 still knows the method (a HEAD's response has no body).
_SYNC_REQUESTS: dict[str, h11.Request] = {}
_END: Final = h11.EndOfMessage()


def direct_head(
    method: str, target: bytes, host: bytes, headers: Headers, length: int
) -> bytes | None:
    """The request head for a bytes body, written without h11's serialiser, or None when a
    field would not make a valid head (h11 then builds it, and says what is wrong).

    h11 validates every header of every request against its grammar; ours are the
    translator's constants, the configured key, and fields h11 parsed from our client, so a
    CR/LF count (one per line) and a space-free target are the checks left to make."""
    parts = [b"%b %b HTTP/1.1\r\nhost: %b\r\n" % (method.encode("ascii"), target, host)]
    if length or method in WITH_CONTENT:  # RFC 9110 §8.6: none for a GET without content
        parts.append(b"content-length: %d\r\n" % length)
    for name, value in headers:
        if name.lower() not in FRAMING_HEADERS:
            parts.append(b"%b: %b\r\n" % (name, value))
    head = b"".join(parts)
    lines = len(parts) + 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b" " in target:
        return None
    return head + b"\r\n"


def _sync_request(method: str) -> h11.Request:
    event = _SYNC_REQUESTS.get(method)
    if event is None:
        event = _SYNC_REQUESTS[method] = h11.Request(
            method=method, target=b"/", headers=[(b"host", b"sync"), (b"content-length", b"0")]
        )
    return event


@attrs.define(eq=False)
class UpstreamResponse(abc.ABC):
    """A response whose body is read incrementally. Header names are lower-case bytes."""

    status: int
    headers: list[tuple[bytes, bytes]] = attrs.field(repr=False)
    origin: str  # scheme://host:port, safe to log

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """The next body chunk, ``b""`` at the end; each call is bounded by between_chunks_s."""

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The rest of the body; raises :class:`UpstreamError` if it exceeds ``max_bytes``."""
        chunks: list[bytes] = []
        size = 0
        while chunk := await self.receive():
            size += len(chunk)
            if max_bytes is not None and size > max_bytes:
                raise UpstreamError(f"upstream {self.origin}: response body over {max_bytes} bytes")
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def timed_out(
    origin: str, what: str, limit_s: float, t: UpstreamTimeouts, deadline: float
) -> UpstreamTimeout:
    """The error for a wait that ran out: the total limit if that was the one reached."""
    if trio.current_time() >= deadline:
        return UpstreamTimeout(f"upstream {origin}: request exceeded total_s={t.total_s}s")
    return UpstreamTimeout(f"upstream {origin}: {what} within {limit_s}s")


@attrs.frozen
class Origin:
    """Where connections go. ``label`` (scheme://host:port) is what errors and logs show."""

    scheme: str
    host: str
    port: int
    host_header: bytes  # RFC 9112 §3.2: uri-host [":" port], the port only when not default
    label: str
    proxy: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, scheme: str, host: str, port: int, proxy: str | None = None) -> Origin:
        hostport = f"[{host}]" if ":" in host else host
        default = port == (443 if scheme == "https" else 80)
        host_header = (hostport if default else f"{hostport}:{port}").encode()
        return cls(scheme, host, port, host_header, f"{scheme}://{hostport}:{port}", proxy)


class EarlyClose(Exception):
    """The peer closed or reset the connection before any byte of the response arrived."""

    def __init__(self, reason: str, *, during_send: bool, replayable: bool) -> None:
        super().__init__(reason)
        self.during_send = during_send
        self.replayable = replayable


@attrs.define(eq=False)
class H11Connection:
    """One keep-alive connection. Used by one request at a time; the pool parks it between."""

    origin: Origin
    stream: trio.abc.Stream = attrs.field(repr=False)
    sock: trio.socket.SocketType = attrs.field(repr=False)
    proto: h11.Connection = attrs.field(repr=False)
    idle_since: float = 0.0
    reused: bool = False
    #: The socket's fd on a cleartext connection (direct non-blocking reads), else -1.
    fd: int = -1
    #: The pool's sweeper: while it runs, head and body waits register with it (see _Wait).
    watch: SlowWatch | None = attrs.field(default=None, repr=False)
    #: Set by the sweeper when a registered wait passed its due time.
    expired: bool = False

    @classmethod
    async def connect(
        cls, origin: Origin, ssl_context: ssl.SSLContext, t: UpstreamTimeouts, deadline: float
    ) -> H11Connection:
        label = origin.label
        with trio.CancelScope(deadline=min(deadline, trio.current_time() + t.connect_s)):
            try:
                tcp = await trio.open_tcp_stream(origin.host, origin.port)  # sets TCP_NODELAY
            except OSError as exc:  # refused, unreachable, DNS (gaierror)
                raise UpstreamConnectError(f"upstream {label}: cannot connect: {exc}") from exc
            stream: trio.abc.Stream = tcp
            try:
                if origin.scheme == "https":
                    stream = trio.SSLStream(
                        tcp, ssl_context, server_hostname=origin.host, https_compatible=True
                    )
                    await stream.do_handshake()
                    if stream.selected_alpn_protocol() not in (None, "http/1.1"):
                        raise UpstreamConnectError(f"upstream {label}: ALPN other than http/1.1")
            except trio.BrokenResourceError as exc:
                await _close(tcp)
                reason = exc.__cause__ or exc
                raise UpstreamConnectError(f"upstream {label}: TLS failed: {reason}") from exc
            except BaseException:
                await _close(tcp)
                raise
            proto = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
            fd = tcp.socket.fileno() if stream is tcp else -1
            return cls(origin, stream, tcp.socket, proto, fd=fd)
        raise timed_out(label, "could not connect", t.connect_s, t, deadline)

    def expire(self) -> None:
        """The sweeper's callback for an overdue wait: wake it (``ClosedResourceError``, or a
        broken TLS stream); :class:`_Wait` reports that as the timeout. The pool then
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
        """After a response: ready the connection for the next one if both sides are DONE
        (neither side asked to close, the body was read to its end), RFC 9112 §9.3."""
        proto = self.proto
        if proto.our_state is not h11.DONE or proto.their_state is not h11.DONE:
            return False
        proto.start_next_cycle()
        self.idle_since = now
        return True

    async def aclose(self) -> None:
        await _close(self.stream)

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
        origin, proto = self.origin, self.proto
        if isinstance(body, bytes):
            head = direct_head(method, target, origin.host_header, headers, len(body))
            if head is not None:
                proto.send(_sync_request(method))
                proto.send(_END)
                return await self._exchange(head + body if body else head, t, deadline)
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
            return await self._exchange(head, t, deadline)
        await self._send_streamed(head, body, t, deadline)
        return await self._exchange(None, t, deadline)

    async def _exchange(
        self, request: bytes | None, t: UpstreamTimeouts, deadline: float
    ) -> H11Response:
        """Write ``request`` (a whole, replayable one; None when the body was streamed) and
        read the response head. Writing and waiting share one bound (:class:`_Wait`):
        ``first_byte_s`` runs from the start of the write."""
        label = self.origin.label
        with _Wait(self, min(deadline, trio.current_time() + t.first_byte_s)):
            if request is not None:
                await self._send_all(request, replayable=True)
            event = await self._receive_head(request is not None)
            return H11Response(event.status_code, list(event.headers), label, self, deadline, t)
        raise timed_out(label, "no response head", t.first_byte_s, t, deadline)

    async def _send_all(self, data: bytes, replayable: bool) -> None:
        if self.fd >= 0:
            # Cleartext: the kernel usually takes a whole request at once; trio only gets
            # what it refused.
            try:
                sent = os.write(self.fd, data)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                raise EarlyClose(
                    "lost while sending", during_send=True, replayable=replayable
                ) from exc
            if sent == len(data):
                return
            data = data[sent:]
        try:
            await self.stream.send_all(data)
        except trio.BrokenResourceError as exc:
            raise EarlyClose("lost while sending", during_send=True, replayable=replayable) from exc

    def read_ready(self) -> bytes | None:
        """What a cleartext socket already holds (``b""`` at EOF), or None if a read would
        block. No checkpoint: the caller decides when to yield."""
        try:
            return os.read(self.fd, RECEIVE_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            raise trio.BrokenResourceError(f"upstream {self.origin.label}: {exc}") from exc

    async def read_some(self, *, waiting: bool = False) -> bytes:
        """The next bytes from the origin, ``b""`` at EOF; a reset raises
        ``trio.BrokenResourceError``. On cleartext, a direct non-blocking read (trio's
        SocketStream adds a conflict detector and a generic helper per call); a checkpoint
        keeps the loop fair when bytes were already waiting. ``waiting``: the caller knows
        nothing is there yet (a request just sent, a read that just came back empty), so
        wait for readiness first rather than pay a read that fails."""
        fd = self.fd
        if fd < 0:
            return bytes(await self.stream.receive_some(RECEIVE_BYTES))
        if not waiting:
            data = self.read_ready()
            if data is not None:
                await trio.lowlevel.checkpoint()
                return data
        while True:
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, RECEIVE_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise trio.BrokenResourceError(f"upstream {self.origin.label}: {exc}") from exc

    async def _send_streamed(
        self, head: bytes, body: AsyncIterable[bytes], t: UpstreamTimeouts, deadline: float
    ) -> None:
        """Chunked request body (RFC 9112 §7.1): one write per chunk, as the caller yields it,
        each within ``between_chunks_s``; the caller's producer counts against ``total_s``.
        Only the head can be replayed, so a retry is possible only before the first chunk."""
        proto = self.proto
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
            await self._send_all(data, replayable)
        if scope.cancelled_caught:
            what = "request bytes not sent"
            raise timed_out(self.origin.label, what, t.between_chunks_s, t, deadline)

    async def _receive_head(self, replayable: bool) -> h11.Response:
        proto, label = self.proto, self.origin.label
        first_byte = False
        while True:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamProtocolError(f"upstream {label}: {exc}") from exc
            if event is h11.NEED_DATA:
                try:
                    # Right after the request, or mid-head: the origin has yet to speak.
                    data = await self.read_some(waiting=True)
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


@attrs.define(eq=False)
class H11Response(UpstreamResponse):
    conn: H11Connection = attrs.field(repr=False)
    _deadline: float = attrs.field(repr=False)
    _timeouts: UpstreamTimeouts = attrs.field(repr=False)
    _done: bool = attrs.field(default=False, repr=False)
    detached: bool = attrs.field(default=False, repr=False)  # set when the `async with` ends
    #: h11 said NEED_DATA (in ``_with_buffered``) and nothing was fed since: asking again
    #: would only say it again.
    _dry: bool = attrs.field(default=False, repr=False)
    #: The last bytes came after a wait (a paced stream): the next read is not tried before
    #: waiting, since it would find nothing.
    _waited: bool = attrs.field(default=False, repr=False)

    async def receive(self) -> bytes:
        if self._done:
            return b""
        if self.detached:
            raise trio.ClosedResourceError("response read after its `async with` block ended")
        conn = self.conn
        proto = conn.proto
        while True:
            if self._dry:
                self._dry = False
                event: h11.Event | type[h11.NEED_DATA] | type[h11.PAUSED] = h11.NEED_DATA
            else:
                try:
                    event = proto.next_event()
                except h11.RemoteProtocolError as exc:  # bad framing, or EOF before the end
                    raise UpstreamProtocolError(f"upstream {self.origin}: {exc}") from exc
            if event is h11.NEED_DATA:
                if conn.fd >= 0 and not self._waited:
                    # Cleartext with bytes already waiting: take them without a timeout
                    # (the common case mid-body of a fast stream); one checkpoint keeps the
                    # loop fair.
                    try:
                        ready = conn.read_ready()
                    except trio.BrokenResourceError:
                        ready = None  # the scoped read below reports it
                    if ready is not None:
                        await trio.lowlevel.checkpoint()
                        proto.receive_data(ready)  # b"" is EOF
                        continue
                # Nothing there, or the last bytes needed a wait too: wait for more. Each
                # chunk of a paced stream comes this way, one wake-up each; a fast stream
                # that once had to wait goes back to trying reads first when a wait finds
                # more than one chunk's worth of bytes (see _with_buffered).
                t = self._timeouts
                deadline = min(self._deadline, trio.current_time() + t.between_chunks_s)
                with _Wait(conn, deadline) as wait:
                    try:
                        data = await conn.read_some(waiting=True)  # it just read dry
                    except trio.BrokenResourceError as exc:
                        msg = f"upstream {self.origin}: connection lost mid-body"
                        raise UpstreamConnectError(msg) from exc
                if wait.timed_out:
                    what = "no body bytes"
                    raise timed_out(self.origin, what, t.between_chunks_s, t, self._deadline)
                self._waited = True
                proto.receive_data(data)  # b"" is EOF
            elif isinstance(event, h11.Data):
                if event.data:
                    return self._with_buffered(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                return b""
            else:
                name = type(event).__name__
                raise UpstreamProtocolError(f"upstream {self.origin}: unexpected {name}")

    def _with_buffered(self, first: bytes | bytearray) -> bytes:
        """``first`` and any body bytes h11 already holds behind it, as one chunk.

        A fast upstream writes many small SSE chunks that arrive in one read; handing them
        on together lets the relay write them to the client at once (each is still sent as
        soon as it is here) instead of one write and one event-loop pass per chunk. The end
        of the body, if seen, is remembered for the next ``receive``."""
        proto = self.conn.proto
        parts = [first]
        while True:
            try:
                event = proto.next_event()
            except h11.RemoteProtocolError:
                break  # the next receive() asks again and raises
            if type(event) is h11.Data:
                parts.append(event.data)
                continue
            if type(event) is h11.EndOfMessage:
                self._done = True
            elif event is h11.NEED_DATA:
                self._dry = True  # all that was buffered is taken
            break
        if len(parts) == 1:
            # h11 hands out bytearray slices: bytes() copies one, join copies several.
            return bytes(first)
        self._waited = False  # chunks arrive faster than we take them: try reads first
        return b"".join(parts)


class _Wait:
    """``with _Wait(conn, due) as wait:`` bounds one wait on ``conn`` by ``due`` (trio time).

    While the connection's sweeper runs, the wait registers with it: a dict insert and
    delete instead of a cancel scope (about 6.5 us, paid per request for the head and per
    chunk of a paced stream). The sweeper wakes an overdue wait with ``notify_closing``,
    which surfaces as ``ClosedResourceError`` (or as a broken TLS stream, or whatever the
    code in the block made of either); the block's exception is then swallowed here, as a
    fired cancel scope swallows its ``Cancelled``, and ``wait.timed_out`` is true. Without a
    running sweeper (a pool used on its own), it is a plain cancel scope. Either way,
    ``Cancelled`` from an outer scope passes through untouched."""

    __slots__ = ("caught", "conn", "due", "scope", "watch")

    def __init__(self, conn: H11Connection, due: float) -> None:
        self.conn = conn
        self.due = due
        self.scope: trio.CancelScope | None = None
        self.watch: SlowWatch | None = None
        self.caught = False

    def __enter__(self) -> _Wait:
        conn, watch = self.conn, self.conn.watch
        if watch is not None and watch.running:
            conn.expired = False
            watch.add(conn, conn.expire, self.due)
            self.watch = watch
        else:
            self.scope = trio.CancelScope(deadline=self.due)
            self.scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self.scope is not None:
            return bool(self.scope.__exit__(exc_type, exc, tb))
        assert self.watch is not None
        self.watch.discard(self.conn)
        # An expiry that raced a wait which had already ended well is no timeout.
        self.caught = self.conn.expired and isinstance(exc, Exception)
        return self.caught

    @property
    def timed_out(self) -> bool:
        return self.scope.cancelled_caught if self.scope is not None else self.caught


async def _close(stream: trio.abc.Stream) -> None:
    """Close in a shielded, bounded scope: safe in ``finally`` and under cancellation."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
