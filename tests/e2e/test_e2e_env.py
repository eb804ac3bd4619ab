"""The shipped ``config.toml``, unedited, driven only by environment variables.

Each test starts the gateway in-process from the repository's own ``config.toml`` (``PORT=0``
is itself an override) with the variables an operator would set, and checks over real
sockets that the override won. Process-level variables (``PORT``, ``HEALTH_PORT``,
``RUNESTONE_HOST``, the log settings, ``RUNESTONE_CONFIG``) are checked on a real child
process in ``test_e2e_env_process.py``.

The fake upstreams answer only on the path each provider documents and 404 everything else,
so a base_url joined wrongly (``/messages`` for Anthropic, ``/v1/v1/...``) cannot pass.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from e2e_helpers import ANTHROPIC_KEY, HOST, OPENAI_KEY, Gateway
from fakes import Exchange, FakeAnthropic, FakeOpenAI

from runestone_proxy import config
from runestone_proxy.server.app import App

SHIPPED = Path(__file__).resolve().parents[2] / "config.toml"
HELLO = [{"role": "user", "content": "hello"}]

Start = Callable[[Mapping[str, str]], Awaitable[Gateway]]


@attrs.define(eq=False)
class MountedOpenAI(FakeOpenAI):
    """An OpenAI-compatible fake whose API lives under ``mount`` (``/openai/v1`` for Groq,
    ``/api/v1`` for OpenRouter): any other path is a 404, as on the real service."""

    mount: str = "/v1"

    @property
    def origin(self) -> str:
        return f"http://{HOST}:{self.port}"

    async def handle(self, path: str, headers: Mapping[str, str], body: Any, ex: Exchange) -> None:
        if not path.startswith(self.mount + "/"):
            await ex.json(404, {"error": {"message": f"Unknown path {path}", "type": "x"}})
            return
        await super().handle("/v1" + path[len(self.mount) :], headers, body, ex)


@pytest.fixture
def start(nursery: trio.Nursery, tmp_path: Path) -> Start:
    """``await start(env)``: the gateway from the shipped file with ``env`` (plus ``PORT=0``
    and a state directory under the test's tmp_path) as its whole environment."""

    async def run(env: Mapping[str, str]) -> Gateway:
        full = {"PORT": "0", "RUNESTONE_STATE_DIR": str(tmp_path), **env}
        app = App.build(config.load(SHIPPED, full), SHIPPED, full)
        bound = await nursery.start(app.run)
        return Gateway(app, bound.port)

    return run


async def chat(gateway: Gateway, model: str, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        body = {"model": model, "messages": HELLO}
        return await client.post("/v1/chat/completions", json=body, headers=headers)


# --- <PROVIDER>_BASE_URL and <PROVIDER>_API_KEY, as each SDK documents them ----------------


async def test_openai_base_url_with_v1_as_the_openai_sdk_reads_it(
    start: Start, nursery: trio.Nursery
) -> None:
    fake = MountedOpenAI(OPENAI_KEY, mount="/v1")
    await nursery.start(fake.serve)
    env = {"OPENAI_API_KEY": OPENAI_KEY, "OPENAI_BASE_URL": f"{fake.origin}/v1"}
    answer = await chat(await start(env), "gpt-4o-mini")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-runestone-provider"] == "openai"
    assert [r.path for r in fake.requests] == ["/v1/chat/completions"]


async def test_anthropic_base_url_without_v1_as_the_anthropic_sdk_reads_it(
    start: Start, nursery: trio.Nursery
) -> None:
    fake = FakeAnthropic(ANTHROPIC_KEY)
    await nursery.start(fake.serve)
    origin = f"http://{HOST}:{fake.port}"  # ANTHROPIC_BASE_URL has no /v1
    env = {"ANTHROPIC_API_KEY": ANTHROPIC_KEY, "ANTHROPIC_BASE_URL": origin}
    answer = await chat(await start(env), "claude-3-5-haiku-latest")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-runestone-provider"] == "anthropic"
    assert [r.path for r in fake.requests] == ["/v1/messages"]


async def test_groq_base_url_as_the_groq_sdk_reads_it(start: Start, nursery: trio.Nursery) -> None:
    fake = MountedOpenAI("gsk-fake-groq-0123456789", mount="/openai/v1")
    await nursery.start(fake.serve)
    env = {"GROQ_API_KEY": fake.key, "GROQ_BASE_URL": fake.origin}  # the SDK adds /openai/v1
    answer = await chat(await start(env), "llama-3.1-8b-instant")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-runestone-provider"] == "groq"
    assert [r.path for r in fake.requests] == ["/openai/v1/chat/completions"]


async def test_openrouter_base_url_as_openrouter_documents_it(
    start: Start, nursery: trio.Nursery
) -> None:
    fake = MountedOpenAI("sk-or-fake-0123456789", mount="/api/v1")
    await nursery.start(fake.serve)
    env = {"OPENROUTER_API_KEY": fake.key, "OPENROUTER_BASE_URL": f"{fake.origin}/api/v1"}
    answer = await chat(await start(env), "openrouter:meta-llama/llama-3.1-8b-instruct")
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-runestone-provider"] == "openrouter"
    assert [r.path for r in fake.requests] == ["/api/v1/chat/completions"]


async def test_the_other_common_forms_reach_the_same_paths(
    start: Start, nursery: trio.Nursery
) -> None:
    """The OpenAI-SDK habit (``/v1`` on Anthropic, ``/openai/v1`` on Groq) and a corporate
    proxy's path prefix neither double nor drop a segment."""
    anthropic = FakeAnthropic(ANTHROPIC_KEY)
    groq = MountedOpenAI("gsk-fake-groq-0123456789", mount="/corp/groq/openai/v1")
    await nursery.start(anthropic.serve)
    await nursery.start(groq.serve)
    env = {
        "ANTHROPIC_API_KEY": ANTHROPIC_KEY,
        "ANTHROPIC_BASE_URL": f"http://{HOST}:{anthropic.port}/v1/",
        "GROQ_API_KEY": groq.key,
        "GROQ_BASE_URL": f"{groq.origin}/corp/groq",
    }
    gateway = await start(env)
    assert (await chat(gateway, "claude-3-5-haiku-latest")).status_code == 200
    assert (await chat(gateway, "llama-3.1-8b-instant")).status_code == 200
    assert [r.path for r in anthropic.requests] == ["/v1/messages"]
    assert [r.path for r in groq.requests] == ["/corp/groq/openai/v1/chat/completions"]


async def test_without_its_api_key_a_provider_stays_dark(start: Start) -> None:
    """``*_API_KEY`` is what lights a provider up: without it, the shipped file's model
    answers 404 naming why (and the base_url override alone changes nothing)."""
    gateway = await start({"OPENAI_BASE_URL": f"http://{HOST}:9/v1"})
    answer = await chat(gateway, "gpt-4o-mini")
    assert answer.status_code == 404
    assert "OPENAI_API_KEY" in answer.json()["error"]["message"]


# --- the other overrides ---------------------------------------------------------------------


async def test_max_concurrent_per_tenant_beats_the_shipped_default_tenant(
    start: Start, nursery: trio.Nursery
) -> None:
    """The shipped file pins ``[tenants.default] max_concurrent = 10``; with
    ``MAX_CONCURRENT_PER_TENANT=1`` a second request finds the tenant full (and, asking for
    async handling, is parked: 202) while the first is held upstream."""
    fake = MountedOpenAI(OPENAI_KEY)
    await nursery.start(fake.serve)
    env = {
        "OPENAI_API_KEY": OPENAI_KEY,
        "OPENAI_BASE_URL": f"{fake.origin}/v1",
        "MAX_CONCURRENT_PER_TENANT": "1",
    }
    gateway = await start(env)
    body = {"model": "openai:stall", "messages": HELLO}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        async with trio.open_nursery() as held:
            held.start_soon(partial(client.post, "/v1/chat/completions", json=body))
            await fake.wait_until(lambda: fake.in_flight == 1)
            second = await client.post(
                "/v1/chat/completions",
                json={"model": "mock-1", "messages": HELLO},
                headers={"prefer": "respond-async"},
            )
            held.cancel_scope.cancel()
    assert second.status_code == 202, second.text


async def test_router_policy(start: Start) -> None:
    answer = await chat(await start({"RUNESTONE_ROUTER_POLICY": "cost"}), "mock-1")
    assert answer.headers["x-runestone-routing-policy"] == "cost"


async def test_auth_enabled_and_api_keys(start: Start) -> None:
    """``RUNESTONE_API_KEYS`` adds keys to the shipped file's; with one set, a request
    without it is refused, and ``RUNESTONE_AUTH_ENABLED=false`` opens the gateway again."""
    keys = {"RUNESTONE_API_KEYS": "sk-one-0123456789, sk-two-0123456789"}
    closed = await start(keys)
    assert (await chat(closed, "mock-1")).status_code == 401
    for key in ("sk-one-0123456789", "sk-two-0123456789"):
        answer = await chat(closed, "mock-1", authorization=f"Bearer {key}")
        assert answer.status_code == 200
    opened = await start({**keys, "RUNESTONE_AUTH_ENABLED": "false"})
    assert (await chat(opened, "mock-1")).status_code == 200


async def test_aliases_path(start: Start, tmp_path: Path) -> None:
    """The file ``RUNESTONE_ALIASES_PATH`` names wins over the shipped ``[aliases]``."""
    path = tmp_path / "aliases.toml"
    path.write_text('default = "mock-embed-1"\nmine = "mock-1"\n')
    gateway = await start({"RUNESTONE_ALIASES_PATH": str(path)})
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        models = {m["id"]: m for m in (await client.get("/v1/models")).json()["data"]}
    assert models["mine"]["alias_for"] == "mock-1"
    assert models["default"]["alias_for"] == "mock-embed-1"


async def test_state_dir_holds_the_relative_overflow_database(start: Start, tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    gateway = await start({"RUNESTONE_STATE_DIR": str(state)})
    assert (await chat(gateway, "mock-1")).status_code == 200
    assert (state / "runestone.sqlite3").is_file()
    assert not (Path.cwd() / "runestone.sqlite3").exists()
