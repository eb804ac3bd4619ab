"""Fixtures for the end-to-end tests: the fake providers, the gateway, and its clients.

Everything runs in pytest-trio's ``nursery`` fixture and stops when the test ends. Helpers
that are not fixtures live in ``e2e_helpers.py``; the fakes in ``fakes.py``.
"""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping

import httpx
import openai
import pytest
import trio
from e2e_helpers import ANTHROPIC_KEY, ENV, HOST, OPENAI_KEY, Gateway, gateway_config
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.config import Config
from runestone_proxy.server.app import App

StartGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake_openai(nursery: trio.Nursery) -> FakeOpenAI:
    fake = FakeOpenAI(OPENAI_KEY)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
async def fake_anthropic(nursery: trio.Nursery) -> FakeAnthropic:
    fake = FakeAnthropic(ANTHROPIC_KEY)
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def start_gateway(
    nursery: trio.Nursery, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> StartGateway:
    """``await start_gateway(config=None, env=None)``: a gateway serving ``config`` (default:
    the two fakes and the mock), with the provider keys plus ``env`` in its environment."""

    async def start(config: Config | None = None, env: Mapping[str, str] | None = None) -> Gateway:
        if config is None:
            config = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
        app = App.build(config, None, {**ENV, **(env or {})})
        bound = await nursery.start(app.run)
        return Gateway(app, bound.port)

    return start


@pytest.fixture
async def gateway(start_gateway: StartGateway) -> Gateway:
    return await start_gateway()


@pytest.fixture
def sdk(gateway: Gateway) -> Iterator[openai.OpenAI]:
    """The official SDK's sync client (call it through ``in_thread``)."""
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-unused", max_retries=0, timeout=10
    )
    yield client
    client.close()


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    """A plain HTTP client for what the SDK hides: raw SSE, headers, bad bodies."""
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield client


@pytest.fixture
def refusing_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections while the test runs: bound but never
    listening, so that no concurrent test can take it (a closed port could be reused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        yield sock.getsockname()[1]
