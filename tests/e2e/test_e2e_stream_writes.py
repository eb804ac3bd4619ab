"""A streamed answer's fixed writes ride with its data on HTTP/1.1 (``server/h1respond``):
the head with the first chunk, ``[DONE]`` with the last chunk, written once the handler
returned. Read raw: the bytes are the same as ever (the last chunk right behind
``[DONE]``), and with the key's only concurrent slot, a next stream on a new connection
(the last one left idle) is admitted: the slot went back before the last chunk went out."""

from __future__ import annotations

import json

import attrs
import trio
from conftest import StartGateway
from e2e_helpers import HOST, gateway_config, read_until
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.config import AuthConfig, AuthKeyConfig, TenantConfig

KEY = "sk-stream-writes-0123456789"
LAST = b"data: [DONE]\n\n\r\n0\r\n\r\n"


def _request(body: dict[str, object]) -> bytes:
    raw = json.dumps(body).encode()
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\ncontent-type: application/json\r\n"
        b"authorization: Bearer %b\r\ncontent-length: %d\r\n\r\n%b" % (KEY.encode(), len(raw), raw)
    )


async def test_streams_back_to_back_with_one_slot(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = attrs.evolve(
        gateway_config(fake_openai.base_url, fake_anthropic.base_url),
        auth=AuthConfig(enabled=True, keys=(AuthKeyConfig(key_env="WRITES_KEY", tenant="acme"),)),
        tenants={"acme": TenantConfig(max_concurrent=1, on_limit="reject")},
    )
    gateway = await start_gateway(config, env={"WRITES_KEY": KEY})
    body = {"model": "mock-1", "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    idle: list[trio.SocketStream] = []  # each kept open (idle, keep-alive) until the end
    try:
        with trio.fail_after(10):
            for _ in range(5):
                stream = await trio.open_tcp_stream(HOST, gateway.port)
                idle.append(stream)
                await stream.send_all(_request(body))
                received = await read_until(stream, b"\r\n0\r\n\r\n")
                head, _, chunked = received.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200 "), received
                assert b"transfer-encoding: chunked" in head.lower()
                assert chunked.endswith(LAST)  # [DONE], then the last chunk
                assert b"[DONE]" not in chunked[: -len(LAST)]
                assert chunked.split(b"\r\n")[1].startswith(b"data: {")  # the first chunk
    finally:
        for stream in idle:
            await stream.aclose()
