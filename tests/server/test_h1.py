"""HTTP/1.1 over real loopback sockets: the listener, the h11 connection and their limits.

Test rules: the gateway runs in-process on 127.0.0.1 port 0 (``helpers.running_app``); the
client is :class:`helpers.RawClient`, which writes hand-made bytes, so malformed and hostile
requests are easy to send; every test body runs under ``trio.fail_after``; handlers and the
test meet on ``trio.Event``s, never on sleeps; timeout tests run on pytest-trio's
``autojump_clock`` so a ten-second limit costs no wall time.
"""

from __future__ import annotations

import re
import socket
from typing import Any

import pytest
import trio
import trio.testing
from helpers import (
    HOST,
    RawClient,
    Response,
    TLSFiles,
    chunked,
    get,
    make_config,
    request,
    running_app,
)

from runestone_proxy.api.http import SSE_HEADERS, Request, Responder
from runestone_proxy.protocol.h1 import Phase, allowed
from runestone_proxy.server.h1conn import H1Connection

TIMEOUT_S = 5
LIVE = request("GET", "/health/live")


async def echo(request: Request, responder: Responder) -> None:
    body = await request.body()
    await responder.respond(200, [(b"content-type", b"application/octet-stream")], body)


ECHO = {("POST", "/echo"): echo}


def error_code(response: Response) -> str:
    code: str = response.json()["error"]["code"]
    return code


async def assert_closed(client: RawClient) -> None:
    """The server closed the connection and sent nothing more."""
    assert await client.read_eof() == b""


# --- the happy paths ------------------------------------------------------------------------


async def test_keep_alive_serves_two_requests_on_one_connection() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            first = await client.exchange(LIVE)
            second = await client.exchange(LIVE)
    assert (first.status, second.status) == (200, 200)
    assert first.body == second.body == b'{"status":"ok"}'
    assert first.header("connection") is None


async def test_pipelined_requests_are_answered_in_order() -> None:
    burst = (
        request("GET", "/health/live", {"x-request-id": "first"})
        + request("POST", "/echo", {"x-request-id": "second"}, body=b"posted")
        + request("GET", "/nope", {"x-request-id": "third"})
    )
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), ECHO) as gw, await RawClient.connect(gw.port) as c:
            await c.send(burst)
            responses = [await c.read_response() for _ in range(3)]
            # Still open and in step afterwards.
            after = await c.exchange(LIVE)
    assert [r.header("x-request-id") for r in responses] == ["first", "second", "third"]
    assert [r.status for r in responses] == [200, 200, 404]
    assert responses[1].body == b"posted"
    assert after.status == 200


async def test_content_length_body() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), ECHO) as gw, await RawClient.connect(gw.port) as c:
            await c.send(request("POST", "/echo", {"content-length": "11"}))
            await c.send(b"hello ")
            await c.send(b"world")
            response = await c.read_response()
            again = await c.exchange(request("POST", "/echo", body=b"x" * 1000))
    assert (response.status, response.body) == (200, b"hello world")
    assert (again.status, again.body) == (200, b"x" * 1000)


async def test_chunked_request_body() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), ECHO) as gw, await RawClient.connect(gw.port) as c:
            await c.send(request("POST", "/echo", {"transfer-encoding": "chunked"}))
            await c.send(b"5\r\nhello\r\n")
            await c.send(b"6\r\n world\r\n")
            await c.send(b"0\r\n\r\n")
            response = await c.read_response()
            again = await c.exchange(LIVE)
    assert (response.status, response.body) == (200, b"hello world")
    assert again.status == 200


async def test_expect_100_continue() -> None:
    head = request("POST", "/echo", {"expect": "100-continue", "content-length": "4"})
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), ECHO) as gw, await RawClient.connect(gw.port) as c:
            await c.send(head)
            interim = await c.read_response()
            await c.send(b"body")
            final = await c.read_response()
    assert interim.status == 100
    assert (final.status, final.body) == (200, b"body")


async def test_head_sends_headers_and_no_body() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            head = await client.exchange(request("HEAD", "/health/live"), head=True)
            # Were any body bytes sent, this would parse them as a status line.
            after = await client.exchange(LIVE)
    assert head.status == 200
    assert head.header("content-length") == str(len(b'{"status":"ok"}'))
    assert (after.status, after.body) == (200, b'{"status":"ok"}')


async def test_streamed_response_flushes_each_chunk() -> None:
    go = trio.Event()

    async def stream(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")
        await go.wait()
        await responder.send(b"data: two\n\n")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/stream"): stream}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            await c.send(request("GET", "/stream"))
            head = await c.read_head()
            first = await c.read_chunk()  # arrives while the handler waits for ``go``
            go.set()
            second = await c.read_chunk()
            last = await c.read_chunk()
            after = await c.exchange(LIVE)
    assert head.status == 200
    assert head.header("transfer-encoding") == "chunked"
    assert head.header("content-type") == "text/event-stream; charset=utf-8"
    assert (first, second, last) == (b"data: one\n\n", b"data: two\n\n", b"")
    assert after.status == 200


async def test_connection_close_is_honoured() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            response = await client.exchange(
                request("GET", "/health/live", {"connection": "close"})
            )
            await assert_closed(client)
    assert response.status == 200
    assert response.header("connection") == "close"


async def test_http_1_0_without_keep_alive_closes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            await client.send(b"GET /health/live HTTP/1.0\r\n\r\n")
            response = await client.read_response()
            await assert_closed(client)
    assert (response.status, response.body) == (200, b'{"status":"ok"}')


@pytest.mark.parametrize("streaming", [False, True], ids=["waiting", "streaming"])
async def test_client_disconnect_cancels_the_handler(streaming: bool) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def hang(_request: Request, responder: Responder) -> None:
        if streaming:
            await responder.start(200, SSE_HEADERS)
            await responder.send(b"data: one\n\n")
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), {("GET", "/hang"): hang}) as gw:
            client = await RawClient.connect(gw.port)
            await client.send(request("GET", "/hang"))
            await started.wait()
            await client.aclose()
            await cancelled.wait()
            assert gw.app.gateway.open_connections <= 1
            assert (await get(gw.port, "/health/live")).status == 200


async def test_not_found_and_method_not_allowed_envelopes() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            missing = await client.exchange(request("GET", "/nope"))
            wrong = await client.exchange(request("POST", "/health/live", body=b"{}"))
            after = await client.exchange(LIVE)
    assert missing.status == 404
    assert missing.header("content-type") == "application/json"
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert error_code(missing) == "unknown_url"
    assert wrong.status == 405
    assert wrong.header("allow") == "GET, HEAD"
    assert error_code(wrong) == "method_not_allowed"
    assert after.status == 200


async def test_request_id_is_generated_or_echoed() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw, await RawClient.connect(gw.port) as client:
            fresh = await client.exchange(LIVE)
            echoed = await client.exchange(
                request("GET", "/health/live", {"x-request-id": "abc-123"})
            )
            unsafe = await client.exchange(request("GET", "/health/live", {"x-request-id": "a b"}))
            error = await client.exchange(request("GET", "/nope"))
    assert re.fullmatch(r"req_[0-9a-f]{24}", fresh.header("x-request-id") or "")
    assert echoed.header("x-request-id") == "abc-123"
    assert re.fullmatch(r"req_[0-9a-f]{24}", unsafe.header("x-request-id") or "")
    assert re.fullmatch(r"req_[0-9a-f]{24}", error.header("x-request-id") or "")


# --- limits: each answered with its status, then the connection closes ---------------------


async def rejected(limits: dict[str, Any], data: bytes) -> Response:
    """Send ``data`` on a fresh connection; the response, after checking the server closed."""
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(**limits), ECHO) as gw:
            async with await RawClient.connect(gw.port) as client:
                await client.send(data)
                response = await client.read_response()
                await assert_closed(client)
    assert response.header("connection") == "close"
    assert response.header("content-type") == "application/json"
    return response


@pytest.mark.parametrize("length", [300, 5000], ids=["parsed", "buffered"])
async def test_request_line_too_long_is_414(length: int) -> None:
    data = request("GET", "/" + "a" * length)
    response = await rejected({"max_request_line_bytes": 256, "max_header_bytes": 1024}, data)
    assert response.status == 414
    assert error_code(response) == "uri_too_long"


@pytest.mark.parametrize("count", [20, 200], ids=["parsed", "buffered"])
async def test_headers_too_large_is_431(count: int) -> None:
    data = request("GET", "/health/live", [(f"x-h{i}", "v" * 60) for i in range(count)])
    response = await rejected({"max_request_line_bytes": 256, "max_header_bytes": 1024}, data)
    assert response.status == 431
    assert error_code(response) == "headers_too_large"


async def test_content_length_over_the_limit_is_413_before_the_body() -> None:
    head = request("POST", "/echo", {"content-length": "100000"})
    response = await rejected({"max_body_bytes": 1000}, head)
    assert response.status == 413
    assert error_code(response) == "request_too_large"


async def test_chunked_body_over_the_limit_is_413() -> None:
    data = request("POST", "/echo", {"transfer-encoding": "chunked"}) + chunked(*[b"x" * 400] * 5)
    response = await rejected({"max_body_bytes": 1000}, data)
    assert response.status == 413
    assert error_code(response) == "request_too_large"


async def test_chunked_body_crossing_the_limit_while_streaming_is_413() -> None:
    started = trio.Event()

    async def upload(request: Request, responder: Responder) -> None:
        started.set()
        await echo(request, responder)

    config = make_config(max_body_bytes=1000)
    with trio.fail_after(TIMEOUT_S):
        async with running_app(config, {("POST", "/upload"): upload}) as gw:
            async with await RawClient.connect(gw.port) as client:
                await client.send(request("POST", "/upload", {"transfer-encoding": "chunked"}))
                await started.wait()  # the rest arrives while the handler reads
                for _ in range(5):
                    await client.send(b"190\r\n" + b"x" * 400 + b"\r\n")
                response = await client.read_response()
                await assert_closed(client)
    assert response.status == 413
    assert response.header("connection") == "close"


async def test_expect_100_continue_over_the_limit_gets_413_instead() -> None:
    head = request("POST", "/echo", {"expect": "100-continue", "content-length": "5000"})
    response = await rejected({"max_body_bytes": 1000}, head)
    assert response.status == 413


async def test_slow_body_gets_408_then_close(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(body_timeout_s=20)
    with trio.fail_after(60):
        async with running_app(config, ECHO) as gw, await RawClient.connect(gw.port) as client:
            await client.send(request("POST", "/echo", {"content-length": "10"}) + b"abc")
            response = await client.read_response()
            await assert_closed(client)
    assert response.status == 408
    assert response.header("connection") == "close"
    assert error_code(response) == "request_timeout"


#: A small rate bound for the slow-body tests: 100 bytes/s after a 5 s grace period.
PACE = {"body_timeout_s": 10, "body_grace_s": 5, "body_min_rate_bytes_per_s": 100}


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_dribbled_body_gets_408_once_below_the_minimum_rate(
    autojump_clock: trio.testing.MockClock, framing: str
) -> None:
    # A byte every half second: every read is far inside body_timeout_s, but 2 bytes/s is
    # below the minimum rate, so the body runs out of credit just after the grace period
    # (5 s + received / 100 bytes/s, about 5.1 s). Without the bound it would take 500 s.
    config = make_config(**PACE)
    headers = {"content-length": "1000"} if framing == "content-length" else {}
    if framing == "chunked":
        headers = {"transfer-encoding": "chunked"}
    with trio.fail_after(60):
        async with running_app(config, ECHO) as gw, await RawClient.connect(gw.port) as client:

            async def dribble() -> None:
                for _ in range(1000):
                    await client.send(b"1\r\nx\r\n" if framing == "chunked" else b"x")
                    await trio.sleep(0.5)

            await client.send(request("POST", "/echo", headers))
            started = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(dribble)
                response = await client.read_response()
                waited = trio.current_time() - started
                await assert_closed(client)
                nursery.cancel_scope.cancel()
    assert response.status == 408
    assert response.header("connection") == "close"
    assert error_code(response) == "request_timeout"
    assert "too slowly" in response.json()["error"]["message"]
    assert 5 <= waited < 6


async def test_a_body_that_keeps_the_minimum_rate_is_unaffected(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # 3,000 bytes in three bursts 4 s apart: past the 5 s grace period, but each burst buys
    # 10 s of credit, so the body (and a second request on the connection) gets through.
    config = make_config(**PACE)
    part = b"y" * 1000
    with trio.fail_after(60):
        async with running_app(config, ECHO) as gw, await RawClient.connect(gw.port) as client:
            await client.send(request("POST", "/echo", {"content-length": "3000"}))
            for _ in range(3):
                await trio.sleep(4)
                await client.send(part)
            response = await client.read_response()
            assert response.status == 200
            assert response.body == part * 3
            assert (await client.exchange(request("POST", "/echo", body=b"fast"))).body == b"fast"


async def test_a_client_that_stops_reading_is_dropped_after_send_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # The handler streams far more than the socket buffers hold; the client reads a little
    # now and then, never enough: each write must complete within send_timeout_s, however
    # the client trickles, so the handler is cancelled and the connection closed.
    config = make_config(send_timeout_s=30)
    cancelled = trio.Event()
    blocked_at: list[float] = []

    async def flood(request: Request, responder: Responder) -> None:
        try:
            await responder.start(200, SSE_HEADERS)
            while True:
                blocked_at.append(trio.current_time())
                await responder.send(b"z" * (1 << 20))
        finally:
            cancelled.set()

    with trio.fail_after(600):
        routes = {("GET", "/flood"): flood}
        async with running_app(config, routes) as gw, await RawClient.connect(gw.port) as client:
            await client.send(request("GET", "/flood"))

            async def trickle() -> None:
                while True:
                    await trio.sleep(1)
                    await client.stream.receive_some(100)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                await cancelled.wait()
                nursery.cancel_scope.cancel()
            ended = trio.current_time()
            await client.read_eof()  # what the kernel still held, then EOF
    assert 30 <= ended - blocked_at[-1] < 32


@pytest.mark.parametrize(
    "data",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nhost : test\r\n\r\n",
        b"GET /health/live HTTP/1.1\r\nhost: te\x00st\r\n\r\n",
        request("POST", "/echo", {"transfer-encoding": "chunked"}) + b"zz\r\nhello\r\n",
    ],
    ids=["request-line", "no-host", "space-before-colon", "nul-in-value", "chunk-size"],
)
async def test_malformed_request_is_400(data: bytes) -> None:
    response = await rejected({}, data)
    assert response.status == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_content_length_with_transfer_encoding_is_400() -> None:
    # RFC 9112 §6.1: a request with both is how smuggling starts; refuse and close.
    data = request(
        "POST", "/echo", {"content-length": "5", "transfer-encoding": "chunked"}
    ) + chunked(b"hello")
    response = await rejected({}, data)
    assert response.status == 400


async def test_conflicting_content_lengths_are_400() -> None:
    data = request("POST", "/echo", [("content-length", "5"), ("content-length", "6")]) + b"hello!"
    response = await rejected({}, data)
    assert response.status == 400


async def test_unsupported_transfer_encoding_is_501() -> None:
    data = request("POST", "/echo", {"transfer-encoding": "gzip"}) + b"xxxx"
    response = await rejected({}, data)
    assert response.status == 501


async def test_slow_headers_get_408_then_close(autojump_clock: trio.testing.MockClock) -> None:
    config = make_config(header_timeout_s=10)
    with trio.fail_after(60):
        async with running_app(config) as gw, await RawClient.connect(gw.port) as client:
            await client.send(b"GET /health/live HTTP/1.1\r\nhost: test\r\n")  # no blank line
            started = trio.current_time()
            response = await client.read_response()
            waited = trio.current_time() - started
            await assert_closed(client)
    assert response.status == 408
    assert error_code(response) == "request_timeout"
    assert 10 <= waited < 11


async def test_a_trickled_head_is_timed_from_its_first_byte(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Slowloris proper: a byte a second keeps every read short, never the whole head.
    config = make_config(header_timeout_s=10)
    head = request("GET", "/health/live")
    with trio.fail_after(60):
        async with running_app(config) as gw, await RawClient.connect(gw.port) as client:

            async def trickle() -> None:
                for byte in head[:-1]:
                    await client.send(bytes([byte]))
                    await trio.sleep(1)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle)
                started = trio.current_time()
                response = await client.read_response()
                waited = trio.current_time() - started
                nursery.cancel_scope.cancel()
    assert response.status == 408
    assert 10 <= waited < 11


async def test_idle_keep_alive_connection_is_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    config = make_config(keepalive_timeout_s=30, header_timeout_s=5)
    with trio.fail_after(120):
        async with running_app(config) as gw, await RawClient.connect(gw.port) as client:
            assert (await client.exchange(LIVE)).status == 200
            started = trio.current_time()
            await assert_closed(client)  # no 408 for a connection between requests
            waited = trio.current_time() - started
    assert 30 <= waited < 31


async def test_connection_cap_refuses_with_503() -> None:
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(max_connections=2)) as gw:
            async with (
                await RawClient.connect(gw.port) as first,
                await RawClient.connect(gw.port) as second,
            ):
                assert (await first.exchange(LIVE)).status == 200
                assert (await second.exchange(LIVE)).status == 200
                async with await RawClient.connect(gw.port) as third:
                    await third.send(LIVE)
                    refused = await third.read_response()
                    await assert_closed(third)
                assert (await first.exchange(LIVE)).status == 200
                assert (await second.exchange(LIVE)).status == 200
    assert refused.status == 503
    assert refused.header("connection") == "close"
    assert refused.header("retry-after") == "1"
    assert error_code(refused) == "service_unavailable"


async def test_connection_cap_holds_for_a_burst_of_connections() -> None:
    # Three connections complete their handshakes (blocking connects: no checkpoint between
    # them) before the server accepts any: the third must still be refused, whichever of the
    # accept loop and the new connection tasks the scheduler runs first.
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(max_connections=2)) as gw:
            socks = [socket.create_connection((HOST, gw.port)) for _ in range(3)]
            clients = [
                RawClient(trio.SocketStream(trio.socket.from_stdlib_socket(s))) for s in socks
            ]
            try:
                refused = await clients[2].read_response()
                served = [await c.exchange(LIVE) for c in clients[:2]]
            finally:
                for client in clients:
                    await client.aclose()
    assert refused.status == 503
    assert [r.status for r in served] == [200, 200]


async def test_a_burst_of_connections_taken_from_the_backlog_at_once_is_all_served() -> None:
    # The accept loop drains the backlog without yielding per connection: every one of a
    # burst that queued up before the first accept must still be served, in full.
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config()) as gw:
            socks = [socket.create_connection((HOST, gw.port)) for _ in range(40)]
            for sock in socks:
                sock.sendall(LIVE)
            clients = [
                RawClient(trio.SocketStream(trio.socket.from_stdlib_socket(s))) for s in socks
            ]
            try:
                answers = [await c.read_response() for c in clients]
            finally:
                for client in clients:
                    await client.aclose()
    assert [a.status for a in answers] == [200] * 40


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpn", [["http/1.1"], None], ids=["alpn", "no-alpn"])
async def test_tls_serves_http_1_1(tls_files: TLSFiles, alpn: list[str] | None) -> None:
    config = make_config(server={"tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)})
    context = tls_files.client_context(alpn)
    with trio.fail_after(TIMEOUT_S):
        async with running_app(config) as gw:
            async with await RawClient.connect(gw.port, ssl_context=context) as client:
                assert isinstance(client.stream, trio.SSLStream)
                selected = client.stream.selected_alpn_protocol()
                first = await client.exchange(LIVE)
                second = await client.exchange(
                    request("GET", "/health/live", {"connection": "close"})
                )
                await assert_closed(client)
    assert selected == ("http/1.1" if alpn else None)
    assert (first.status, first.body) == (200, b'{"status":"ok"}')
    assert second.status == 200


async def test_tls_port_drops_a_cleartext_client(tls_files: TLSFiles) -> None:
    config = make_config(server={"tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)})
    with trio.fail_after(TIMEOUT_S):
        async with running_app(config) as gw:
            async with await RawClient.connect(gw.port) as client:
                await client.send(LIVE)
                reply = await client.read_eof()
            # The listener is unharmed.
            context = tls_files.client_context(["http/1.1"])
            async with await RawClient.connect(gw.port, ssl_context=context) as client:
                after = await client.exchange(LIVE)
    assert not reply.startswith(b"HTTP/")
    assert after.status == 200


async def test_handler_crash_mid_stream_cuts_the_response() -> None:
    """A failure after the response started must not look like a complete response: no
    terminating chunk, and the connection closes."""

    async def crash(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")
        raise RuntimeError("boom")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/crash"): crash}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            await c.send(request("GET", "/crash"))
            head = await c.read_head()
            first = await c.read_chunk()
            rest = await c.read_eof()
    assert head.status == 200
    assert first == b"data: one\n\n"
    assert rest == b""  # closed without the zero-length last chunk


# --- the connection's one deadline (see h1conn "What a request costs") ---------------------


@pytest.mark.parametrize("arrives_after_s", [0.0, 29.5], ids=["early", "near-the-deadline"])
async def test_a_slow_handler_outlives_the_keep_alive_deadline(
    autojump_clock: trio.testing.MockClock, arrives_after_s: float
) -> None:
    # The wait's deadline stays on the connection while a fast handler runs; a slow one
    # (here 100 s, past the 30 s keep-alive timeout) must never be cut by it.
    async def slow(_request: Request, responder: Responder) -> None:
        await trio.sleep(100)
        await responder.respond(200, [(b"content-type", b"text/plain")], b"late")

    config = make_config(keepalive_timeout_s=30, header_timeout_s=5)
    with trio.fail_after(600):
        routes = {("GET", "/slow"): slow}
        async with running_app(config, routes) as gw, await RawClient.connect(gw.port) as client:
            assert (await client.exchange(LIVE)).status == 200
            await trio.sleep(arrives_after_s)
            response = await client.exchange(request("GET", "/slow"))
            after = await client.exchange(LIVE)
    assert (response.status, response.body) == (200, b"late")
    assert after.status == 200


async def test_a_header_value_with_a_line_break_never_reaches_the_wire() -> None:
    # Whole responses skip h11's serialiser; a CR/LF count guards the head we write.
    async def inject(_request: Request, responder: Responder) -> None:
        await responder.respond(200, [(b"x-note", b"a\r\nset-cookie: stolen=1")], b"body")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/inject"): inject}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            response = await c.exchange(request("GET", "/inject"))
    assert response.status == 500
    assert response.header("set-cookie") is None
    assert response.json()["error"]["type"] == "server_error"


async def test_a_watcher_armed_as_its_request_ends_never_becomes_a_second_reader() -> None:
    # The sweeper arms a slow request's watcher with start_soon; if the request ends before
    # that task first runs, the connection is already reading the next request, and the
    # watcher must stand down rather than wait on the same socket.
    running: list[Any] = []

    async def arm_then_answer(_request: Request, responder: Responder) -> None:
        slow = running[0].app.gateway.slow_watch
        for key in list(slow.pending):
            _, arm = slow.pending.pop(key)
            arm()  # what the sweeper does for a request still running after its delay
        await responder.respond(200, [(b"content-type", b"text/plain")], b"ok")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/arm"): arm_then_answer}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            running.append(gw)
            answers = [await c.exchange(request("GET", "/arm")) for _ in range(3)]
            after = await c.exchange(LIVE)
    assert [a.status for a in answers] == [200, 200, 200]
    assert after.status == 200


async def test_pipelined_requests_then_a_half_close_are_all_answered_then_closed() -> None:
    # Each direct response hands the bytes h11 still holds (the rest of the burst, then the
    # EOF) to a fresh h11 connection: nothing pipelined may be lost or reordered.
    async def stream(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")

    burst = (
        request("GET", "/health/live", {"x-request-id": "first"})
        + request("GET", "/stream", {"x-request-id": "second"})
        + request("POST", "/echo", {"x-request-id": "third"}, body=b"posted")
    )
    routes = {**ECHO, ("GET", "/stream"): stream}
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            await c.send(burst)
            assert isinstance(c.stream, trio.SocketStream)
            await c.stream.send_eof()
            first = await c.read_response()
            second = await c.read_head()
            chunks = [await c.read_chunk(), await c.read_chunk()]
            third = await c.read_response()
            await assert_closed(c)
    assert [r.header("x-request-id") for r in (first, second, third)] == [
        "first",
        "second",
        "third",
    ]
    assert chunks == [b"data: one\n\n", b""]
    assert (third.status, third.body) == (200, b"posted")


async def test_an_http_1_0_client_gets_its_stream_close_delimited() -> None:
    # No chunked coding for HTTP/1.0 (RFC 9112 §7.1): that head stays with h11, which frames
    # the body by closing the connection.
    async def stream(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")
        await responder.send(b"data: two\n\n")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/stream"): stream}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            await c.send(b"GET /stream HTTP/1.0\r\n\r\n")
            raw = await c.read_eof()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert b"transfer-encoding" not in head.lower()
    assert body == b"data: one\n\ndata: two\n\n"


async def test_head_of_a_streamed_resource_has_no_body() -> None:
    async def stream(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")

    with trio.fail_after(TIMEOUT_S):
        routes = {("GET", "/stream"): stream}
        async with running_app(make_config(), routes) as gw, await RawClient.connect(gw.port) as c:
            head = await c.exchange(request("HEAD", "/stream"), head=True)
            after = await c.exchange(LIVE)  # nothing of the stream was left on the wire
    assert head.status == 200
    assert head.header("content-type") == "text/event-stream; charset=utf-8"
    assert after.status == 200


# --- the phase table (protocol/h1.TRANSITIONS) holds the connection ----------------------------


@pytest.fixture
def phase_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Phase | None, Phase]]:
    """Every phase the connections assign, with the one before (None: the initial one)."""
    slot = H1Connection.__dict__["phase"]
    seen: list[tuple[Phase | None, Phase]] = []

    def get(conn: H1Connection) -> Phase:
        phase: Phase = slot.__get__(conn, H1Connection)
        return phase

    def assign(conn: H1Connection, value: Phase) -> None:
        try:
            before: Phase | None = slot.__get__(conn, H1Connection)
        except AttributeError:
            before = None
        seen.append((before, value))
        slot.__set__(conn, value)

    monkeypatch.setattr(H1Connection, "phase", property(get, assign))
    return seen


async def test_a_connection_makes_only_the_transitions_in_the_phase_table(
    autojump_clock: trio.testing.MockClock, phase_log: list[tuple[Phase | None, Phase]]
) -> None:
    config = make_config(header_timeout_s=10)
    head = request("GET", "/health/live")
    with trio.fail_after(60):
        async with running_app(config) as gw:
            async with await RawClient.connect(gw.port) as client:
                assert (await client.exchange(LIVE)).status == 200  # idle -> busy
                await client.send(LIVE + LIVE)  # pipelined: busy -> busy
                assert [(await client.read_response()).status for _ in range(2)] == [200, 200]
                await client.send(head[:5])  # a head in two reads: idle -> head -> busy
                await trio.sleep(1)
                await client.send(head[5:])
                assert (await client.read_response()).status == 200
                await client.send(head[:5])  # a slow head: answered 408
                assert (await client.read_response()).status == 408
    assert phase_log[0] == (None, Phase.IDLE)
    made = phase_log[1:]
    assert [(b, a) for b, a in made if b is None or not allowed(b, a)] == []
    assert {
        (Phase.IDLE, Phase.BUSY),
        (Phase.BUSY, Phase.BUSY),
        (Phase.BUSY, Phase.IDLE),
        (Phase.IDLE, Phase.HEAD),
        (Phase.HEAD, Phase.BUSY),
    } <= set(made)
