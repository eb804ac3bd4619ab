"""HTTP/2 test helpers: a bare server around ``serve_h2`` and a raw h2 client over trio.

:func:`h2_serve` starts ``trio.serve_tcp`` on 127.0.0.1 port 0 with a handler that does what
the listener will do (read the cleartext preface, or finish a TLS handshake that must pick
ALPN ``h2``) and calls ``serve_h2``. Any exception escaping ``serve_h2`` crashes the test's
nursery, so "nothing escapes a connection" is checked by every test.

:class:`H2Client` drives h2's client side by hand, so tests can do what real clients never
do (withhold WINDOW_UPDATEs, exceed stream limits, flood). It keeps GOAWAY frames away from
h2, which would treat the first one as the end of the connection, and records them instead,
so a test can watch a drained stream finish after the server said GOAWAY.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable, Iterable
from functools import partial

import attrs
import h2.config
import h2.connection
import h2.events
import trio
from h2.errors import ErrorCodes

from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h2conn import serve_h2

H2_HOST = "127.0.0.1"
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_GOAWAY = 0x7


@attrs.define
class H2Server:
    port: int
    #: The ALPN protocol each TLS connection selected, in accept order.
    alpn: list[str | None] = attrs.Factory(list)


async def h2_serve(
    nursery: trio.Nursery, gateway: Frontend, *, ssl_context: ssl.SSLContext | None = None
) -> H2Server:
    server = H2Server(port=0)

    async def handler(stream: trio.SocketStream) -> None:
        client = "{}:{}".format(*stream.socket.getpeername()[:2])
        if ssl_context is not None:
            tls = trio.SSLStream(stream, ssl_context, server_side=True)
            await tls.do_handshake()
            server.alpn.append(tls.selected_alpn_protocol())
            if tls.selected_alpn_protocol() == "h2":
                await serve_h2(tls, gateway, client=client)
            await tls.aclose()
            return
        initial = b""
        while len(initial) < len(H2_PREFACE):
            chunk = await stream.receive_some(65536)
            if not chunk:
                return
            initial += chunk
        await serve_h2(stream, gateway, initial=initial, client=client)

    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host=H2_HOST))
    server.port = listeners[0].socket.getsockname()[1]
    return server


@attrs.define
class H2Response:
    headers: list[tuple[bytes, bytes]] | None = None
    data: bytearray = attrs.Factory(bytearray)
    ended: bool = False
    reset_code: int | None = None
    #: Flow-controlled bytes received but not yet acknowledged (stalled streams).
    unacked: int = 0

    @property
    def status(self) -> int:
        assert self.headers is not None
        return int(self.header(b":status") or 0)

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers or ():
            if key == name:
                return value
        return None


@attrs.define(eq=False)
class H2Client:
    sock: trio.abc.Stream
    conn: h2.connection.H2Connection
    responses: dict[int, H2Response] = attrs.Factory(dict)
    goaways: list[tuple[int, int]] = attrs.Factory(list)  # (error code, last stream id)
    stalled: set[int] = attrs.Factory(set)
    eof: bool = False
    pings_acked: int = 0
    _buf: bytearray = attrs.Factory(bytearray)

    @classmethod
    async def connect(
        cls,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        connection_window: int = 2**30,
        send_preface: bool = True,
    ) -> H2Client:
        if ssl_context is None:
            sock: trio.abc.Stream = await trio.open_tcp_stream(H2_HOST, port)
        else:
            sock = await trio.open_ssl_over_tcp_stream(H2_HOST, port, ssl_context=ssl_context)
        conn = h2.connection.H2Connection(
            config=h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        client = cls(sock, conn)
        conn.initiate_connection()
        if send_preface:
            # Like browsers: a big connection window, so per-stream windows decide.
            conn.increment_flow_control_window(connection_window - 65535)
            await client.flush()
        else:
            conn.data_to_send()  # the test writes its own first bytes
        return client

    async def __aenter__(self) -> H2Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.sock.aclose()

    async def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.sock.send_all(data)

    def queue_request(
        self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]] = (), *, end: bool
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        block = [
            (b":method", method.encode()),
            (b":scheme", b"http"),
            (b":authority", b"test.local"),
            (b":path", path.encode()),
            *headers,
        ]
        self.conn.send_headers(sid, block, end_stream=end)
        self.responses[sid] = H2Response()
        return sid

    async def request(
        self,
        method: str,
        path: str,
        headers: Iterable[tuple[bytes, bytes]] = (),
        body: bytes | None = None,
    ) -> int:
        sid = self.queue_request(method, path, headers, end=body is None)
        await self.flush()
        if body is not None:
            await self.send_body(sid, body)
        return sid

    def queue_data(self, sid: int, data: bytes) -> int:
        """Queue as much of ``data`` as the stream's window allows; how much that was."""
        sent = 0
        while sent < len(data):
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                break
            self.conn.send_data(sid, data[sent : sent + window])
            sent += min(window, len(data) - sent)
        return sent

    async def send_body(self, sid: int, data: bytes, *, end: bool = True) -> None:
        """Send ``data`` as flow control allows, reading (and waiting) for window updates."""
        sent = 0
        while sent < len(data):
            queued = self.queue_data(sid, data[sent:])
            sent += queued
            await self.flush()
            if not queued:
                await self.pump()
        if end:
            self.conn.end_stream(sid)
            await self.flush()

    async def get(self, path: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> H2Response:
        return await self.response(await self.request("GET", path, headers))

    async def response(self, sid: int) -> H2Response:
        state = self.responses[sid]
        await self.until(lambda: state.ended or state.reset_code is not None)
        return state

    async def until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            if not await self.pump():
                raise AssertionError("the server closed the connection first")

    async def pump(self) -> bool:
        """Read once and handle what arrived; False at EOF."""
        try:
            data = await self.sock.receive_some(65536)
        except trio.BrokenResourceError:
            data = b""
        if not data:
            self.eof = True
            return False
        self._buf += data
        keep = bytearray()
        while len(self._buf) >= 9:
            length = int.from_bytes(self._buf[:3], "big")
            if len(self._buf) < 9 + length:
                break
            frame, self._buf = self._buf[: 9 + length], self._buf[9 + length :]
            if frame[3] == _GOAWAY:
                last = int.from_bytes(frame[9:13], "big") & 0x7FFFFFFF
                self.goaways.append((int.from_bytes(frame[13:17], "big"), last))
            else:
                keep += frame
        for event in self.conn.receive_data(bytes(keep)) if keep else ():
            self._handle(event)
        try:
            await self.flush()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the server closed after a GOAWAY; what it sent is still readable
        return True

    def _handle(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            self.responses[event.stream_id].headers = list(event.headers)
        elif isinstance(event, h2.events.DataReceived):
            state = self.responses[event.stream_id]
            state.data += event.data
            if event.stream_id in self.stalled:
                state.unacked += event.flow_controlled_length
            else:
                self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            self.responses[event.stream_id].ended = True
        elif isinstance(event, h2.events.StreamReset):
            self.responses[event.stream_id].reset_code = int(event.error_code)
        elif isinstance(event, h2.events.PingAckReceived):
            self.pings_acked += 1

    async def open_window(self, sid: int) -> None:
        """Stop stalling ``sid``: acknowledge everything it received so far."""
        self.stalled.discard(sid)
        state = self.responses[sid]
        if state.unacked:
            self.conn.acknowledge_received_data(state.unacked, sid)
            state.unacked = 0
        await self.flush()

    async def ping_roundtrip(self) -> None:
        """A barrier: the server has processed everything sent before this returns."""
        want = self.pings_acked + 1
        self.conn.ping(b"barrier!")
        await self.flush()
        await self.until(lambda: self.pings_acked >= want)

    async def reset(self, sid: int, code: ErrorCodes = ErrorCodes.CANCEL) -> None:
        self.conn.reset_stream(sid, code)
        await self.flush()

    async def goaway(self) -> tuple[int, int]:
        """Wait for the server's GOAWAY; (error code, last stream id)."""
        await self.until(lambda: bool(self.goaways))
        return self.goaways[0]

    async def read_to_eof(self, *, raw: bool = False) -> None:
        """Read until the server closes; ``raw`` skips h2 (after this side's own GOAWAY)."""
        if not raw:
            while await self.pump():
                pass
            return
        try:
            while await self.sock.receive_some(65536):
                pass
        except trio.BrokenResourceError:
            pass
        self.eof = True

    async def aclose(self) -> None:
        await self.sock.aclose()
