"""HTTP/2 header blocks on the wire, now that h2's own header checks are off (h2conn).

Inbound blocks are checked by protocol.h2headers and outbound ones built by
H2Stream._send_headers; these tests hold both to what h2's checks did: a malformed request
block (RFC 9113 §8.2, §8.3) or trailer block ends the connection with GOAWAY
(PROTOCOL_ERROR) and the handler never runs; a response goes out lower-cased, without
connection-specific or pseudo-fields from the handler, values trimmed, credentials never
indexed. Same rules as test_h2.py: loopback sockets, port 0, fail_after, no sleeps.
"""

from __future__ import annotations

import attrs
import h2.config
import hpack
import pytest
import trio
from h2.errors import ErrorCodes
from h2_helpers import H2Client, h2_serve

from runestone_proxy.api.http import Request, Responder
from runestone_proxy.config import Config, LimitsConfig
from runestone_proxy.server.frontend import Frontend

PSEUDO = [(b":method", b"POST"), (b":scheme", b"http"), (b":path", b"/echo")]


@attrs.define
class Env:
    port: int = 0
    handled: int = 0

    async def echo(self, request: Request, responder: Responder) -> None:
        self.handled += 1
        body = await request.body()
        headers = [
            (b"X-Mixed-Case", b"  padded value\t"),
            (b"Transfer-Encoding", b"chunked"),
            (b"te", b"trailers"),
            (b":path", b"/sneaky"),
            (b"authorization", b"Bearer secret-token-value"),
            (b"x-seen-cookie", request.header(b"cookie") or b""),
        ]
        await responder.respond(200, headers, body)

    async def client(self) -> H2Client:
        client = await H2Client.connect(self.port)
        # The test writes blocks h2 would refuse to send.
        client.conn.config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
        return client


async def start(nursery: trio.Nursery) -> Env:
    env = Env()
    gateway = Frontend(config=attrs.evolve(Config(), limits=LimitsConfig()))
    gateway.router.add("POST", "/echo", env.echo)
    env.port = (await h2_serve(nursery, gateway)).port
    return env


@pytest.mark.parametrize(
    "block",
    [
        [*PSEUDO, (b":authority", b"a"), (b"Content-Type", b"x")],
        [*PSEUDO, (b":authority", b"a"), (b"connection", b"close")],
        [*PSEUDO, (b":authority", b"a"), (b"te", b"gzip")],
        [*PSEUDO, (b"x-a", b"1"), (b":authority", b"a")],
        [*PSEUDO, (b":path", b"/twice"), (b":authority", b"a")],
        [*PSEUDO[:2], (b":path", b""), (b":authority", b"a")],
        [*PSEUDO, (b":authority", b"a"), (b"host", b"b")],
        [*PSEUDO, (b":authority", b"a"), (b"x-a", b"one\ntwo")],
        [*PSEUDO, (b":authority", b"a"), (b"x-a", b"trailing ")],
        [*PSEUDO, (b":custom", b"a"), (b":authority", b"a")],
        PSEUDO,  # neither :authority nor host
    ],
    ids=[
        "upper-case", "connection", "te", "pseudo-late", "duplicate", "empty-path",
        "host-mismatch", "lf-in-value", "trailing-space", "unknown-pseudo", "no-authority",
    ],
)  # fmt: skip
async def test_a_malformed_request_block_ends_the_connection(
    nursery: trio.Nursery, block: list[tuple[bytes, bytes]]
) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            good = client.queue_request("POST", "/echo", end=False)
            await client.send_body(good, b"ok")
            assert (await client.response(good)).status == 200
            sid = client.conn.get_next_available_stream_id()
            client.conn.send_headers(sid, block, end_stream=True)
            await client.flush()
            code, last = await client.goaway()
            assert code == ErrorCodes.PROTOCOL_ERROR
            assert last == sid  # h2's GOAWAY named the stream it choked on; so does ours
            await client.read_to_eof()
        assert env.handled == 1


async def test_malformed_trailers_end_the_connection(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            sid = client.queue_request("POST", "/echo", end=False)
            client.conn.send_data(sid, b"body")
            client.conn.send_headers(sid, [(b":path", b"/late")], end_stream=True)
            await client.flush()
            code, _ = await client.goaway()
            assert code == ErrorCodes.PROTOCOL_ERROR


async def test_legal_trailers_and_split_cookies_are_served(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            headers = [(b"cookie", b"a=1"), (b"cookie", b"b=2"), (b"te", b"trailers")]
            sid = client.queue_request("POST", "/echo", headers, end=False)
            client.conn.send_data(sid, b"body")
            client.conn.send_headers(sid, [(b"x-checksum", b"abc")], end_stream=True)
            await client.flush()
            got = await client.response(sid)
            assert got.status == 200
            assert got.data == b"body"
            assert got.header(b"x-seen-cookie") == b"a=1; b=2"  # RFC 9113 §8.2.3


async def test_response_headers_are_normalised_as_h2_did(nursery: trio.Nursery) -> None:
    with trio.fail_after(10):
        env = await start(nursery)
        async with await env.client() as client:
            sid = client.queue_request("POST", "/echo", end=False)
            await client.send_body(sid, b"x")
            got = await client.response(sid)
            assert got.headers is not None
            names = [name for name, _ in got.headers]
            assert names[0] == b":status"
            assert b":path" not in names
            assert b"transfer-encoding" not in names
            assert b"te" not in names
            assert got.header(b"x-mixed-case") == b"padded value"
            assert got.header(b"content-length") == b"1"
            # RFC 7541 §7.1.3: the credential went out never-indexed, so no table holds it.
            decoder_table = client.conn.decoder.header_table
            assert all(name != b"authorization" for name, _ in decoder_table.dynamic_entries)
            auth = [h for h in got.headers if h[0] == b"authorization"]
            assert auth
            assert isinstance(auth[0], hpack.NeverIndexedHeaderTuple)
