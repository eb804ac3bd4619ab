"""An upstream response read incrementally: the base both transports share, and h11's.

:class:`UpstreamResponse` is what the pool hands the pipeline (``status``, ``headers``,
``receive()``/``read()``), for the pooled h11 client and the httpx transport alike.
:class:`H11Response` reads the body of one exchange on an
:class:`~runestone_proxy.server.upstream_h11.H11Connection` with a decoder from
:mod:`runestone_proxy.protocol`: :class:`~runestone_proxy.protocol.h1response.LengthDecoder`
for ``Content-Length``, :class:`~runestone_proxy.protocol.chunked.ChunkedDecoder` for a
chunked body (every streamed answer: one chunk per SSE event); either costs a fraction of
h11's per-event machinery. h11 reads a body only when it read the head (see
:mod:`.upstream_h11`) and the framing is not chunked (a body that runs to the
connection's end, say). Each wait for body bytes is bounded by ``between_chunks_s`` and
the total deadline (:class:`~runestone_proxy.server.upstream_wait.Wait`).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

import attrs
import h11
import trio

from runestone_proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.gateway.transport import UpstreamTimeouts
from runestone_proxy.protocol.chunked import ChunkedDecoder, ChunkedError
from runestone_proxy.protocol.h1response import CHUNKED, BodyDecoder, LengthDecoder, ResponseHead
from runestone_proxy.server.upstream_wait import Wait

if TYPE_CHECKING:
    from runestone_proxy.server.upstream_h11 import H11Connection

MAX_HEAD_BYTES: Final = 64 * 1024  # h11 max_incomplete_event_size: the largest response head


@attrs.define(eq=False)
class UpstreamResponse(abc.ABC):
    """A response whose body is read incrementally. Header names are lower-case bytes."""

    status: int
    headers: list[tuple[bytes, bytes]] = attrs.field(repr=False)
    origin: str  # scheme://host:port, safe to log

    @abc.abstractmethod
    async def receive(self) -> bytes:
        """The next body chunk, ``b""`` at the end; each call is bounded by between_chunks_s."""

    @property
    def body_done(self) -> bool:
        """The body was read to its end (see ``gateway.transport.Response``)."""
        return False

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
    #: The body's decoder when h11 does not read it (see :meth:`fast`, :meth:`take_chunked`).
    _decoder: BodyDecoder | None = attrs.field(default=None, repr=False)
    #: The body bytes that came with the head, for the decoder's first feed.
    _early: bytes = attrs.field(default=b"", repr=False)
    #: The connection may carry another request once the decoder saw the body's end.
    _reusable: bool = attrs.field(default=False, repr=False)
    #: Trio's clock, read directly by the per-chunk wait: ``trio.current_time()`` adds a
    #: frame and its KI-protection bookkeeping to every call (about half its cost).
    _now: Callable[[], float] = attrs.field(
        factory=lambda: trio.lowlevel.current_clock().current_time, repr=False
    )

    @classmethod
    def fast(
        cls,
        head: ResponseHead,
        early: bytes,
        origin: str,
        conn: H11Connection,
        deadline: float,
        timeouts: UpstreamTimeouts,
    ) -> H11Response:
        """A response whose head the fast parser read; ``early``: the bytes after it."""
        response = cls(head.status, head.headers, origin, conn, deadline, timeouts)
        if head.framing == CHUNKED:
            response._decoder = ChunkedDecoder(MAX_HEAD_BYTES)
        else:
            response._decoder = LengthDecoder(head.length)
        response._early = early
        response._reusable = head.keep_alive
        return response

    def take_chunked(self, head: h11.Response) -> None:
        """After h11 read the head: decode a chunked body with :class:`ChunkedDecoder`
        instead of h11 (its per-event machinery is most of what a paced stream's chunk costs
        to read). h11 parsed the head, so the framing is checked: a ``transfer-encoding``
        field is exactly ``chunked``. h11 is not used again for this response: at the
        body's end the connection is reused (:meth:`H11Connection.recycle`) if h11 would
        have kept it alive, which is the state it left ``our_state`` in after the head
        (``DONE``; ``MUST_CLOSE`` if either side said ``Connection: close`` or spoke
        HTTP/1.0)."""
        if not any(name == b"transfer-encoding" for name, _ in head.headers):
            return
        proto = self.conn.proto
        assert proto is not None
        early, closed = proto.trailing_data
        if closed:
            return  # EOF already seen with the head: let h11 report what is missing
        self._decoder = ChunkedDecoder(MAX_HEAD_BYTES)
        self._early = early
        self._reusable = proto.our_state is h11.DONE

    async def receive(self) -> bytes:
        """The next body bytes: decoded here when the fast parser or :meth:`take_chunked`
        gave the body a decoder (every streamed answer), else by h11
        (:meth:`_receive_h11`). The decoded loop is inline: it runs once per chunk of a
        paced stream, and each coroutine level costs a frame per call and per wake-up."""
        decoder = self._decoder
        if decoder is None or self._done or self.detached:
            return await self._receive_h11()
        conn = self.conn
        while not decoder.done:
            if self._early:
                data, self._early = self._early, b""
            else:
                ready = None
                if conn.fd >= 0 and not self._waited:
                    # Bytes may be waiting already (a fast stream): take them without a
                    # timeout; one checkpoint keeps the loop fair.
                    try:
                        ready = conn.read_ready()
                    except trio.BrokenResourceError:
                        ready = None  # the bounded read below reports it
                    if ready is not None:
                        await trio.lowlevel.checkpoint()
                if ready is None:
                    # Each chunk of a paced stream comes this way, one wake-up each.
                    ready = await self._wait_for_bytes()
                    # A wait that found more than one chunk: they come faster than we
                    # take them, so the next receive tries a read first.
                    self._waited = True
                data = ready
                if not data:
                    raise UpstreamProtocolError(
                        f"upstream {self.origin}: peer closed connection without sending "
                        f"complete message body: {decoder.missing()}"
                    )
            try:
                body = decoder.feed(data)
            except ChunkedError as exc:
                raise UpstreamProtocolError(f"upstream {self.origin}: {exc}") from None
            if decoder.chunks > 1:
                self._waited = False
            if body:
                if decoder.done:
                    self._body_end(decoder)
                return body
        self._body_end(decoder)
        return b""

    async def _receive_h11(self) -> bytes:
        """:meth:`receive` for a body h11 reads (or one that ended or was detached)."""
        if self._done:
            return b""
        if self.detached:
            raise trio.ClosedResourceError("response read after its `async with` block ended")
        conn = self.conn
        proto = conn.proto
        assert proto is not None
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
                data = await self._wait_for_bytes()
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
        assert proto is not None
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

    @property
    def body_done(self) -> bool:
        return self._done

    def _body_end(self, decoder: BodyDecoder) -> None:
        self._done = True
        if self._reusable and not decoder.extra and not self._early:
            self.conn.body_read()

    async def _wait_for_bytes(self) -> bytes:
        """One bounded wait for the next body bytes (``b""`` at EOF).

        While the pool's sweeper runs, this is :class:`Wait`'s registration written out:
        it runs once per chunk of a paced stream, and the context manager's object and
        three calls were a tenth of what the wait costs. Without the sweeper, :class:`Wait`
        (a cancel scope)."""
        conn, t = self.conn, self._timeouts
        deadline = min(self._deadline, self._now() + t.between_chunks_s)
        watch = conn.watch
        if watch is None or not watch.running:
            return await self._wait_scoped(deadline)
        conn.expired = False
        watch.add(conn, conn.expire, deadline)
        try:
            return await conn.receive(waiting=True)  # it just read dry
        except Exception as exc:
            # The sweeper's expiry surfaces as whatever the read made of a closed socket.
            if conn.expired:
                what = "no body bytes"
                raise timed_out(self.origin, what, t.between_chunks_s, t, self._deadline) from None
            if isinstance(exc, trio.BrokenResourceError):
                msg = f"upstream {self.origin}: connection lost mid-body"
                raise UpstreamConnectError(msg) from exc
            raise
        finally:
            watch.pending.pop(conn, None)

    async def _wait_scoped(self, deadline: float) -> bytes:
        conn, t = self.conn, self._timeouts
        data = b""
        with Wait(conn, deadline) as wait:
            try:
                data = await conn.receive(waiting=True)  # it just read dry
            except trio.BrokenResourceError as exc:
                msg = f"upstream {self.origin}: connection lost mid-body"
                raise UpstreamConnectError(msg) from exc
        if wait.timed_out:
            raise timed_out(self.origin, "no body bytes", t.between_chunks_s, t, self._deadline)
        return data
