"""A client that goes away mid-stream cancels the upstream request at once.

The fake provider (model ``hang``) sends one chunk and then waits for its client to leave,
so the only way the exchange ends is the gateway closing the upstream connection. Each test
awaits that event from the fake side (no sleeps) and then checks that nothing leaked: the
upstream pool has no connection open, the fake has nothing in flight.
"""

from __future__ import annotations

import json

import h2.config
import h2.connection
import h2.events
import trio
from e2e_helpers import HOST, Gateway, chat_body, raw_request, read_until
from fakes import FakeAnthropic, FakeOpenAI
from h2.errors import ErrorCodes

HANG = json.dumps(chat_body("openai:hang", stream=True)).encode()
REPEAT = 50
PATH = "/v1/chat/completions"


async def test_h1_disconnect_cancels_upstream(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(20):
        for round_ in range(1, REPEAT + 1):
            async with await raw_request(gateway.port, "POST", PATH, HANG) as stream:
                head = await read_until(stream, b"data: ")
                assert head.startswith(b"HTTP/1.1 200 ")
            await fake_openai.wait_until(lambda r=round_: fake_openai.disconnects == r)
            assert gateway.app.pool.open_connections == 0
        await fake_openai.wait_until(lambda: fake_openai.in_flight == 0)
    assert len(fake_openai.requests) == REPEAT
    assert gateway.app.pool.idle_connections == 0


async def test_h1_disconnect_during_stall(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Before the first byte (nothing sent to the client yet) it is the same."""
    body = json.dumps(chat_body("openai:stall", stream=True)).encode()
    with trio.fail_after(10):
        async with await raw_request(gateway.port, "POST", PATH, body):
            await fake_openai.wait_until(lambda: fake_openai.in_flight == 1)
        await fake_openai.wait_until(lambda: fake_openai.disconnects == 1)
        await fake_openai.wait_until(lambda: fake_openai.in_flight == 0)
    assert gateway.app.pool.open_connections == 0


async def test_pool_reuses_after_clean_streams(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    """The counterpart: a stream read to its end leaves its connection idle for reuse."""
    body = json.dumps(chat_body("fast", stream=True)).encode()
    with trio.fail_after(10):
        for _ in range(3):
            async with await raw_request(gateway.port, "POST", PATH, body) as stream:
                # Up to the last chunk: the handler ended, the upstream exchange was released.
                await read_until(stream, b"data: [DONE]\n\n\r\n0\r\n\r\n")
    assert fake_openai.disconnects == 0
    assert gateway.app.pool.open_connections == 1
    assert gateway.app.pool.idle_connections == 1


# --- HTTP/2 --------------------------------------------------------------------------------------


class H2Client:
    """A bare h2 client over cleartext TCP (prior knowledge), driven by hand."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()

    async def flush(self) -> None:
        await self.stream.send_all(self.conn.data_to_send())

    async def post(self, path: str, body: bytes) -> int:
        stream_id: int = self.conn.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", HOST.encode()),
            (b":path", path.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        self.conn.send_headers(stream_id, headers)
        self.conn.send_data(stream_id, body, end_stream=True)
        await self.flush()
        return stream_id

    async def read(self, stream_id: int, until: bytes | None) -> tuple[int, bytes]:
        """Status and body of ``stream_id``: until ``until`` is in the body, else its end."""
        status, body = 0, b""
        while True:
            data = await self.stream.receive_some(65536)
            assert data, "connection closed"
            for event in self.conn.receive_data(data):
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    body += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded) and until is None:
                    await self.flush()
                    return status, body
                elif isinstance(event, h2.events.StreamReset):
                    raise AssertionError(f"stream reset by the server: {event.error_code}")
            await self.flush()
            if until is not None and until in body:
                return status, body


async def test_h2_reset_cancels_upstream(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(20):
        async with await trio.open_tcp_stream(HOST, gateway.port) as tcp:
            client = H2Client(tcp)
            await client.flush()
            for round_ in range(1, REPEAT + 1):
                stream_id = await client.post(PATH, HANG)
                status, _ = await client.read(stream_id, until=b"data: ")
                assert status == 200
                client.conn.reset_stream(stream_id, ErrorCodes.CANCEL)
                await client.flush()
                await fake_openai.wait_until(lambda r=round_: fake_openai.disconnects == r)
                assert gateway.app.pool.open_connections == 0
            # The connection itself lives on: the next stream is answered whole.
            stream_id = await client.post(PATH, json.dumps(chat_body("fast")).encode())
            status, body = await client.read(stream_id, until=None)
    assert status == 200
    assert json.loads(body)["provider"] == "openai"
    await fake_openai.wait_until(lambda: fake_openai.in_flight == 0)
