"""Queued Anthropic Messages requests end to end: ``POST /v1/messages`` at a full tenant with
``Prefer: respond-async`` is answered ``202`` with its job, the drainer runs it later (the
gateway as ``App.build`` + ``App.run`` build it, real sockets), and ``GET /v1/jobs/{id}``
returns the whole Anthropic Message with Runestone's metadata.

Native (an ``anthropic`` provider, the ``FakeAnthropic`` of ``fakes.py``): the job keeps the
client headers a live call forwards, so the fake receives ``anthropic-beta`` (and
``anthropic-version``, ``x-app``) exactly as the client sent them, from the drainer.
Translated (the in-process mock): the stored result is the OpenAI answer in Anthropic's
shape. A queued stream is run whole; a provider's error fails the job with its message.

Tenant ``acme`` may run one request at a time. A test fills that slot with a live chat
request to ``held-1`` (``jobs_helpers.FakeUpstream``), which answers only when the test
releases it; the Messages request sent meanwhile is parked, and runs once the slot frees.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; waits are for
upstream arrivals or ``overflow.drain.stop`` events, never sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from e2e_helpers import ANTHROPIC_KEY
from fakes import TEXT, FakeAnthropic
from jobs_helpers import FakeUpstream

from runestone_proxy import config as config_mod
from runestone_proxy import telemetry
from runestone_proxy.server.app import App

KEY = "sk-acme-0123456789abcdef"
ENV = {"KEY_ACME": KEY, "FAKE_ANTHROPIC_KEY": ANTHROPIC_KEY}
CLAUDE_UPSTREAM = "claude-sonnet-4-5-20250929"
#: What Claude Code sends besides its key (recorded in tests/e2e/claude_code_recording.py).
CLIENT_HEADERS = {
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14",
    "x-app": "cli",
}
TIMEOUT_S = 15

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
shutdown_grace_s = 0.5

[logging]
access_log = false

[[auth.keys]]
key_env = "KEY_ACME"
tenant = "acme"

[tenants.acme]
max_concurrent = 1

[routing]
max_attempts = 1

[overflow]
database = "{database}"
backoff_base_s = 0.05
backoff_max_s = 0.2

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "upstream"
kind = "openai"
base_url = "{upstream}"

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "{anthropic}"
api_key_env = "FAKE_ANTHROPIC_KEY"

[[models]]
id = "mock-1"
provider = "mock"

[[models]]
id = "held-1"
provider = "upstream"

[[models]]
id = "claude-sonnet"
provider = "anthropic"
upstream_id = "claude-sonnet-4-5-20250929"

[[models]]
id = "claude-refuses"
provider = "anthropic"
upstream_id = "claude-error-invalid_request_error"
"""


def messages(model: str, **extra: Any) -> dict[str, Any]:
    turn = {"role": "user", "content": "Say hello."}
    return {"model": model, "max_tokens": 256, "messages": [turn], **extra}


@attrs.define
class Settled:
    """Wakes waiters whenever a job run settles (``overflow.drain.stop``)."""

    event: trio.Event = attrs.Factory(trio.Event)

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "overflow.drain.stop":
            self.event.set()
            self.event = trio.Event()


@attrs.define
class Env:
    http: httpx.AsyncClient
    upstream: FakeUpstream
    anthropic: FakeAnthropic
    settled: Settled

    async def park(self, body: dict[str, Any], request_id: str) -> str:
        """POST ``body`` to /v1/messages while the tenant is full, asking for async: the
        202's job id."""
        async with self.hold():
            response = await self.http.post(
                "/v1/messages",
                json=body,
                headers={
                    "x-api-key": KEY,
                    "prefer": "respond-async",
                    "x-request-id": request_id,
                    **CLIENT_HEADERS,
                },
            )
            assert response.status_code == 202, response.text
            accepted = response.json()
            assert (accepted["status"], accepted["request_id"]) == ("queued", request_id)
            assert response.headers["location"] == f"/v1/jobs/{accepted['job_id']}"
            assert self.anthropic.requests == []  # nothing ran while the tenant was full
        job_id: str = accepted["job_id"]
        return job_id

    async def wait_finished(self, job_id: str) -> dict[str, Any]:
        while True:
            settled = self.settled.event  # taken before the read: no settle is missed
            response = await self.http.get(f"/v1/jobs/{job_id}", headers={"x-api-key": KEY})
            assert response.status_code == 200, response.text
            view: dict[str, Any] = response.json()
            if view["status"] in ("succeeded", "failed"):
                return view
            await settled.wait()

    @asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        """Fill acme's one slot with a live request to ``held-1`` for the block."""
        answers: list[httpx.Response] = []

        async def live() -> None:
            body = {"model": "held-1", "messages": [{"role": "user", "content": "wait"}]}
            answers.append(
                await self.http.post(
                    "/v1/chat/completions", json=body, headers={"authorization": f"Bearer {KEY}"}
                )
            )

        index = len(self.upstream.arrivals)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live)
            arrival = (await self.upstream.wait_arrivals(index + 1))[index]
            try:
                yield
            finally:
                arrival.release.set()
        assert [a.status_code for a in answers] == [200]


@pytest.fixture
async def env(
    tmp_path: Path, nursery: trio.Nursery, fake_anthropic: FakeAnthropic
) -> AsyncIterator[Env]:
    upstream = FakeUpstream()
    await nursery.start(upstream.serve)
    text = (
        CONFIG.replace("{database}", str(tmp_path / "jobs.sqlite3"))
        .replace("{upstream}", upstream.base_url)
        .replace("{anthropic}", fake_anthropic.base_url)
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    app = App.build(config_mod.load(path, ENV), path, ENV)
    settled = Settled()
    remove = telemetry.add_handler(settled)
    try:
        async with trio.open_nursery() as gateway:
            bound = await gateway.start(app.run)
            url = f"http://127.0.0.1:{bound.port}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                yield Env(http, upstream, fake_anthropic, settled)
            await app.begin_drain()
    finally:
        remove()


@pytest.mark.parametrize("stream", [False, True])
async def test_a_queued_native_messages_job_reaches_anthropic_with_its_headers(
    env: Env, stream: bool
) -> None:
    body = messages("claude-sonnet", stream=True) if stream else messages("claude-sonnet")
    with trio.fail_after(TIMEOUT_S):
        job_id = await env.park(body, "req-native")
        view = await env.wait_finished(job_id)
    assert view["status"] == "succeeded", view
    assert (view["attempts"], view["error"]) == (1, None)
    (sent,) = env.anthropic.requests
    assert (sent.method, sent.path) == ("POST", "/v1/messages")
    for name, value in CLIENT_HEADERS.items():  # from the drainer, as the client sent them
        assert sent.headers[name] == value
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY  # the provider's key, never the client's
    assert sent.body["model"] == CLAUDE_UPSTREAM
    assert "stream" not in sent.body  # a queued stream runs whole
    result = view["result"]
    assert (result["type"], result["role"], result["model"]) == (
        "message",
        "assistant",
        CLAUDE_UPSTREAM,
    )
    assert result["content"] == [{"type": "text", "text": TEXT}]
    assert (result["stop_reason"], result["usage"]) == (
        "end_turn",
        {"input_tokens": 12, "output_tokens": 5},
    )
    assert (result["provider"], result["request_id"]) == ("anthropic", "req-native")
    assert result["routing_policy"] == "default"


async def test_a_queued_translated_messages_job_stores_an_anthropic_message(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        job_id = await env.park(messages("mock-1"), "req-mock")
        view = await env.wait_finished(job_id)
    assert view["status"] == "succeeded", view
    assert env.anthropic.requests == []  # the mock answered: headers go to no one
    result = view["result"]
    assert (result["type"], result["role"], result["model"]) == ("message", "assistant", "mock-1")
    assert result["id"].startswith("msg_")
    (block,) = result["content"]
    assert block["type"] == "text"
    assert block["text"]
    assert result["stop_reason"] == "end_turn"
    assert set(result["usage"]) >= {"input_tokens", "output_tokens"}
    assert (result["provider"], result["request_id"]) == ("mock", "req-mock")


async def test_a_queued_messages_job_that_anthropic_refuses_fails_with_its_message(
    env: Env,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        job_id = await env.park(messages("claude-refuses"), "req-refused")
        view = await env.wait_finished(job_id)
    assert view["status"] == "failed", view
    assert view["attempts"] == 1  # a 400 is not retried
    assert view["result"] is None
    assert view["error"]["error"]["message"] == "max_tokens: Field required"
    (sent,) = env.anthropic.requests
    assert sent.headers["anthropic-beta"] == CLIENT_HEADERS["anthropic-beta"]
    assert json.dumps(view).count("Say hello.") == 0  # the prompt is not kept
