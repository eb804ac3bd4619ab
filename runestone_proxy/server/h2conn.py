"""HTTP/2 server connections over h2: streams, flow control, drain and flood defences.

The listener calls :func:`serve_h2` once it knows a connection speaks HTTP/2 (the cleartext
preface was sniffed, or TLS ALPN chose ``h2``). Every stream becomes one
:class:`~runestone_proxy.api.http.Request` handed to ``Frontend.dispatch``; the stream
object itself is that request's body source and the handler's responder.

How this works::

    serve_h2(stream, gateway)           catches, logs and closes; only Cancelled escapes
    └── connection nursery
        ├── reader (nursery body)       socket -> FrameGuard -> h2 -> events; the only reader
        ├── writer                      the only writer: queued output -> socket
        ├── drain watcher               gateway.draining -> GOAWAY(NO_ERROR)
        └── stream tasks                one stream at a time, each with one cancel scope:
                                        gateway.dispatch(request, stream)

* Writing. h2 is sans-IO: any task changes it synchronously, then calls ``flush``, which
  moves h2's output to the :class:`~runestone_proxy.server.h2writer.SerialWriter` and waits
  only while more than ``_HIGH_WATER_BYTES`` are still unwritten: the answers of all the
  streams that ran in one scheduler pass go out in one write, and a slow reader holds up
  its writers. Cancelling a stream never cuts a frame in half; a peer that stops reading
  for ``send_timeout_s`` loses the whole connection.
* Request bodies. DATA is queued on its stream without ever blocking the reader, and its
  flow-control credit (RFC 9113 §5.2, §6.9) is handed back only as the handler consumes it,
  so a slow handler closes its own stream's window. The connection window is opened to
  ``(max streams + 1) x stream window`` up front: one stalled stream never starves the
  others at connection level, and buffered bodies stay bounded by that product. The last
  chunk of a body needs no stream credit (no more DATA may follow), only connection
  credit, which is owed and sent one stream window at a time (the spare window covers it).
* Response bodies. ``send`` writes as much as the stream's window and the peer's frame size
  allow and parks until a WINDOW_UPDATE (§6.9) wakes it; a write still waiting for window
  ``send_timeout_s`` after it first stalled resets that stream with CANCEL, however the
  client drips its window open. Other streams are unaffected.
* Stream limit. h2 treats a stream beyond our SETTINGS_MAX_CONCURRENT_STREAMS as a
  connection error; §5.1.2 also allows a stream error, REFUSED_STREAM, which clients retry.
  So h2 is given a higher internal cap (:mod:`~runestone_proxy.protocol.h2setup`, which
  configures h2) and this module refuses the excess itself.
* Headers. h2's own header checks are off; each request block goes through
  :func:`~runestone_proxy.protocol.h2headers.read_request` (h2's verdict, cheaper, and the
  handler's view of the block from the same pass), and a malformed one ends the
  connection with GOAWAY(PROTOCOL_ERROR) as h2 did.
* GOAWAY. h2 ends the connection on any GOAWAY it sends or receives. The graceful one
  (drain, idle) is therefore a raw frame written beside h2's output, so in-flight streams
  keep running and later streams are refused (§6.8). Error GOAWAYs go through h2.
* Abuse. :class:`~runestone_proxy.protocol.h2limits.FrameGuard` scans frame headers before
  h2 parses them (rapid reset, CONTINUATION, SETTINGS/PING floods); h2's own
  ``ProtocolError`` carries the code for everything else. Either way: GOAWAY, then close.
* Stream tasks. A stream is served by a task of the connection nursery inside a cancel
  scope, which cancelling the stream (RST_STREAM either way, the connection closing)
  cancels. A task whose stream ended without that waits for the next stream instead of
  exiting, and keeps its scope: a new task and a new scope per stream cost more than
  everything else the connection does for it (about 4% of an h2 request's instructions).
  A task whose scope was cancelled exits; the next stream gets a new one. The idle tasks
  are at most as many as streams ran at once, and go when the connection's nursery is
  cancelled.
* Closing. After a GOAWAY the connection half-closes and reads (and drops) what the client
  still sends for a moment, so a TCP reset cannot destroy the GOAWAY in flight.
* Timeouts. ``header_timeout_s`` until the first request, ``keepalive_timeout_s`` while no
  stream is open, ``body_timeout_s`` per wait for request body and a minimum rate for the
  whole body (408; see :mod:`~runestone_proxy.protocol.slowclient`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import attrs
import h2.connection
import h2.events
import h2.exceptions
import structlog
import trio
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hyperframe.frame import GoAwayFrame

from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.h2headers import check_trailers, read_request
from runestone_proxy.protocol.h2limits import FrameGuard, Violation
from runestone_proxy.protocol.h2setup import server_protocol
from runestone_proxy.server.fdstream import FdStream
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h2stream import H2Stream
from runestone_proxy.server.h2tasks import Idle, StreamTasks
from runestone_proxy.server.h2writer import SerialWriter, discard_input

__all__ = ["serve_h2"]

log = structlog.get_logger("runestone.h2")

_LINGER_S = 2.0
_CLOSE_S = 2.0
_MAX_STREAM_ID = 2**31 - 1  # RFC 9113 §5.1.1
#: Unwritten output past which ``flush`` waits for the writer: four default-sized DATA
#: frames (RFC 9113 §4.2), about what one ``send`` on loopback takes at once.
_HIGH_WATER_BYTES = 65536


async def serve_h2(
    stream: trio.abc.Stream, gateway: Frontend, *, initial: bytes = b"", client: str | None = None
) -> None:
    """Serve one HTTP/2 connection until it ends. ``initial``: bytes already read (preface)."""
    conn = H2ServerConnection(stream, gateway, client)
    linger = False
    try:
        linger = await conn.run(initial)
    except* Exception:
        log.exception("h2.connection.crashed", client=client)
    finally:
        await conn.close(linger=linger)


@attrs.define(eq=False, repr=False)
class H2ServerConnection(StreamTasks, FdStream):
    """One HTTP/2 connection: the h2 state machine, its stream table and its socket.

    Reads take :class:`~runestone_proxy.server.fdstream.FdStream`'s raw-fd path on
    cleartext (``fd``), as HTTP/1.1 connections do; a lost socket reads as EOF."""

    stream: trio.abc.Stream
    gateway: Frontend
    client: str | None
    limits: LimitsConfig = attrs.field(init=False)
    proto: h2.connection.H2Connection = attrs.field(init=False)
    guard: FrameGuard = attrs.field(init=False)
    streams: dict[int, H2Stream] = attrs.Factory(dict)
    _on: dict[type[h2.events.Event], Callable[[Any], None]] = attrs.field(init=False)
    writer: SerialWriter = attrs.field(init=False)
    _nursery: trio.Nursery | None = None
    _read_scope: trio.CancelScope | None = None
    _opened_at: float = attrs.Factory(trio.current_time)
    _idle_since: float | None = None
    #: Stream tasks waiting for a stream (see the docstring), the latest last.
    _idle: list[Idle] = attrs.Factory(list)
    #: Request fields already vouched for on this connection (``h2headers.read_request``).
    _known_fields: set[tuple[bytes, bytes]] = attrs.Factory(set)
    #: Request body bytes consumed whose connection-level credit is not yet sent.
    _owed: int = 0
    _last_stream_id: int = _MAX_STREAM_ID
    _goaway_sent: bool = False
    _ending: bool = False
    _linger: bool = False
    _closing: bool = False
    fd: int = -1

    def __attrs_post_init__(self) -> None:
        self.limits = self.gateway.config.limits
        self.proto = server_protocol(self.limits)
        limits = self.limits
        self.writer = SerialWriter(self.stream, limits.send_timeout_s, on_broken=self._stop)
        if isinstance(self.stream, trio.SocketStream):
            self.fd = self.writer.fd = self.stream.socket.fileno()
        self.guard = FrameGuard.from_limits(
            max_resets_per_s=limits.h2_max_resets_per_s,
            max_control_frames_per_s=limits.h2_max_control_frames_per_s,
            max_continuation_frames=limits.h2_max_continuation_frames,
            max_header_list_bytes=limits.h2_max_header_list_bytes,
        )
        self._on = {
            h2.events.RequestReceived: self._on_request,
            h2.events.TrailersReceived: self._on_trailers,
            h2.events.DataReceived: self._on_data,
            h2.events.StreamEnded: self._on_stream_ended,
            h2.events.StreamReset: self._on_reset,
            h2.events.WindowUpdated: self._on_window,
            h2.events.RemoteSettingsChanged: self._on_settings,
            h2.events.ConnectionTerminated: self._on_terminated,
        }

    def lost(self, exc: Exception) -> bytes:
        return b""  # a reset, or the socket closed under the read: the client is gone

    def __repr__(self) -> str:
        return f"<H2ServerConnection client={self.client} streams={len(self.streams)}>"

    # -- lifecycle ---------------------------------------------------------------------------

    async def run(self, initial: bytes) -> bool:
        """Serve until the connection ends; True when a GOAWAY wants a lingering close."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self.writer.run)
            nursery.start_soon(self._watch_drain)
            try:
                await self._read_loop(initial)
            finally:
                self._stop()
        return self._linger and not self.writer.broken

    async def close(self, *, linger: bool) -> None:
        """Flush and linger if a GOAWAY went out, then close (shielded and bounded)."""
        self._stop()
        try:
            if linger and not self.writer.broken:  # a courtesy: it yields to cancellation
                with trio.move_on_after(_LINGER_S):
                    self._take_output()
                    await self.writer.send_rest()
                    await discard_input(self.stream)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_S):
                await self.stream.aclose()

    async def _watch_drain(self) -> None:
        await self.gateway.draining.wait()
        self._goaway_gracefully()
        self._wake_reader()

    def _stop(self) -> None:
        """Cancel every stream and the connection nursery (idempotent, synchronous)."""
        self._closing = True
        for st in self.streams.values():
            st.cancel()
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        self.writer.cut_short(_CLOSE_S)

    # -- reading -----------------------------------------------------------------------------

    async def _read_loop(self, data: bytes | bytearray) -> None:
        """Read and feed h2 until the connection ends. One cancel scope bounds every wait
        (a scope per read cost each read an enter and an exit); its deadline is
        :meth:`_read_deadline`'s, moved whenever that changes (:meth:`_wake_reader`)."""
        with trio.CancelScope(deadline=self._read_deadline()) as scope:
            self._read_scope = scope
            try:
                while True:
                    if data:
                        if not self._feed(data):
                            return
                        self._wake_reader()  # a first stream opened: no deadline while it runs
                        await self.flush()
                    data = await self.receive(waiting=True)
                    if not data:
                        return  # the client went away; nobody is left to tell
            finally:
                self._read_scope = None
        # Idle, slow to start, or drained: say GOAWAY before closing (RFC 9113 §9.1).
        self._goaway_gracefully()
        self._linger = True

    def _read_deadline(self) -> float:
        if self.streams:
            return math.inf
        if self._goaway_sent:
            return -math.inf
        if self._idle_since is None:
            return self._opened_at + self.limits.header_timeout_s
        return self._idle_since + self.limits.keepalive_timeout_s

    def _wake_reader(self) -> None:
        """Move the reader's deadline if it changed (streams opened or all ended, a GOAWAY)."""
        scope = self._read_scope
        if scope is not None and scope.deadline != (deadline := self._read_deadline()):
            scope.deadline = deadline

    def _feed(self, data: bytes | bytearray) -> bool:
        """Hand ``data`` to the guard, then to h2; False once the connection must end."""
        violation = self.guard.feed(data, trio.current_time())
        if violation is not None:
            self._abort(violation)
            return False
        try:
            events = self.proto.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has queued a GOAWAY carrying exc.error_code (RFC 9113 §5.4.1).
            code = getattr(exc.error_code, "name", exc.error_code)
            log.info("h2.protocol_error", client=self.client, code=code, error=str(exc))
            self._goaway_sent = self._linger = True
            return False
        on = self._on
        try:
            for event in events:
                handler = on.get(type(event))
                if handler is not None:
                    handler(event)
                    if self._ending:
                        return False
        except h2.exceptions.ProtocolError as exc:
            # A malformed header block (protocol.h2headers): what h2 did when it checked.
            log.info("h2.protocol_error", client=self.client, code="PROTOCOL_ERROR", error=str(exc))
            self.proto.close_connection(ErrorCodes.PROTOCOL_ERROR)
            self._goaway_sent = self._linger = True
            return False
        return True

    def _abort(self, violation: Violation) -> None:
        log.warning("h2.abuse", client=self.client, reason=violation.reason)
        last = min(self._last_stream_id, self.proto.highest_inbound_stream_id)
        self.proto.close_connection(violation.error_code, last_stream_id=last)
        self._goaway_sent = self._linger = self._ending = True

    # -- events (called by the reader, synchronously) ----------------------------------------

    def _on_request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        head = read_request(event.headers, self._known_fields)  # ProtocolError: see _feed
        if self._goaway_sent or len(self.streams) >= self.limits.h2_max_concurrent_streams:
            # RFC 9113 §5.1.2 and §8.7: REFUSED_STREAM means "not processed, safe to retry".
            self.proto.reset_stream(sid, ErrorCodes.REFUSED_STREAM)
            violation = self.guard.note_reset(trio.current_time())
            if violation is not None:
                self._abort(violation)
            return
        if self._idle:
            idle = self._idle.pop()
            st, request = H2Stream.open(self, sid, head, idle.scope)
            self.streams[sid] = st
            idle.next = (st, request)
            trio.lowlevel.reschedule(idle.task)
            return
        st, request = H2Stream.open(self, sid, head, trio.CancelScope())
        self.streams[sid] = st
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_streams, st, request, name="h2.stream")

    def _on_trailers(self, event: h2.events.TrailersReceived) -> None:
        check_trailers(event.headers)  # then ignored, as before; StreamEnded follows

    def _on_data(self, event: h2.events.DataReceived) -> None:
        st = self.streams.get(event.stream_id)
        flow = event.flow_controlled_length
        if st is not None and event.data:
            st.on_data(event.data, flow)
        else:  # padding only, or nobody left to read it: the credit goes back at once
            self.credit(event.stream_id, flow)

    def _on_stream_ended(self, event: h2.events.StreamEnded) -> None:
        if (st := self.streams.get(event.stream_id)) is not None:
            st.on_end()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        if (st := self.streams.get(event.stream_id)) is not None:
            st.cancel()  # RFC 9113 §6.4: the client (or h2, on a stream error) reset it

    def _on_window(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id == 0:
            self._wake_writers()
        elif (st := self.streams.get(event.stream_id)) is not None:
            st.wake()

    def _on_settings(self, event: h2.events.RemoteSettingsChanged) -> None:
        if SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._wake_writers()  # RFC 9113 §6.9.2: every stream window moved

    def _on_terminated(self, event: h2.events.ConnectionTerminated) -> None:
        self._ending = True  # the client said GOAWAY: cancel everything and close

    def _wake_writers(self) -> None:
        for st in self.streams.values():
            st.wake()

    # -- writing -----------------------------------------------------------------------------

    def queue_output(self) -> bool:
        """Hand what h2 has to send to the writer; True when more than ``_HIGH_WATER_BYTES``
        is unwritten, and the caller must :meth:`wait_writer` (see the docstring)."""
        # A lone stream has nobody to share a write with: it writes now, rather than wake
        # the writer task for it (a task switch per response at low concurrency).
        self.writer.queue(self.proto.data_to_send(), now=len(self.streams) <= 1)
        return self.writer.backlog > _HIGH_WATER_BYTES

    async def wait_writer(self) -> None:
        await self.writer.wait_below(_HIGH_WATER_BYTES)

    async def flush(self) -> None:
        """Queue what h2 has to send; wait while too much is unwritten (see the docstring).
        No checkpoint when nothing waits: every caller yields at its next real wait."""
        if self.queue_output():
            await self.writer.wait_below(_HIGH_WATER_BYTES)

    def _take_output(self) -> None:
        self.writer.queue(self.proto.data_to_send())

    def _goaway_gracefully(self) -> None:
        """Queue GOAWAY(NO_ERROR) without telling h2, which would end every stream (§6.8)."""
        if not self._goaway_sent:
            self._goaway_sent = True
            self._last_stream_id = self.proto.highest_inbound_stream_id
            frame = GoAwayFrame(0, last_stream_id=self._last_stream_id, error_code=0)
            self._take_output()  # keep h2's frames ahead of it
            self.writer.queue(frame.serialize())
