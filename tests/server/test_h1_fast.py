"""Which reader frames a client's request: the fast path, or h11 for the unusual.

Test rules as in test_h1.py (in-process gateway on port 0, ``RawClient`` writing bytes,
``trio.fail_after``, no sleeps). The handler records whether its request was read without
h11 (``conn.proto is None`` while it runs); a request the fast parser declines, or whose
body is still to come, is read by h11 from the same bytes, and the next request on the
connection is fast again. The parser's rule is property-tested against h11 in
tests/protocol/test_h1_request.py.
"""

from __future__ import annotations

import trio
import trio.testing
from helpers import RawClient, chunked, make_config, request, running_app

from runestone_proxy.api.http import Request, Responder
from runestone_proxy.server.h1respond import H1Responder

TIMEOUT_S = 5


def recording(seen: list[str]) -> dict[tuple[str, str], object]:
    async def echo(req: Request, responder: Responder) -> None:
        assert isinstance(responder, H1Responder)
        seen.append("fast" if responder.conn.proto is None else "h11")
        body = await req.body()
        if req.query == "empty":  # 204: a head only h11 writes
            await responder.respond(204, [], b"")
        else:
            await responder.respond(200, [(b"content-type", b"text/plain")], body)

    return {("POST", "/echo"): echo}


async def test_the_fast_path_and_h11_take_turns_on_one_connection() -> None:
    exchanges = [
        (request("POST", "/echo", body=b"one"), "fast", b"one"),
        (
            request("POST", "/echo", {"transfer-encoding": "chunked"}) + chunked(b"two"),
            "h11",
            b"two",
        ),
        (request("POST", "/echo", body=b"three"), "fast", b"three"),
        (request("POST", "/echo", {"expect": "100-continue", "content-length": "4"}), "h11", None),
        (request("POST", "/echo", {"x-odd": "caf\xe9"}, body=b"five"), "h11", b"five"),
        (request("POST", "/echo?empty", body=b"six"), "fast", b""),  # 204: h11 writes it
        (request("POST", "/echo", body=b"seven"), "fast", b"seven"),
    ]
    seen: list[str] = []
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), recording(seen)) as gw:
            async with await RawClient.connect(gw.port) as client:
                for data, _, body in exchanges:
                    if body is None:  # 100-continue: the body goes after the interim answer
                        await client.send(data)
                        assert (await client.read_response()).status == 100
                        response = await client.exchange(b"four")
                        assert response.body == b"four"
                        continue
                    response = await client.exchange(data)
                    assert response.status in (200, 204)
                    assert response.body == body
    assert seen == [reader for _, reader, _ in exchanges]


async def test_pipelined_fast_requests_behind_an_h11_answer() -> None:
    seen: list[str] = []
    burst = (
        request("POST", "/echo?empty", body=b"a")  # fast, then h11 writes its 204
        + request("POST", "/echo", body=b"b")
        + request("POST", "/echo", {"connection": "close"}, body=b"c")
    )
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), recording(seen)) as gw:
            async with await RawClient.connect(gw.port) as client:
                await client.send(burst)
                responses = [await client.read_response() for _ in range(3)]
                assert await client.read_eof() == b""
    assert [r.status for r in responses] == [204, 200, 200]
    assert [r.body for r in responses] == [b"", b"b", b"c"]
    assert responses[2].header("connection") == "close"
    assert seen == ["fast", "fast", "fast"]


async def test_a_head_that_trickles_in_goes_to_h11() -> None:
    seen: list[str] = []
    data = request("POST", "/echo", body=b"tricklebody")
    with trio.fail_after(TIMEOUT_S):
        async with running_app(make_config(), recording(seen)) as gw:
            async with await RawClient.connect(gw.port) as client:
                for i in range(0, len(data), 10):
                    await client.send(data[i : i + 10])
                    await trio.testing.wait_all_tasks_blocked()  # one read each
                response = await client.read_response()
                again = await client.exchange(request("POST", "/echo", body=b"fast"))
    assert (response.body, again.body) == (b"tricklebody", b"fast")
    assert seen == ["h11", "fast"]
