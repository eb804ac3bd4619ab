"""Which reader frames an upstream exchange: the fast path, or h11 for the unusual.

The fake upstream here writes raw bytes (test_upstream.py's server, its rules: port 0,
``trio.fail_after``, events rather than sleeps). A response the fast parser reads leaves
the connection without an h11 state machine (``conn.proto is None``); one it declines is
read by h11 from the same bytes, and the next exchange on that connection is fast again.
The parser's own rule is property-tested against h11 in tests/protocol/test_h1_response.py.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import h11
import pytest
import trio
import trio.testing
from test_upstream import FAST, LIMIT_S, Exchange, Start, serve

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.server.upstream import UpstreamPool

__all__ = ["serve"]  # the fixture, imported

#: Raw answers in the order the test below asks for them: the bytes, the body, the reader.
ANSWERS = [
    (b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\none", b"one", "fast"),
    (
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
        b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\ntwo",
        b"two",
        "h11",
    ),
    (
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nthree\r\n0\r\n\r\n",
        b"three",
        "fast",
    ),
    (b"HTTP/1.1 200 OK\nContent-Length: 4\n\nfour", b"four", "h11"),  # bare LF: h11 is lenient
    (b"HTTP/1.1 204 No Content\r\n\r\n", b"", "h11"),
    (b"HTTP/1.1 200 OK\r\nx:  caf\xc3\xa9 \r\ncontent-length: 4\r\n\r\nfive", b"five", "h11"),
    (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nsix", b"six", "fast"),
]


async def serve_raw(nursery: trio.Nursery, answer: Callable[[int], bytes]) -> tuple[int, list[int]]:
    """A keep-alive server writing ``answer(i)`` as the i-th response, raw (h11 reads each
    request, a fresh state machine each time, since it never wrote the answers). Returns
    its port and a list that counts its connections."""
    accepted: list[int] = []

    async def handle(stream: trio.SocketStream) -> None:
        accepted.append(1)
        served = 0
        while True:
            proto = h11.Connection(h11.SERVER)
            while not isinstance(event := proto.next_event(), h11.EndOfMessage):
                if event is h11.NEED_DATA:
                    proto.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.ConnectionClosed):
                    return
            await stream.send_all(answer(served))
            served += 1

    listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
    return listeners[0].socket.getsockname()[1], accepted


async def test_the_fast_path_and_h11_take_turns_on_one_connection(nursery: trio.Nursery) -> None:
    port, accepted = await serve_raw(nursery, lambda i: ANSWERS[i][0])
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for i, (_, expected, reader) in enumerate(ANSWERS):
                async with pool.request("POST", f"http://127.0.0.1:{port}/", [], b"{}") as resp:
                    body = await resp.read()
                    assert (resp.conn.proto is None) == (reader == "fast"), i
                assert body == expected, i
                assert pool.idle_connections == 1, i
    assert accepted == [1]


async def test_a_head_in_pieces_is_read_fast(serve: Start) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"

    async def trickle(ex: Exchange) -> None:
        await ex.read_body()
        for piece in (raw[:3], raw[3:20], raw[20:-3], raw[-3:]):
            await ex.stream.send_all(piece)
            await trio.testing.wait_all_tasks_blocked()  # the client read it and waits

    server = await serve(trickle)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert resp.headers == [(b"content-type", b"text/plain"), (b"content-length", b"5")]
                assert await resp.read() == b"hello"
                assert resp.conn.proto is None
            assert pool.idle_connections == 1


async def test_bytes_past_a_length_body_are_not_left_on_a_pooled_connection(
    serve: Start,
) -> None:
    async def overlong(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokXX")
        ex.close_after = True

    server = await serve(overlong)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"ok"
            assert pool.open_connections == 0


async def test_what_only_h11_reads_is_read_by_h11(serve: Start) -> None:
    """A body that runs to EOF, and HTTP/1.0: read, then the connection is closed."""
    answers = [
        b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nto the end",
        b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nok",
    ]

    async def old_style(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(answers[ex.conn_id])
        ex.close_after = True

    server = await serve(old_style)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for expected in (b"to the end", b"ok"):
                async with pool.request("GET", server.base, []) as resp:
                    assert await resp.read() == expected
                    assert resp.conn.proto is not None
                assert pool.open_connections == 0


async def test_a_head_request_is_framed_by_h11(serve: Start) -> None:
    async def head(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")

    server = await serve(head)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("HEAD", server.base, []) as resp:
                assert resp.headers == [(b"content-length", b"5")]
                assert await resp.read() == b""
            assert pool.idle_connections == 1


async def test_eof_mid_head_or_mid_body_is_refused_in_h11s_words(serve: Start) -> None:
    answers = [
        (b"HTTP/1.1 200 OK\r\ncontent-le", "peer unexpectedly closed"),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nabc", "received 3 bytes, expected 10"),
    ]

    async def cut(ex: Exchange) -> None:
        await ex.read_body()
        await ex.stream.send_all(answers[ex.conn_id][0])
        ex.close_after = True

    server = await serve(cut)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            for _, words in answers:
                with pytest.raises(UpstreamProtocolError, match=words):
                    async with pool.request("GET", server.base, []) as resp:
                        await resp.read()
                assert pool.open_connections == 0


async def test_a_head_that_trickles_in_goes_to_h11(serve: Start) -> None:
    raw = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"

    async def trickle(ex: Exchange) -> None:
        await ex.read_body()
        for i in range(0, len(raw), 8):
            await ex.stream.send_all(raw[i : i + 8])
            await trio.testing.wait_all_tasks_blocked()  # one read each

    server = await serve(trickle)
    with trio.fail_after(LIMIT_S):
        async with UpstreamPool(timeouts=FAST) as pool:
            async with pool.request("GET", server.base, []) as resp:
                assert await resp.read() == b"hello"
                assert resp.conn.proto is not None
            assert pool.idle_connections == 1
