"""The upstream pool against real local servers: keep-alive, bounds, streaming, release
rules, error mapping, TLS, and the httpx proxy path.

Test rules: fake upstreams (and the fake proxy) are raw trio servers on 127.0.0.1, port 0,
speaking h11 by hand; each test body runs under ``trio.fail_after``; the order of events
between client and server is forced with ``trio.Event``s, never sleeps. Timeout tests use
real, small limits (0.2 s), since a mock clock would race real socket I/O. Host names
under ``.runestone.test`` resolve to 127.0.0.1 through a trio custom resolver, so TLS tests
exercise SNI and hostname checks without leaving the loopback address.
"""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from functools import partial
from typing import Any, cast
from urllib.parse import urlsplit

import attrs
import h11
import pytest
import trio
import trustme

from runestone_proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.server.slowwatch import SlowWatch
from runestone_proxy.server.upstream import UpstreamPool, UpstreamTimeouts
from runestone_proxy.server.upstream_h11 import H11Connection
from runestone_proxy.server.upstream_httpx import proxy_for
from runestone_proxy.server.upstream_wait import Wait

FAST = UpstreamTimeouts(connect_s=2, first_byte_s=2, between_chunks_s=2, total_s=5)
SHORT = UpstreamTimeouts(connect_s=2, first_byte_s=0.2, between_chunks_s=0.2, total_s=5)
LIMIT_S = 5
TEST_DOMAIN = ".runestone.test"
#: The two ways a head or body wait is bounded: a cancel scope each (a pool on its own), or
#: the pool's sweeper (as in the app, which runs ``pool.watch``).
WAITS = pytest.mark.parametrize("watched", [False, True], ids=["scopes", "sweeper"])


@asynccontextmanager
async def open_pool(watched: bool, **kwargs: Any) -> AsyncIterator[UpstreamPool]:
    async with UpstreamPool(**kwargs) as pool, trio.open_nursery() as nursery:
        if watched:
            await nursery.start(pool.watch.run)
        yield pool
        # Every wait took itself off the sweeper's list (idle-expiry entries are per origin).
        assert not [key for key in pool.watch.pending if isinstance(key, H11Connection)]
        nursery.cancel_scope.cancel()


# --- a fake upstream: raw trio + h11 ------------------------------------------------------


@attrs.define(eq=False)
class Exchange:
    """One request as the fake server's app sees it."""

    stream: trio.abc.Stream
    proto: h11.Connection
    request: h11.Request
    conn_id: int
    close_after: bool = False  # close the socket after this response (no Connection: close)

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.request.headers)

    async def next_event(self) -> h11.Event:
        return await _next_event(self.stream, self.proto)

    async def read_body(self) -> bytes:
        body = b""
        while isinstance(event := await self.next_event(), h11.Data):
            body += event.data
        assert isinstance(event, h11.EndOfMessage)
        return body

    async def send(self, *events: h11.Event) -> None:
        await self.stream.send_all(b"".join(self.proto.send(e) or b"" for e in events))

    async def respond(self, status: int = 200, body: bytes = b"ok") -> None:
        head = [(b"content-length", str(len(body)).encode())]
        await self.send(h11.Response(status_code=status, headers=head), h11.Data(data=body))
        await self.send(h11.EndOfMessage())

    async def start_chunked(self, first: bytes) -> None:
        head = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
        await self.send(head, h11.Data(data=first))

    async def wait_peer_close(self) -> None:
        with suppress(trio.BrokenResourceError):
            while await self.stream.receive_some(65536):
                pass


App = Callable[[Exchange], Awaitable[None]]


async def _next_event(stream: trio.abc.Stream, proto: h11.Connection) -> h11.Event:
    while (event := proto.next_event()) is h11.NEED_DATA:
        proto.receive_data(bytes(await stream.receive_some(65536)))
    assert not isinstance(event, type)
    return event


@attrs.define(eq=False)
class FakeUpstream:
    app: App
    port: int = 0
    accepted: int = 0
    open: int = 0
    peak_open: int = 0
    closed: int = 0
    requests: list[h11.Request] = attrs.Factory(list)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def handle(self, stream: trio.abc.Stream) -> None:
        conn_id = self.accepted
        self.accepted += 1
        self.open += 1
        self.peak_open = max(self.peak_open, self.open)
        self._notify()
        proto = h11.Connection(h11.SERVER)
        try:
            while isinstance(request := await _next_event(stream, proto), h11.Request):
                self.requests.append(request)
                self._notify()
                exchange = Exchange(stream, proto, request, conn_id)
                await self.app(exchange)
                if exchange.close_after or proto.our_state is not h11.DONE:
                    break
                if proto.their_state is not h11.DONE:
                    break
                proto.start_next_cycle()
        except (trio.BrokenResourceError, h11.RemoteProtocolError):
            pass
        finally:
            self.open -= 1
            self.closed += 1
            self._notify()
            with trio.CancelScope(shield=True), suppress(trio.BrokenResourceError):
                await stream.aclose()


async def ok_app(ex: Exchange) -> None:
    body = await ex.read_body()
    await ex.respond(200, b"echo:" + body)


Start = Callable[..., Awaitable[FakeUpstream]]


@pytest.fixture
def serve(nursery: trio.Nursery) -> Start:
    async def start(app: App = ok_app, ssl_context: ssl.SSLContext | None = None) -> FakeUpstream:
        server = FakeUpstream(app)
        if ssl_context is None:
            listeners = await nursery.start(
                partial(trio.serve_tcp, server.handle, 0, host="127.0.0.1")
            )
        else:
            serve_ssl = partial(
                trio.serve_ssl_over_tcp,
                server.handle,
                0,
                ssl_context,
                host="127.0.0.1",
                https_compatible=True,
            )
            listeners = await nursery.start(serve_ssl)
        server.port = (
            listeners[0].transport_listener.socket.getsockname()[1]
            if ssl_context
            else listeners[0].socket.getsockname()[1]
        )
        return server

    return start


# --- keep-alive, framing, the pool bound ----------------------------------------------------


async def test_sequential_requests_share_one_connection(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for i in range(5):
                body = f"req{i}".encode()
                async with pool.request("POST", f"{server.base}/v1/x?q={i}", [], body) as resp:
                    assert resp.status == 200
                    assert await resp.read() == b"echo:" + body
                assert pool.open_connections == 1
                assert pool.idle_connections == 1
            assert server.accepted == 1
            assert [r.target for r in server.requests] == [
                f"/v1/x?q={i}".encode() for i in range(5)
            ]
        assert pool.open_connections == 0


async def test_request_framing_and_headers(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            caller = [(b"X-Trace", b"abc"), (b"Content-Length", b"999"), (b"Host", b"evil")]
            async with pool.request("POST", f"{server.base}/p", caller, b"12345") as resp:
                assert (b"content-length", b"10") in resp.headers  # names arrive lower-cased
                await resp.read()
            async with pool.request("GET", server.base, []) as resp:
                await resp.read()
    post, get = server.requests
    assert dict(post.headers) == {
        b"host": f"127.0.0.1:{server.port}".encode(),
        b"content-length": b"5",
        b"x-trace": b"abc",
    }
    assert get.target == b"/"
    assert b"content-length" not in dict(get.headers)  # RFC 9110 §8.6


async def test_pool_bound_is_never_exceeded(serve: Start) -> None:
    gate = trio.Event()
    in_flight = 0

    async def held(ex: Exchange) -> None:
        nonlocal in_flight
        await ex.read_body()
        in_flight += 1
        await gate.wait()
        await ex.respond()

    server = await serve(held)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(max_connections_per_origin=2, timeouts=FAST) as pool:
            done = 0

            async def one() -> None:
                nonlocal done
                async with pool.request("GET", server.base, []) as resp:
                    await resp.read()
                done += 1

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(one)
                await server.wait_until(lambda: len(server.requests) == 2)
                assert pool.open_connections == 2
                gate.set()
            assert done == 8
            assert server.accepted == 2
            assert server.peak_open == 2
            assert pool.open_connections == pool.idle_connections == 2


async def test_waiting_for_a_slot_is_bounded_by_connect_s(serve: Start) -> None:
    gate = trio.Event()

    async def held(ex: Exchange) -> None:
        await ex.read_body()
        await ex.start_chunked(b"head first")
        await gate.wait()
        await ex.send(h11.EndOfMessage())

    server = await serve(held)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(max_connections_per_origin=1, timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []):
                fast = UpstreamTimeouts(connect_s=0.2)
                with pytest.raises(UpstreamTimeout, match="no free connection"):
                    async with pool.request("GET", server.base, [], timeouts=fast):
                        pass
                gate.set()


# --- streaming ----------------------------------------------------------------------------


async def test_chunked_response_is_consumed_incrementally(serve: Start) -> None:
    client_got_first = trio.Event()

    async def chunked(ex: Exchange) -> None:
        await ex.read_body()
        await ex.start_chunked(b"one")
        await client_got_first.wait()
        await ex.send(h11.Data(data=b"two"), h11.EndOfMessage())

    server = await serve(chunked)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"one"
                client_got_first.set()
                assert await resp.receive() == b"two"
                assert await resp.receive() == b""
                assert await resp.receive() == b""
            assert pool.idle_connections == 1  # read to the end: kept


async def test_a_connection_is_reused_after_a_chunked_body(serve: Start) -> None:
    """The chunked body is decoded beside h11: the next exchange on the connection gets a
    fresh state machine, and works (trailers included)."""

    async def chunked(ex: Exchange) -> None:
        await ex.read_body()
        await ex.start_chunked(b"one")
        trailer = [(b"x-trailer", b"t")]
        await ex.send(h11.Data(data=b"two"), h11.EndOfMessage(headers=trailer))

    server = await serve(chunked)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for _ in range(3):
                async with pool.request("POST", server.base, [], b"q") as resp:
                    assert await resp.read() == b"onetwo"
                assert pool.idle_connections == 1
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"onetwo"
    assert server.accepted == 1
    assert len(server.requests) == 4


async def test_a_chunked_answer_with_connection_close_is_not_reused(serve: Start) -> None:
    async def closing(ex: Exchange) -> None:
        await ex.read_body()
        head = [(b"connection", b"close"), (b"transfer-encoding", b"chunked")]
        await ex.send(h11.Response(status_code=200, headers=head), h11.Data(data=b"ok"))
        await ex.send(h11.EndOfMessage())

    server = await serve(closing)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for _ in range(2):
                async with pool.request("GET", server.base, []) as resp:
                    assert await resp.read() == b"ok"
                assert pool.open_connections == 0  # RFC 9112 §9.6: not reused
    assert server.accepted == 2


async def test_bytes_past_a_chunked_body_are_not_left_on_a_pooled_connection(
    serve: Start,
) -> None:
    async def overlong(ex: Exchange) -> None:
        await ex.read_body()
        raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\nXX"
        await ex.stream.send_all(raw)
        ex.close_after = True

    server = await serve(overlong)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"ok"
            assert pool.open_connections == 0


async def test_chunked_request_body_is_streamed(serve: Start) -> None:
    server_got_first = trio.Event()

    async def streaming_echo(ex: Exchange) -> None:
        assert ex.headers[b"transfer-encoding"] == b"chunked"
        assert b"content-length" not in ex.headers
        body = b""
        while isinstance(event := await ex.next_event(), h11.Data):
            body += event.data
            server_got_first.set()
        await ex.respond(200, body)

    async def produce() -> AsyncIterator[bytes]:
        yield b"alpha,"
        await server_got_first.wait()  # the first chunk left before the second exists
        yield b""
        yield b"beta"

    server = await serve(streaming_echo)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("POST", server.base, [], produce()) as resp:
                assert await resp.read() == b"alpha,beta"
            assert pool.idle_connections == 1


# --- release rules ------------------------------------------------------------------------


def _streaming_until_peer_closes(peer_closed: trio.Event) -> App:
    async def app(ex: Exchange) -> None:
        await ex.read_body()
        await ex.start_chunked(b"first")
        await ex.wait_peer_close()
        peer_closed.set()

    return app


async def test_leaving_early_closes_the_connection(serve: Start) -> None:
    peer_closed = trio.Event()
    server = await serve(_streaming_until_peer_closes(peer_closed))
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"first"
            assert pool.open_connections == 0
            await peer_closed.wait()
            with pytest.raises(trio.ClosedResourceError):
                await resp.receive()
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"first"
            assert server.accepted == 2


@WAITS
async def test_cancellation_mid_body_closes_the_connection(serve: Start, watched: bool) -> None:
    peer_closed = trio.Event()
    server = await serve(_streaming_until_peer_closes(peer_closed))
    got_first = trio.Event()
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=FAST) as pool:

            async def reader(task_status: trio.TaskStatus[trio.CancelScope]) -> None:
                with trio.CancelScope() as scope:
                    task_status.started(scope)
                    async with pool.request("GET", server.base, []) as resp:
                        await resp.receive()
                        got_first.set()
                        await resp.receive()  # blocks: the server sends nothing more
                    pytest.fail("not cancelled")

            async with trio.open_nursery() as nursery:
                scope = await nursery.start(reader)
                await got_first.wait()
                scope.cancel()
            assert pool.open_connections == 0
            await peer_closed.wait()


async def test_an_exception_in_the_block_closes_even_a_finished_response(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:

            async def fails_after_reading() -> None:
                async with pool.request("GET", server.base, []) as resp:
                    await resp.read()
                    raise KeyError("caller bug")

            with pytest.raises(KeyError):
                await fails_after_reading()
            assert pool.open_connections == 0
            await server.wait_until(lambda: server.closed == 1)


async def test_read_max_bytes(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("POST", server.base, [], b"x" * 100) as resp:
                with pytest.raises(UpstreamError, match="over 10 bytes"):
                    await resp.read(max_bytes=10)
            # Closed if the body was cut short, parked if it had all arrived (it was read to
            # its end with the bytes already buffered): never left checked out.
            assert pool.open_connections == pool.idle_connections


async def test_informational_responses_are_skipped(serve: Start) -> None:
    async def early_hints(ex: Exchange) -> None:
        await ex.read_body()
        await ex.send(h11.InformationalResponse(status_code=103, headers=[(b"link", b"</a>")]))
        await ex.respond(201, b"made")

    server = await serve(early_hints)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("POST", server.base, [], b"{}") as resp:
                assert resp.status == 201
                assert await resp.read() == b"made"
            assert pool.idle_connections == 1


async def test_connection_close_from_the_server_is_honoured(serve: Start) -> None:
    async def closing(ex: Exchange) -> None:
        await ex.read_body()
        head = [(b"connection", b"close"), (b"content-length", b"2")]
        await ex.send(h11.Response(status_code=200, headers=head), h11.Data(data=b"ok"))
        await ex.send(h11.EndOfMessage())

    server = await serve(closing)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for _ in range(2):
                async with pool.request("GET", server.base, []) as resp:
                    assert await resp.read() == b"ok"
                assert pool.open_connections == 0  # RFC 9112 §9.6: not reused
            assert server.accepted == 2


async def test_aclose_while_busy_closes_at_release(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        pool = UpstreamPool(timeouts=FAST)
        async with pool.request("GET", server.base, []) as resp:
            await pool.aclose()
            assert await resp.read() == b"echo:"
            assert pool.open_connections == 1
        assert pool.open_connections == 0
        with pytest.raises(trio.ClosedResourceError):
            pool.request("GET", server.base, [])


# --- stale keep-alive connections ---------------------------------------------------------


async def test_server_closing_an_idle_connection_is_noticed_before_reuse(serve: Start) -> None:
    async def then_close(ex: Exchange) -> None:
        await ok_app(ex)
        ex.close_after = True  # as a server's idle timeout would, without Connection: close

    server = await serve(then_close)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"echo:"
            await server.wait_until(lambda: server.closed == 1)
            assert pool.idle_connections == 1  # still parked: nothing has looked at it yet
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"echo:"  # on a fresh connection
            assert server.accepted == 2
            await server.wait_until(lambda: server.closed == 2)
            assert await pool.prune_idle() == 1
            assert pool.open_connections == 0


async def test_connections_idle_past_the_limit_are_not_reused(serve: Start) -> None:
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(idle_timeout_s=0, timeouts=FAST) as pool:
            for _ in range(2):
                async with pool.request("GET", server.base, []) as resp:
                    await resp.read()
            assert server.accepted == 2
            assert pool.open_connections == 1
            await server.wait_until(lambda: server.closed == 1)


async def test_an_idle_connection_is_closed_on_schedule_without_a_request(
    serve: Start,
) -> None:
    # The sweeper closes it once idle_timeout_s has passed: the server sees EOF with no
    # checkout to notice the connection is stale. Then a request opens a fresh one.
    idle_s = 0.2
    server = await serve()
    with trio.fail_after(LIMIT_S):
        async with open_pool(True, idle_timeout_s=idle_s, timeouts=FAST) as pool:
            for _ in range(2):
                async with pool.request("GET", server.base, []) as resp:
                    assert await resp.read() == b"echo:"
                parked = trio.current_time()
                assert pool.idle_connections == 1
                with trio.fail_after(idle_s + 1):  # the limit, one sweep, a loaded machine
                    await server.wait_until(lambda: server.open == 0)
                assert trio.current_time() - parked >= idle_s
                assert pool.idle_connections == pool.open_connections == 0
            assert server.accepted == 2
            assert not pool.watch.pending  # nothing left to sweep: the sweeper sleeps


async def test_only_expired_idle_connections_are_swept(serve: Start) -> None:
    idle_s = 0.3
    both_in = trio.Event()
    arrived = 0

    async def wait_for_both(ex: Exchange) -> None:
        nonlocal arrived
        arrived += 1
        if arrived == 2:
            both_in.set()
        await both_in.wait()
        await ok_app(ex)

    server = await serve(wait_for_both)
    with trio.fail_after(LIMIT_S):
        async with open_pool(True, idle_timeout_s=idle_s, timeouts=FAST) as pool:

            async def one() -> None:
                async with pool.request("GET", server.base, []) as resp:
                    await resp.read()

            async with trio.open_nursery() as nursery:  # two connections, parked together
                nursery.start_soon(one)
                nursery.start_soon(one)
            assert pool.idle_connections == 2
            # Keep the warmer one busy (checkout takes the most recent) past the other's
            # expiry: only the cold one is closed, the busy one is untouched.
            hold = trio.Event()

            async def held(ex: Exchange) -> None:
                await ok_app(ex)
                await hold.wait()

            server.app = held
            async with pool.request("GET", server.base, []) as resp:
                await server.wait_until(lambda: server.open == 1)
                assert pool.idle_connections == 0
                assert pool.open_connections == 1
                assert await resp.read() == b"echo:"
            hold.set()
            assert pool.idle_connections == 1
            await server.wait_until(lambda: server.open == 0)
            assert pool.open_connections == 0


@pytest.mark.parametrize(
    ("method", "headers", "retried"),
    [
        ("GET", [], True),
        ("POST", [(b"Idempotency-Key", b"k1")], True),
        ("POST", [], False),  # may have been applied: not ours to repeat (RFC 9112 §9.3.1)
    ],
)
async def test_a_request_lost_to_a_keepalive_close_race(
    serve: Start, method: str, headers: list[tuple[bytes, bytes]], retried: bool
) -> None:
    async def drop_second_request(ex: Exchange) -> None:
        await ex.read_body()
        if len(server.requests) == 2:
            ex.close_after = True  # read it, then close without a byte of response
            return
        await ex.respond()

    server = await serve(drop_second_request)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request(method, server.base, headers) as resp:
                await resp.read()
            if retried:
                async with pool.request(method, server.base, headers) as resp:
                    assert await resp.read() == b"ok"
                assert server.accepted == 2
                assert pool.open_connections == 1
            else:
                with pytest.raises(UpstreamConnectError, match="closed before the response"):
                    async with pool.request(method, server.base, headers):
                        pass
                assert server.accepted == 1
                assert pool.open_connections == 0


# --- error mapping ------------------------------------------------------------------------


async def test_refused_port_is_a_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connections are refused
        with trio.fail_after(LIMIT_S):
            async with UpstreamPool(timeouts=FAST) as pool:
                url = f"http://127.0.0.1:{port}/v1?api_key=secret"
                with pytest.raises(UpstreamConnectError) as info:
                    async with pool.request("GET", url, [(b"authorization", b"Bearer sk-x")]):
                        pass
                assert f"http://127.0.0.1:{port}" in info.value.message
                assert "secret" not in info.value.message
                assert "sk-x" not in info.value.message
                assert pool.open_connections == 0


async def _stall(ex: Exchange) -> None:
    await ex.read_body()
    await ex.wait_peer_close()


@WAITS
async def test_stall_before_the_head_is_a_timeout(serve: Start, watched: bool) -> None:
    server = await serve(_stall)
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=SHORT) as pool:
            started = trio.current_time()
            with pytest.raises(UpstreamTimeout, match=r"no response head within 0\.2s"):
                async with pool.request("GET", server.base, []):
                    pass
            assert trio.current_time() - started >= 0.2  # never early
            assert pool.open_connections == 0
            # The pool still works: a fresh connection, answered in time.
            server.app = ok_app
            async with pool.request("GET", server.base, []) as resp:
                assert resp.status == 200


@WAITS
async def test_stall_between_chunks_is_a_timeout(serve: Start, watched: bool) -> None:
    server = await serve(_streaming_until_peer_closes(trio.Event()))
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=SHORT) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"first"
                with pytest.raises(UpstreamTimeout, match=r"no body bytes within 0\.2s"):
                    await resp.receive()
            assert pool.open_connections == 0


@WAITS
async def test_a_tls_stall_before_the_head_is_a_timeout(
    tls_upstream: TLSUpstream, watched: bool
) -> None:
    tls_upstream.server.app = _stall
    url = f"https://api.runestone.test:{tls_upstream.server.port}/"
    with trio.fail_after(LIMIT_S):
        pool_cm = open_pool(watched, ssl_context=tls_upstream.client_context, timeouts=SHORT)
        async with pool_cm as pool:
            with pytest.raises(UpstreamTimeout, match=r"no response head within 0\.2s"):
                async with pool.request("POST", url, [], b"{}"):
                    pass
            assert pool.open_connections == 0


@WAITS
async def test_the_total_limit_bounds_the_whole_exchange(serve: Start, watched: bool) -> None:
    server = await serve(_streaming_until_peer_closes(trio.Event()))
    limits = UpstreamTimeouts(connect_s=2, first_byte_s=2, between_chunks_s=10, total_s=0.3)
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=limits) as pool:
            async with pool.request("GET", server.base, []) as resp:
                await resp.receive()
                with pytest.raises(UpstreamTimeout, match=r"exceeded total_s=0\.3s"):
                    await resp.receive()


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"SMTP ready\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",  # then EOF mid-body
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",  # then EOF
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabcd\r\n",
    ],
)
@WAITS
async def test_a_malformed_response_is_a_protocol_error(
    serve: Start, raw: bytes, watched: bool
) -> None:
    async def broken(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(raw)
        ex.close_after = True

    server = await serve(broken)
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=FAST) as pool:
            with pytest.raises(UpstreamProtocolError, match=f"127.0.0.1:{server.port}"):
                async with pool.request("GET", server.base, []) as resp:
                    await resp.read()
            assert pool.open_connections == 0


@WAITS
async def test_a_reset_between_chunks_is_a_connect_error(serve: Start, watched: bool) -> None:
    """A chunked body cut by a TCP reset while the pool waits for the next chunk (the
    paced stream's wait, registered with the sweeper or in a scope): the connection was
    lost, which is neither a timeout nor a malformed body."""
    sent = trio.Event()

    async def reset(ex: Exchange) -> None:
        await ex.read_body()
        await ex.start_chunked(b"first")
        await sent.wait()  # the client is waiting for the next chunk
        sock = cast(trio.SocketStream, ex.stream).socket
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()  # RST, not FIN

    server = await serve(reset)
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"first"
                sent.set()
                with pytest.raises(UpstreamConnectError, match="connection lost mid-body"):
                    await resp.receive()
            assert pool.open_connections == 0


async def test_bad_urls_are_rejected(serve: Start) -> None:
    async with UpstreamPool() as pool:
        for url in ("ftp://example.com/", "http:///nohost", "http://user:pw@example.com/"):
            with pytest.raises(ValueError, match=r"upstream URL|credentials"):
                async with pool.request("GET", url, []):
                    pass


# --- TLS ----------------------------------------------------------------------------------


class _TestDomainResolver(trio.abc.HostnameResolver):
    """``*.runestone.test`` -> 127.0.0.1; every other name fails like NXDOMAIN."""

    async def getaddrinfo(  # type: ignore[override]
        self,
        host: bytes | str,
        port: bytes | str | int | None,
        family: int = 0,
        type: int = 0,
        proto: int = 0,
        flags: int = 0,
    ) -> list[tuple[socket.AddressFamily, socket.SocketKind, int, str, tuple[str, int]]]:
        name = host.decode() if isinstance(host, bytes) else host
        if not name.endswith(TEST_DOMAIN) or name.startswith("nosuch."):
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [
            (
                socket.AF_INET,
                socket.SOCK_STREAM,
                socket.IPPROTO_TCP,
                "",
                ("127.0.0.1", int(port or 0)),
            )
        ]

    async def getnameinfo(
        self, sockaddr: tuple[str, int] | tuple[str, int, int, int], flags: int
    ) -> tuple[str, str]:
        raise NotImplementedError


@attrs.define
class TLSUpstream:
    server: FakeUpstream
    client_context: ssl.SSLContext
    sni: list[str | None]


@pytest.fixture
async def tls_upstream(serve: Start, tls_ca: trustme.CA) -> AsyncIterator[TLSUpstream]:
    previous = trio.socket.set_custom_hostname_resolver(_TestDomainResolver())
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls_ca.issue_cert("api.runestone.test").configure_cert(server_context)
    sni: list[str | None] = []
    server_context.sni_callback = lambda _sock, name, _ctx: sni.append(name)
    client_context = ssl.create_default_context()
    tls_ca.configure_trust(client_context)
    yield TLSUpstream(await serve(ssl_context=server_context), client_context, sni)
    trio.socket.set_custom_hostname_resolver(previous)


async def test_tls_with_sni_and_keepalive(tls_upstream: TLSUpstream) -> None:
    server = tls_upstream.server
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(ssl_context=tls_upstream.client_context, timeouts=FAST) as pool:
            for _ in range(3):
                url = f"https://api.runestone.test:{server.port}/v1/models"
                async with pool.request("POST", url, [], b"hi") as resp:
                    assert await resp.read() == b"echo:hi"
    assert tls_upstream.sni == ["api.runestone.test"]
    assert server.accepted == 1
    assert dict(server.requests[0].headers)[b"host"] == f"api.runestone.test:{server.port}".encode()


@pytest.mark.parametrize(
    ("host", "trusted", "match"),
    [
        ("wrong.runestone.test", True, "TLS failed.*(hostname|match)"),
        ("api.runestone.test", False, "TLS failed.*certificate verify failed"),  # system CAs
        ("nosuch.runestone.test", True, "cannot connect"),  # DNS
    ],
)
async def test_tls_and_dns_failures_are_connect_errors(
    tls_upstream: TLSUpstream, host: str, trusted: bool, match: str
) -> None:
    context = tls_upstream.client_context if trusted else None
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(ssl_context=context, timeouts=FAST) as pool:
            with pytest.raises(UpstreamConnectError, match=match):
                async with pool.request("GET", f"https://{host}:{tls_upstream.server.port}/", []):
                    pass
            assert pool.open_connections == 0


# --- the outbound-proxy path (httpx) ------------------------------------------------------


@attrs.define(eq=False)
class FakeProxy:
    """Absolute-form forwarding for http:// and CONNECT tunnels for https://, then a blind
    byte pipe (RFC 9112 §3.2.2, RFC 9110 §9.3.6)."""

    port: int = 0
    request_lines: list[bytes] = attrs.Factory(list)

    async def handle(self, client: trio.SocketStream) -> None:
        buffer = b""
        while b"\r\n\r\n" not in buffer:
            if not (data := await client.receive_some(65536)):
                return
            buffer += data
        head, _, rest = buffer.partition(b"\r\n\r\n")
        line, _, fields = head.partition(b"\r\n")
        self.request_lines.append(line)
        method, target, version = line.split(b" ")
        if method == b"CONNECT":
            host, _, port = target.decode().rpartition(":")
            upstream = await trio.open_tcp_stream(host, int(port))
            await client.send_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
        else:
            url = urlsplit(target.decode())
            assert url.hostname is not None
            upstream = await trio.open_tcp_stream(url.hostname, url.port or 80)
            origin_form = (url.path or "/") + (f"?{url.query}" if url.query else "")
            head = b" ".join([method, origin_form.encode(), version]) + b"\r\n" + fields
            await upstream.send_all(head + b"\r\n\r\n")
        if rest:
            await upstream.send_all(rest)
        async with upstream, trio.open_nursery() as nursery:
            nursery.start_soon(_pipe, client, upstream, nursery.cancel_scope)
            nursery.start_soon(_pipe, upstream, client, nursery.cancel_scope)


async def _pipe(source: trio.abc.Stream, sink: trio.abc.Stream, done: trio.CancelScope) -> None:
    with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
        while data := await source.receive_some(65536):
            await sink.send_all(data)
    done.cancel()


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> FakeProxy:
    fake = FakeProxy()
    listeners = await nursery.start(partial(trio.serve_tcp, fake.handle, 0, host="127.0.0.1"))
    fake.port = listeners[0].socket.getsockname()[1]
    return fake


@pytest.mark.parametrize(
    ("scheme", "host", "port", "env", "expected"),
    [
        ("https", "api.openai.com", 443, {"HTTPS_PROXY": "http://p:3128"}, "http://p:3128"),
        (
            "https",
            "api.openai.com",
            443,
            {"https_proxy": "p:1", "HTTPS_PROXY": "q:2"},
            "http://p:1",
        ),
        ("http", "api.openai.com", 80, {"HTTPS_PROXY": "http://p:3128"}, None),
        ("http", "x.com", 80, {"ALL_PROXY": "http://p:9"}, "http://p:9"),
        (
            "https",
            "api.openai.com",
            443,
            {"HTTPS_PROXY": "http://p", "NO_PROXY": "openai.com"},
            None,
        ),
        (
            "https",
            "api.openai.com",
            443,
            {"HTTPS_PROXY": "http://p", "no_proxy": ".openai.com"},
            None,
        ),
        (
            "https",
            "notopenai.com",
            443,
            {"HTTPS_PROXY": "http://p", "NO_PROXY": "openai.com"},
            "http://p",
        ),
        ("http", "127.0.0.1", 80, {"HTTP_PROXY": "http://p", "NO_PROXY": "127.0.0.0/8"}, None),
        (
            "http",
            "10.1.2.3",
            80,
            {"HTTP_PROXY": "http://p", "NO_PROXY": "localhost, 127.0.0.1"},
            "http://p",
        ),
        (
            "http",
            "h.internal",
            8080,
            {"HTTP_PROXY": "http://p", "NO_PROXY": "h.internal:8080"},
            None,
        ),
        (
            "http",
            "h.internal",
            80,
            {"HTTP_PROXY": "http://p", "NO_PROXY": "h.internal:8080"},
            "http://p",
        ),
        ("https", "any.example", 443, {"HTTPS_PROXY": "http://p", "NO_PROXY": "*"}, None),
        ("http", "::1", 80, {"HTTP_PROXY": "http://p", "NO_PROXY": "[::1]"}, None),
    ],
)
def test_proxy_selection(
    scheme: str, host: str, port: int, env: dict[str, str], expected: str | None
) -> None:
    assert proxy_for(scheme, host, port, env) == expected


async def test_http_through_a_proxy_in_absolute_form(serve: Start, proxy: FakeProxy) -> None:
    client_got_first = trio.Event()

    async def chunked(ex: Exchange) -> None:
        assert await ex.read_body() == b"payload"
        await ex.start_chunked(b"one")
        await client_got_first.wait()
        await ex.send(h11.Data(data=b"two"), h11.EndOfMessage())

    server = await serve(chunked)
    env = {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}"}
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST, proxy_env=env) as pool:
            url = f"{server.base}/v1/chat?x=1"
            async with pool.request("POST", url, [(b"X-Trace", b"t")], b"payload") as resp:
                assert resp.status == 200
                assert (b"transfer-encoding", b"chunked") in resp.headers
                assert await resp.receive() == b"one"
                client_got_first.set()
                assert await resp.read() == b"two"
            assert pool.open_connections == 0  # the direct transport was not used
    assert proxy.request_lines == [f"POST {url} HTTP/1.1".encode()]
    sent = dict(server.requests[0].headers)
    assert sent[b"x-trace"] == b"t"
    assert b"user-agent" not in sent  # no httpx defaults: the same bytes as the direct path
    assert b"accept-encoding" not in sent


async def test_no_proxy_sends_a_request_direct(serve: Start, proxy: FakeProxy) -> None:
    server = await serve()
    env = {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}", "NO_PROXY": "127.0.0.1"}
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST, proxy_env=env) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"echo:"
            assert pool.open_connections == 1
    assert proxy.request_lines == []


async def test_https_through_a_connect_tunnel(tls_upstream: TLSUpstream, proxy: FakeProxy) -> None:
    async def chunked_body(_: object) -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"

    port = tls_upstream.server.port
    env = {"https_proxy": f"127.0.0.1:{proxy.port}"}
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(
            ssl_context=tls_upstream.client_context, timeouts=FAST, proxy_env=env
        ) as pool:
            url = f"https://api.runestone.test:{port}/v1"
            async with pool.request("POST", url, [], chunked_body(None)) as resp:
                assert await resp.read() == b"echo:ab"
    assert proxy.request_lines == [f"CONNECT api.runestone.test:{port} HTTP/1.1".encode()]
    assert tls_upstream.sni == ["api.runestone.test"]


async def test_proxy_errors_are_mapped(serve: Start, proxy: FakeProxy) -> None:
    server = await serve(_streaming_until_peer_closes(trio.Event()))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = {"HTTP_PROXY": f"http://127.0.0.1:{probe.getsockname()[1]}"}
        with trio.fail_after(LIMIT_S):
            async with UpstreamPool(timeouts=FAST, proxy_env=dead) as pool:
                with pytest.raises(UpstreamConnectError, match="via proxy"):
                    async with pool.request("GET", server.base, []):
                        pass
    env = {"HTTP_PROXY": f"http://127.0.0.1:{proxy.port}"}
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=SHORT, proxy_env=env) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.receive() == b"first"
                with pytest.raises(UpstreamTimeout, match=r"no body bytes within 0\.2s"):
                    await resp.receive()


async def test_chunks_that_arrived_together_are_received_together(serve: Start) -> None:
    # Many small SSE chunks in one TCP write: one receive() hands them all on (so the relay
    # writes them at once), then the end of the body, then the connection is reusable.
    async def burst(ex: Exchange) -> None:
        await ex.read_body()
        head = h11.Response(status_code=200, headers=[(b"transfer-encoding", b"chunked")])
        pieces = [h11.Data(data=b"data: %d\n\n" % i) for i in range(5)]
        await ex.send(head, *pieces, h11.EndOfMessage())

    server = await serve(burst)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("POST", server.base, [], b"{}") as resp:
                first = await resp.receive()
                end = await resp.receive()
            assert pool.idle_connections == 1
    assert first == b"".join(b"data: %d\n\n" % i for i in range(5))
    assert end == b""


@WAITS
async def test_a_callers_deadline_tightens_the_exchange(serve: Start, watched: bool) -> None:
    # A failover attempt passes its bound: the pool's own waits end there (no extra scope).
    server = await serve(_streaming_until_peer_closes(trio.Event()))
    with trio.fail_after(LIMIT_S):
        async with open_pool(watched, timeouts=FAST) as pool:
            deadline = trio.current_time() + 0.3
            async with pool.request("GET", server.base, [], deadline=deadline) as resp:
                await resp.receive()
                with pytest.raises(UpstreamTimeout):
                    await resp.receive()
            assert trio.current_time() >= deadline
            assert pool.open_connections == 0  # an exchange cut short is never reused


# --- the sweeper-bound wait, as plain data ------------------------------------------------


@attrs.define(eq=False)
class _StubConn:
    """What ``Wait`` uses of a connection: its sweeper, the expiry flag and callback."""

    watch: SlowWatch
    expired: bool = False

    def expire(self) -> None:
        self.expired = True


class _OuterCancel(BaseException):
    """Stands in for ``trio.Cancelled``: not an ``Exception``."""


def test_a_sweeper_bound_wait_reports_only_the_expiry_that_ended_it() -> None:
    watch = SlowWatch()
    watch.running = True  # as if its task ran; nothing here needs the event loop
    stub = _StubConn(watch)
    conn = cast(H11Connection, stub)
    with Wait(conn, due=10.0) as wait:
        assert watch.pending[stub][0] == 10.0
        stub.expire()  # the sweeper ran just after the bytes had arrived: no timeout
    assert not wait.timed_out
    assert not watch.pending
    with Wait(conn, due=10.0) as wait:
        stub.expire()
        raise trio.ClosedResourceError  # how notify_closing ends the wait
    assert wait.timed_out
    with pytest.raises(trio.BrokenResourceError), Wait(conn, due=10.0) as wait:
        raise trio.BrokenResourceError  # not expired: a real failure goes on up
    assert not wait.timed_out

    def cancelled_while_expired() -> None:
        with Wait(conn, due=10.0):
            stub.expire()
            raise _OuterCancel  # an outer cancellation is never turned into a timeout

    with pytest.raises(_OuterCancel):
        cancelled_while_expired()
    assert not watch.pending
