"""HTTP/2 fast paths over real loopback sockets: a whole answer queued in one go, the
connection credit of request bodies that arrived whole, owed and sent in batches, and
stream tasks kept for the next stream.

Same rules as test_h2.py: 127.0.0.1 port 0, every test under ``trio.fail_after``, no sleeps.
"""

from __future__ import annotations

from typing import Any

import attrs
import trio
from h2_helpers import H2Client, h2_serve

from runestone_proxy.api.http import Request, Responder
from runestone_proxy.config import Config, LimitsConfig
from runestone_proxy.server.frontend import Frontend

_DEFAULT_WINDOW = 65535  # RFC 9113 §6.9.2
_DATA, _HEADERS = 0x0, 0x1  # frame types, RFC 9113 §6.1, §6.2
_END_STREAM, _END_HEADERS = 0x1, 0x4


async def echo(request: Request, responder: Responder) -> None:
    await responder.respond(
        200, [(b"content-type", b"application/octet-stream")], await request.body()
    )


async def serve(nursery: trio.Nursery, **limits: Any) -> int:
    gateway = Frontend(config=attrs.evolve(Config(), limits=LimitsConfig(**limits)))
    gateway.router.add("POST", "/echo", echo)
    return (await h2_serve(nursery, gateway)).port


async def test_a_small_answer_is_one_headers_and_one_data_frame(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        port = await serve(nursery)
        async with await H2Client.connect(port) as client:
            sid = await client.request("POST", "/echo", body=b"hello")
            # Read the raw frames (RFC 9113 §4.1) of that stream until it ends.
            raw, frames = bytearray(), []
            while not frames or not frames[-1][1] & _END_STREAM:
                chunk = await client.sock.receive_some(65536)
                assert chunk, "the server closed the connection"
                raw += chunk
                while len(raw) >= 9 and len(raw) >= 9 + int.from_bytes(raw[:3], "big"):
                    size = int.from_bytes(raw[:3], "big")
                    kind, flags = raw[3], raw[4]
                    if int.from_bytes(raw[5:9], "big") & 0x7FFFFFFF == sid:
                        frames.append((kind, flags, bytes(raw[9 : 9 + size])))
                    del raw[: 9 + size]
            assert [(kind, flags) for kind, flags, _ in frames] == [
                (_HEADERS, _END_HEADERS),
                (_DATA, _END_STREAM),
            ]
            assert frames[1][2] == b"hello"


async def test_bodies_over_the_frame_size_or_window_still_go_out_whole(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        port = await serve(nursery)
        async with await H2Client.connect(port) as client:
            # Over the peer's 16 KiB frame size (RFC 9113 §4.2), under its stream window.
            body = bytes(range(256)) * 80
            got = await client.response(await client.request("POST", "/echo", body=body))
            assert got.data == body
            # Over the stream window: the rest waits for the client's WINDOW_UPDATEs.
            body = b"w" * (3 * _DEFAULT_WINDOW)
            got = await client.response(await client.request("POST", "/echo", body=body))
            assert got.data == body


async def test_whole_bodies_give_their_connection_credit_back(nursery: trio.Nursery) -> None:
    """Forty bodies of 4,000 bytes on one connection are far more than its 65,535-byte window:
    each arrives whole (one DATA frame with END_STREAM), so only the connection is owed
    credit, sent a stream window (8 KiB here) at a time; the client is never short of more
    than that."""
    window = 8192
    with trio.fail_after(20):
        port = await serve(nursery, h2_initial_window_bytes=window, h2_max_concurrent_streams=1)
        async with await H2Client.connect(port) as client:
            for i in range(40):
                body = bytes([i]) * 4000
                sid = client.queue_request("POST", "/echo", end=False)
                client.conn.send_data(sid, body, end_stream=True)  # one DATA frame, the end
                await client.flush()
                got = await client.response(sid)
                assert got.data == body
                # Credit went out before the answer did: what is still owed is under a window.
                assert client.conn.outbound_flow_control_window > _DEFAULT_WINDOW - window


async def test_concurrent_whole_bodies_never_stall_the_connection(nursery: trio.Nursery) -> None:
    window = 8192
    with trio.fail_after(20):
        port = await serve(nursery, h2_initial_window_bytes=window, h2_max_concurrent_streams=4)
        async with await H2Client.connect(port) as client:
            for round_ in range(10):
                sids = []
                for _ in range(4):
                    sids.append(sid := client.queue_request("POST", "/echo", end=False))
                    client.conn.send_data(sid, b"c" * 6000, end_stream=True)
                await client.flush()
                for sid in sids:
                    got = await client.response(sid)
                    assert got.status == 200, round_
                    assert len(got.data) == 6000


@attrs.define
class Tasks:
    """Routes that note which task served them: /who answers at once, /hold waits for
    ``go``, /slow until cancelled; /late cancels the stream /who served last."""

    seen: list[trio.lowlevel.Task] = attrs.Factory(list)
    go: trio.Event = attrs.Factory(trio.Event)
    held: trio.Event = attrs.Factory(trio.Event)
    slow_task: trio.lowlevel.Task | None = None
    slow_started: trio.Event = attrs.Factory(trio.Event)
    slow_cancelled: trio.Event = attrs.Factory(trio.Event)
    last: Any = None

    async def who(self, request: Request, responder: Responder) -> None:
        self.seen.append(trio.lowlevel.current_task())
        self.last = responder
        await responder.respond(200, [], b"ok")

    async def hold(self, request: Request, responder: Responder) -> None:
        self.seen.append(trio.lowlevel.current_task())
        if len(self.seen) == 5:
            self.held.set()
        await self.go.wait()
        await responder.respond(200, [], b"ok")

    async def slow(self, request: Request, responder: Responder) -> None:
        self.slow_task = trio.lowlevel.current_task()
        self.slow_started.set()
        try:
            await trio.sleep_forever()
        finally:
            self.slow_cancelled.set()

    async def late(self, request: Request, responder: Responder) -> None:
        self.seen.append(trio.lowlevel.current_task())
        self.last.cancel()  # a done stream, whose task may be this one
        await trio.lowlevel.checkpoint()
        await responder.respond(200, [], b"still here")


async def test_stream_tasks_serve_stream_after_stream_until_one_is_cancelled(
    nursery: trio.Nursery,
) -> None:
    with trio.fail_after(10):
        tasks = Tasks()
        gateway = Frontend(config=Config())
        gateway.router.add("GET", "/who", tasks.who)
        gateway.router.add("GET", "/hold", tasks.hold)
        gateway.router.add("GET", "/slow", tasks.slow)
        gateway.router.add("GET", "/late", tasks.late)
        port = (await h2_serve(nursery, gateway)).port
        async with await H2Client.connect(port) as client:
            assert (await client.get("/who")).status == 200
            assert (await client.get("/who")).status == 200
            assert tasks.seen[0] is tasks.seen[1]  # the first stream's task served the next
            # Three at once: three tasks; afterwards, one of them serves the next stream.
            sids = [client.queue_request("GET", "/hold", end=True) for _ in range(3)]
            await client.flush()
            await tasks.held.wait()
            tasks.go.set()
            assert [(await client.response(sid)).status for sid in sids] == [200] * 3
            held = set(tasks.seen[2:])
            assert len(held) == 3
            assert (await client.get("/who")).status == 200
            assert tasks.seen[-1] in held
            # A stream cancelled (client RST_STREAM) takes its task with it.
            sid = await client.request("GET", "/slow")
            await tasks.slow_started.wait()
            await client.reset(sid)
            await tasks.slow_cancelled.wait()
            for _ in range(4):
                assert (await client.get("/who")).status == 200
                assert tasks.seen[-1] is not tasks.slow_task
            # Cancelling a stream that is done leaves the task's next stream alone.
            got = await client.response(await client.request("GET", "/late"))
            assert (got.status, got.data) == (200, b"still here")
            assert tasks.seen[-1] is tasks.seen[-2]
