"""The HTTP/2 connection handler (serve_h2) over real loopback sockets.

Test rules: the server binds 127.0.0.1 port 0 (``h2_serve``); every test body runs under
``trio.fail_after``; waits are for events (handler hooks, frames, PING round trips), never
sleeps. The few timeout tests use tiny real timeouts, because the mock clock's autojump
would also jump while the kernel moves bytes between the sockets.
"""

from __future__ import annotations

import json
import ssl
from typing import Any

import attrs
import pytest
import trio
import trustme
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from h2_helpers import H2_PREFACE, H2Client, H2Server, h2_serve
from hyperframe.frame import ContinuationFrame, HeadersFrame, PingFrame, SettingsFrame

from runestone_proxy.api.http import SSE_HEADERS, Request, Responder
from runestone_proxy.config import Config, LimitsConfig
from runestone_proxy.server.frontend import Frontend

BIG = 200_000


@attrs.define
class Env:
    """A gateway with test routes, served by serve_h2; the routes' hooks are trio Events."""

    gateway: Frontend
    server: H2Server = attrs.field(init=False)
    stream_go: trio.Event = attrs.Factory(trio.Event)
    slow_started: trio.Event = attrs.Factory(trio.Event)
    slow_cancelled: trio.Event = attrs.Factory(trio.Event)
    big_done: trio.Event = attrs.Factory(trio.Event)
    big_cancelled: trio.Event = attrs.Factory(trio.Event)
    read_first: trio.Event = attrs.Factory(trio.Event)
    read_go: trio.Event = attrs.Factory(trio.Event)
    flood_cancelled: trio.Event = attrs.Factory(trio.Event)

    async def client(self, **kwargs: Any) -> H2Client:
        return await H2Client.connect(self.server.port, **kwargs)

    async def echo(self, request: Request, responder: Responder) -> None:
        body = await request.body()
        headers = [
            (b"Content-Type", b"application/octet-stream"),
            (b"connection", b"close"),  # connection-specific: must not reach the wire
            (b"x-seen-host", request.header(b"host") or b""),
            (b"x-seen-version", request.http_version.encode()),
        ]
        await responder.respond(200, headers, body)

    async def stream(self, request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")
        await self.stream_go.wait()
        await responder.send(b"data: two\n\n")

    async def slow(self, request: Request, responder: Responder) -> None:
        self.slow_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.slow_cancelled.set()

    async def big(self, request: Request, responder: Responder) -> None:
        try:
            await responder.start(200, [])
            for _ in range(4):
                await responder.send(b"x" * (BIG // 4))
            self.big_done.set()
        finally:
            if not self.big_done.is_set():
                self.big_cancelled.set()

    async def slow_read(self, request: Request, responder: Responder) -> None:
        first = await request.body_source.receive()
        self.read_first.set()
        await self.read_go.wait()
        total = len(first) + sum([len(chunk) async for chunk in request.stream()])
        await responder.respond(200, [], str(total).encode())

    async def silent(self, request: Request, responder: Responder) -> None:
        pass

    async def flood(self, request: Request, responder: Responder) -> None:
        try:
            await responder.start(200, [])
            chunk = b"f" * (1 << 20)
            while True:
                await responder.send(chunk)
        finally:
            self.flood_cancelled.set()


async def start(
    nursery: trio.Nursery, ssl_context: ssl.SSLContext | None = None, **limits: Any
) -> Env:
    env = Env(Frontend(config=attrs.evolve(Config(), limits=LimitsConfig(**limits))))
    router = env.gateway.router
    for method in ("GET", "POST"):
        router.add(method, "/echo", env.echo)
    router.add("POST", "/slow-read", env.slow_read)
    router.add("GET", "/stream", env.stream)
    router.add("GET", "/slow", env.slow)
    router.add("GET", "/big", env.big)
    router.add("GET", "/silent", env.silent)
    router.add("GET", "/flood", env.flood)
    env.server = await h2_serve(nursery, env.gateway, ssl_context=ssl_context)
    return env


# --- requests and responses -------------------------------------------------------------------


async def test_prior_knowledge_get_and_post(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            got = await client.get("/echo")
            assert got.status == 200
            assert got.data == b""
            assert got.header(b"content-type") == b"application/octet-stream"
            assert got.header(b"connection") is None
            assert got.header(b"x-seen-host") == b"test.local"  # from :authority
            assert got.header(b"x-seen-version") == b"2"
            assert (got.header(b"x-request-id") or b"").startswith(b"req_")
            # A body bigger than the stream window: credit must flow back as it is read.
            body = bytes(range(256)) * 1000
            posted = await client.response(await client.request("POST", "/echo", body=body))
            assert posted.status == 200
            assert posted.data == body
            assert posted.header(b"content-length") == str(len(body)).encode()


async def test_request_id_is_echoed_or_made_up(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            mine = await client.get("/echo", [(b"x-request-id", b"trace-42")])
            assert mine.header(b"x-request-id") == b"trace-42"
            bad = await client.get("/echo", [(b"x-request-id", b"has space")])
            assert (bad.header(b"x-request-id") or b"").startswith(b"req_")
            missing = await client.get("/nope")
            assert missing.header(b"x-request-id") is not None


async def test_unknown_path_answers_404_envelope(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            got = await client.get("/nope")
            assert got.status == 404
            error = json.loads(got.data)["error"]
            assert error["code"] == "unknown_url"
            assert error["type"] == "invalid_request_error"


async def test_head_sends_no_body(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            got = await client.response(await client.request("HEAD", "/nope"))
            assert got.status == 404
            assert got.data == b""
            assert int(got.header(b"content-length") or 0) > 0


async def test_handler_without_response_gets_500(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            got = await client.get("/silent")
            assert got.status == 500
            assert json.loads(got.data)["error"]["type"] == "server_error"


async def test_body_over_limit_answers_413(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, max_body_bytes=1000)
        async with await env.client() as client:
            # Declared too large: answered before the body arrives, then the upload is
            # stopped with RST_STREAM(NO_ERROR) (RFC 9113 §8.1).
            sid = client.queue_request("POST", "/echo", [(b"content-length", b"5000")], end=False)
            await client.flush()
            declared = await client.response(sid)
            assert declared.status == 413
            assert json.loads(declared.data)["error"]["code"] == "request_too_large"
            await client.until(lambda: declared.reset_code == ErrorCodes.NO_ERROR)
            assert (await client.get("/echo")).status == 200


async def test_undeclared_body_over_limit_answers_413(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, max_body_bytes=1000)
        async with await env.client() as client:
            sent = await client.response(await client.request("POST", "/echo", body=b"y" * 2000))
            assert sent.status == 413
            assert json.loads(sent.data)["error"]["code"] == "request_too_large"
            assert (await client.get("/echo")).status == 200


async def test_concurrent_streams_on_one_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            streaming = await client.request("GET", "/stream")
            state = client.responses[streaming]
            await client.until(lambda: b"one" in state.data)
            bodies = {await client.request("POST", "/echo", body=b"%d" % n): n for n in range(20)}
            for sid, n in bodies.items():
                assert (await client.response(sid)).data == b"%d" % n
            assert not state.ended  # still mid-stream while the others finished
            env.stream_go.set()
            done = await client.response(streaming)
            assert done.data == b"data: one\n\ndata: two\n\n"
            assert done.header(b"content-type") == b"text/event-stream; charset=utf-8"


@pytest.fixture(scope="module")
def h2_ca() -> trustme.CA:
    return trustme.CA()


async def test_tls_with_alpn_h2(nursery: trio.Nursery, h2_ca: trustme.CA) -> None:
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    h2_ca.issue_cert("127.0.0.1").configure_cert(server_context)
    server_context.set_alpn_protocols(["h2", "http/1.1"])
    client_context = ssl.create_default_context()
    h2_ca.configure_trust(client_context)
    client_context.set_alpn_protocols(["h2"])
    with trio.fail_after(10):
        env = await start(nursery, ssl_context=server_context)
        async with await env.client(ssl_context=client_context) as client:
            posted = await client.response(await client.request("POST", "/echo", body=b"tls"))
            assert posted.status == 200
            assert posted.data == b"tls"
        assert env.server.alpn == ["h2"]


# --- flow control and cancellation ------------------------------------------------------------


async def test_unread_response_stalls_only_its_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            sid = client.queue_request("GET", "/big", end=True)
            client.stalled.add(sid)
            await client.flush()
            stalled = client.responses[sid]
            await client.until(lambda: len(stalled.data) == 65535)  # the default stream window
            other = await client.response(await client.request("POST", "/echo", body=b"hi"))
            assert other.data == b"hi"
            await client.ping_roundtrip()
            assert not env.big_done.is_set()
            assert len(stalled.data) == 65535
            await client.open_window(sid)
            assert len((await client.response(sid)).data) == BIG
            assert env.big_done.is_set()


async def test_window_shut_past_send_timeout_resets_the_stream(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, send_timeout_s=0.2)
        async with await env.client() as client:
            sid = client.queue_request("GET", "/big", end=True)
            client.stalled.add(sid)
            await client.flush()
            assert (await client.response(sid)).reset_code == ErrorCodes.CANCEL
            await env.big_cancelled.wait()
            assert (await client.get("/echo")).status == 200


async def test_a_window_opened_a_byte_at_a_time_cannot_stretch_a_write(
    nursery: trio.Nursery,
) -> None:
    # The HTTP/2 slow reader: every WINDOW_UPDATE comes well within send_timeout_s, but one
    # byte each; the write as a whole must finish within send_timeout_s of its first stall.
    with trio.fail_after(10):
        env = await start(nursery, send_timeout_s=0.3)
        async with await env.client() as client:
            sid = client.queue_request("GET", "/big", end=True)
            client.stalled.add(sid)
            await client.flush()
            state = client.responses[sid]
            await client.until(lambda: len(state.data) == 65535)  # the window, then a stall
            stalled = trio.current_time()
            while state.reset_code is None:
                with trio.move_on_after(0.05):
                    await client.until(lambda: state.reset_code is not None)
                if state.reset_code is None:
                    client.conn.increment_flow_control_window(1, stream_id=sid)
                    await client.flush()
            assert state.reset_code == ErrorCodes.CANCEL
            # The server's clock starts when its write stalls, a moment before the client
            # has read the window's last byte (``stalled``): allow that delivery time.
            assert trio.current_time() - stalled >= 0.3 - 0.05
            assert len(state.data) > 65535  # the drips were sent: it was reading, slowly
            await env.big_cancelled.wait()
            assert (await client.get("/echo")).status == 200  # the connection is not pinned


async def test_a_dribbled_request_body_gets_408_and_frees_the_stream(
    nursery: trio.Nursery,
) -> None:
    # A byte of DATA every 0.15 s: each wait is far inside body_timeout_s, but about 7
    # bytes/s is below the 10 bytes/s minimum, so the credit (0.2 s + received / 10) runs
    # out at about 0.6 s. Without the bound the stream would be held as long as it drips.
    with trio.fail_after(10):
        env = await start(nursery, body_timeout_s=5, body_grace_s=0.2, body_min_rate_bytes_per_s=10)
        async with await env.client() as client:
            sid = client.queue_request("POST", "/echo", end=False)
            await client.flush()
            state = client.responses[sid]
            started = trio.current_time()
            while not state.ended and state.reset_code is None:
                client.conn.send_data(sid, b"x")
                await client.flush()
                with trio.move_on_after(0.15):
                    await client.until(lambda: state.ended or state.reset_code is not None)
            assert state.status == 408
            error = json.loads(state.data)["error"]
            assert error["code"] == "request_timeout"
            assert "too slowly" in error["message"]
            assert trio.current_time() - started >= 0.5
            assert (await client.get("/echo")).status == 200  # the connection is not pinned


async def test_a_request_body_that_keeps_the_minimum_rate_is_unaffected(
    nursery: trio.Nursery,
) -> None:
    # Two bursts 0.5 s apart: past the 0.1 s grace period, but the first burst bought 2 s.
    with trio.fail_after(10):
        env = await start(nursery, body_grace_s=0.1, body_min_rate_bytes_per_s=1000)
        async with await env.client() as client:
            sid = client.queue_request("POST", "/echo", end=False)
            await client.send_body(sid, b"a" * 2000, end=False)
            await trio.sleep(0.5)  # the client's own pause, the thing under test
            await client.send_body(sid, b"b" * 2000)
            response = await client.response(sid)
            assert response.status == 200
            assert response.data == b"a" * 2000 + b"b" * 2000


async def test_slow_handler_keeps_the_request_window_shut(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            body = b"z" * BIG
            sid = client.queue_request("POST", "/slow-read", end=False)
            await client.flush()
            sent = client.queue_data(sid, body)
            assert sent == 65535  # the server's stream window
            await client.flush()
            await env.read_first.wait()
            # Everything the server credited back so far has arrived after this barrier.
            await client.ping_roundtrip()
            opened = client.conn.local_flow_control_window(sid)
            assert opened <= 16384  # only what the handler read (one frame) came back
            sent += client.queue_data(sid, body[sent:])
            await client.flush()
            await client.ping_roundtrip()
            assert client.conn.local_flow_control_window(sid) == 0
            assert sent < BIG
            env.read_go.set()
            await client.send_body(sid, body[sent:])
            got = await client.response(sid)
            assert got.data == str(BIG).encode()


async def test_client_reset_cancels_the_handler(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            sid = await client.request("GET", "/slow")
            await env.slow_started.wait()
            await client.reset(sid)
            await env.slow_cancelled.wait()
            assert (await client.get("/echo")).status == 200


async def test_streams_over_the_limit_are_refused(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, h2_max_concurrent_streams=2)
        async with await env.client() as client:
            # Sent before the server's SETTINGS arrive, so the client does not hold back.
            sids = [client.queue_request("GET", "/slow", end=True) for _ in range(3)]
            await client.flush()
            third = await client.response(sids[2])
            assert third.reset_code == ErrorCodes.REFUSED_STREAM
            await client.reset(sids[0])
            await env.slow_cancelled.wait()
            assert (await client.get("/echo")).status == 200
            assert client.conn.remote_settings.max_concurrent_streams == 2


# --- abuse ------------------------------------------------------------------------------------


async def assert_goaway(client: H2Client, code: ErrorCodes) -> None:
    got, _last = await client.goaway()
    assert got == code
    await client.read_to_eof()  # and the server closes the connection


async def test_rapid_reset_gets_goaway_and_spares_other_connections(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, h2_max_resets_per_s=50)
        async with await env.client() as bystander, await env.client() as attacker:
            for _ in range(60):
                sid = attacker.queue_request("GET", "/slow", end=True)
                attacker.conn.reset_stream(sid, ErrorCodes.CANCEL)
            await attacker.flush()
            await assert_goaway(attacker, ErrorCodes.ENHANCE_YOUR_CALM)
            assert (await bystander.get("/echo")).status == 200


async def test_continuation_flood_gets_goaway_and_spares_others(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as bystander, await env.client() as attacker:
            frames = [HeadersFrame(1, data=b"\x82", flags=["END_STREAM"])]
            frames += [ContinuationFrame(1, data=b"\x84") for _ in range(40)]
            await attacker.sock.send_all(b"".join(frame.serialize() for frame in frames))
            await assert_goaway(attacker, ErrorCodes.ENHANCE_YOUR_CALM)
            assert (await bystander.get("/echo")).status == 200


async def test_oversized_header_block_gets_goaway(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, h2_max_header_list_bytes=4096)
        async with await env.client() as client:
            await client.request("GET", "/echo", [(b"x-huge", bytes(range(256)) * 40)])
            await assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)


@pytest.mark.parametrize(
    "frame",
    [SettingsFrame(0), PingFrame(0, opaque_data=b"pingpong")],
    ids=["settings", "ping"],
)
async def test_control_frame_flood_gets_goaway(nursery: trio.Nursery, frame: Any) -> None:
    with trio.fail_after(10):
        env = await start(nursery, h2_max_control_frames_per_s=100)
        async with await env.client() as client:
            await client.sock.send_all(frame.serialize() * 150)
            await assert_goaway(client, ErrorCodes.ENHANCE_YOUR_CALM)


async def test_garbage_after_preface_is_a_protocol_error(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client(send_preface=False) as client:
            await client.sock.send_all(H2_PREFACE + b"GET / HTTP/1.1\r\nHost: nope\r\n\r\n")
            await assert_goaway(client, ErrorCodes.PROTOCOL_ERROR)


async def test_protocol_error_found_by_h2_gets_its_goaway(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            assert (await client.get("/echo")).status == 200
            # RFC 9113 §6.1: DATA on stream 0 is a connection error of type PROTOCOL_ERROR.
            await client.sock.send_all(b"\x00\x00\x01\x00\x00\x00\x00\x00\x00x")
            await assert_goaway(client, ErrorCodes.PROTOCOL_ERROR)
            assert client.goaways[0][1] == 1  # the last stream it processed


async def test_client_goaway_cancels_streams_and_closes(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            await client.request("GET", "/slow")
            await env.slow_started.wait()
            client.conn.close_connection()
            await client.flush()
            await env.slow_cancelled.wait()
            await client.read_to_eof(raw=True)


async def test_peer_that_stops_reading_is_cut_off_after_send_timeout(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        env = await start(nursery, send_timeout_s=0.2)
        async with await env.client(connection_window=2**31 - 1) as client:
            # Flow control would let the server send ~2 GiB, but this client reads nothing:
            # the socket buffers fill, and the blocked write must give up by itself.
            client.conn.update_settings({SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1})
            client.queue_request("GET", "/flood", end=True)
            await client.flush()
            await env.flood_cancelled.wait()


# --- drain and timeouts -----------------------------------------------------------------------


async def test_drain_sends_goaway_and_lets_streams_finish(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            sid = await client.request("GET", "/stream")
            state = client.responses[sid]
            await client.until(lambda: b"one" in state.data)
            env.gateway.draining.set()
            assert await client.goaway() == (ErrorCodes.NO_ERROR, sid)
            late = await client.response(await client.request("GET", "/echo"))
            assert late.reset_code == ErrorCodes.REFUSED_STREAM
            env.stream_go.set()
            done = await client.response(sid)
            assert done.data == b"data: one\n\ndata: two\n\n"
            await client.read_to_eof()  # closed once the last stream ended


async def test_idle_connection_gets_goaway(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, keepalive_timeout_s=0.05)
        async with await env.client() as client:
            sid = await client.request("GET", "/echo")
            assert (await client.response(sid)).status == 200
            assert await client.goaway() == (ErrorCodes.NO_ERROR, sid)
            await client.read_to_eof()


async def test_no_request_within_header_timeout_gets_goaway(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery, header_timeout_s=0.05)
        async with await env.client() as client:
            assert await client.goaway() == (ErrorCodes.NO_ERROR, 0)
            await client.read_to_eof()
