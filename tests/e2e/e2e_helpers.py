"""Helpers for the end-to-end tests (fixtures live in ``conftest.py``).

The gateway runs in-process on port 0 (``App.build(config, None, env)``), configured with a
:class:`~runestone_proxy.config.Config` whose providers point at the fakes in ``fakes.py``.
Provider keys reach it only through the ``env`` mapping, as in production.

Test rules: only 127.0.0.1, port 0 everywhere; every test body runs under
``trio.fail_after``; nothing sleeps to wait for something that can be awaited. The official
``openai`` SDK is used through its sync client in a worker thread: its async client leaves
async generators unfinished after ``[DONE]``, which trio reports as ``ResourceWarning`` (and
the suite turns warnings into errors).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, TypeVar

import attrs
import trio

from runestone_proxy.config import (
    Config,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
    UpstreamConfig,
)
from runestone_proxy.server.app import App

HOST = "127.0.0.1"
OPENAI_KEY = "sk-fake-openai-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-fake-0123456789abcdef"
GATEWAY_KEY = "sk-runestone-e2e-0123456789"
ENV = {"FAKE_OPENAI_KEY": OPENAI_KEY, "FAKE_ANTHROPIC_KEY": ANTHROPIC_KEY}
#: The id Anthropic is sent for the table's ``claude-sonnet``.
CLAUDE_UPSTREAM = "claude-sonnet-4-5-20250929"
EVERYTHING = ("chat", "streaming", "tools", "completions", "json_mode")
ALIASES = {"fast": "openai:gpt-4o-mini", "smart": "claude-sonnet"}

T = TypeVar("T")


def gateway_config(
    openai_url: str,
    anthropic_url: str,
    *,
    extra_providers: Sequence[ProviderConfig] = (),
    upstream: UpstreamConfig | None = None,
) -> Config:
    """The e2e gateway: the two fakes and the mock; one attempt per request (no failover,
    so an upstream error reaches the client as it was)."""
    providers = (
        ProviderConfig("openai", "openai", base_url=openai_url, api_key_env="FAKE_OPENAI_KEY"),
        ProviderConfig(
            "anthropic", "anthropic", base_url=anthropic_url, api_key_env="FAKE_ANTHROPIC_KEY"
        ),
        ProviderConfig("mock", "mock"),
        *extra_providers,
    )
    models = (
        ModelConfig("gpt-4o-mini", "openai", capabilities=EVERYTHING),
        ModelConfig("text-embedding-3-small", "openai", capabilities=("embeddings",)),
        ModelConfig(
            "claude-sonnet", "anthropic", upstream_id=CLAUDE_UPSTREAM, capabilities=EVERYTHING
        ),
        ModelConfig("mock-1", "mock", capabilities=EVERYTHING),
        ModelConfig("mock-embed-1", "mock", capabilities=("embeddings",)),
    )
    base = Config()
    return Config(
        server=attrs.evolve(base.server, host=HOST, port=0, shutdown_grace_s=1.0),
        logging=attrs.evolve(base.logging, access_log=False),
        upstream=upstream or UpstreamConfig(),
        routing=RoutingConfig(max_attempts=1, retry_base_ms=0),
        providers=providers,
        models=models,
        aliases=dict(ALIASES),
    )


@attrs.frozen
class Gateway:
    app: App
    port: int

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a blocking (SDK) call in a worker thread."""
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of a whole text/event-stream body, in order. Checks framing:
    every event is ``data: ...`` lines ended by a blank line."""
    assert text.endswith("\n\n"), text[-200:]
    payloads = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        assert all(line.startswith("data: ") for line in lines), block
        payloads.append("\n".join(line[len("data: ") :] for line in lines))
    return payloads


def sse_json(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of an SSE body that ends with ``data: [DONE]`` (checked)."""
    payloads = sse_data(text)
    assert payloads[-1] == "[DONE]"
    assert "[DONE]" not in payloads[:-1]
    return [json.loads(p) for p in payloads[:-1]]


def chat_body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "Hi there"}], **fields}


async def raw_request(port: int, method: str, path: str, body: bytes) -> trio.SocketStream:
    """Open a TCP connection and send one HTTP/1.1 request; the caller reads."""
    stream = await trio.open_tcp_stream(HOST, port)
    head = (
        f"{method} {path} HTTP/1.1\r\nhost: {HOST}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    await stream.send_all(head.encode() + body)
    return stream


async def read_until(stream: trio.abc.ReceiveStream, marker: bytes) -> bytes:
    received = b""
    while marker not in received:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before {marker!r}: {received!r}"
        received += chunk
    return received
