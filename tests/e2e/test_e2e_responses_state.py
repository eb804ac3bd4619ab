"""Stored Responses end to end: the gateway as ``App.build`` + ``App.run`` build it, responses
saved through ``app.store`` (the SQLite store; ``POST /v1/responses`` is not needed to fill
it), and the official ``openai`` SDK reading them back over real sockets:
``client.responses.retrieve``, ``client.responses.delete`` and
``client.responses.input_items.list`` (auto-paginated).

Two keys on two tenants: a tenant sees its own responses only; another tenant's id is the
SDK's ``NotFoundError``, as are unknown, deleted and expired ids. Retention runs on the
store's clock (``app.store.clock``), then the sweep deletes the row.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; the SDK's sync
client runs in a worker thread (``in_thread``); nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import openai
import pytest
import trio
from e2e_helpers import in_thread

from runestone_proxy import config as config_mod
from runestone_proxy.api.responses_state import add_routes
from runestone_proxy.errors import NotFound
from runestone_proxy.gateway.responses_store import StoredResponse
from runestone_proxy.server.app import App

KEYS = {"acme": "sk-acme-0123456789abcdef", "globex": "sk-globex-0123456789abcdef"}
ENV = {"KEY_ACME": KEYS["acme"], "KEY_GLOBEX": KEYS["globex"]}
#: Far ahead of the wall clock, so the drainer's own sweep (on real time) never touches them.
T0 = 4_000_000_000.0
RETENTION_S = 3600.0
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

[[auth.keys]]
key_env = "KEY_GLOBEX"
tenant = "globex"

[overflow]
database = "{database}"
retention_s = 3600

[[providers]]
name = "mock"
kind = "mock"

[[models]]
id = "mock-1"
provider = "mock"
"""


@attrs.define
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


def user(text: str) -> dict[str, Any]:
    return {"type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def response_json(rid: str, text: str, created: float = T0) -> dict[str, Any]:
    """A Response object as the Responses API answers it (non-stream, completed)."""
    return {
        "id": rid,
        "object": "response",
        "created_at": int(created),
        "status": "completed",
        "model": "mock-1",
        "output": [
            {
                "type": "message",
                "id": "msg_" + rid.removeprefix("resp_") + "0000",
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": 3,
            "output_tokens": 2,
            "total_tokens": 5,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }


def record(
    tenant: str, rid: str, items: list[dict[str, Any]], text: str = "hi", at: float = T0
) -> StoredResponse:
    return StoredResponse(
        rid, tenant, at, json.dumps(items).encode(), json.dumps(response_json(rid, text)).encode()
    )


@attrs.define
class Env:
    app: App
    url: str
    clock: Clock
    clients: dict[str, openai.OpenAI]

    async def save(self, *records: StoredResponse) -> None:
        for one in records:
            await self.app.store.save_response(one)


def with_state_routes(app: App) -> App:
    """Register the stored-Responses routes unless ``App.build`` already does."""
    try:
        app.gateway.router.resolve("GET", "/v1/responses/x/input_items")
    except NotFound:
        add_routes(app.gateway.router, app.store, app.api.authenticate)
    return app


@pytest.fixture
def clients() -> Iterator[dict[str, openai.OpenAI]]:
    made: dict[str, openai.OpenAI] = {}
    yield made
    for client in made.values():
        client.close()


@pytest.fixture
async def env(
    tmp_path: Path, nursery: trio.Nursery, clients: dict[str, openai.OpenAI]
) -> AsyncIterator[Env]:
    path = tmp_path / "config.toml"
    path.write_text(CONFIG.replace("{database}", str(tmp_path / "state.sqlite3")))
    app = with_state_routes(App.build(config_mod.load(path, ENV), path, ENV))
    clock = Clock()
    app.store.clock = clock
    async with trio.open_nursery() as gateway:
        bound = await gateway.start(app.run)
        url = f"http://127.0.0.1:{bound.port}"
        for tenant, key in KEYS.items():
            clients[tenant] = openai.OpenAI(
                base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=10
            )
        yield Env(app, url, clock, clients)
        await app.begin_drain()


async def test_a_stored_response_round_trips_through_the_sdk(env: Env) -> None:
    rid = "resp_" + "a1" * 12
    await env.save(record("acme", rid, [user("what is 2+2?")], text="4"))
    with trio.fail_after(TIMEOUT_S):
        got = await in_thread(env.clients["acme"].responses.retrieve, rid)
        items = await in_thread(env.clients["acme"].responses.input_items.list, rid)
    assert (got.id, got.status, got.model, got.output_text) == (rid, "completed", "mock-1", "4")
    assert got.usage is not None
    assert got.usage.total_tokens == 5
    (item,) = items.data
    assert item.type == "message"
    assert item.id.startswith("msg_")
    assert item.content[0].text == "what is 2+2?"  # type: ignore[union-attr]
    assert (items.first_id, items.last_id, items.has_more) == (item.id, item.id, False)


async def test_a_tenant_never_sees_another_tenants_response(env: Env) -> None:
    rid = "resp_" + "b2" * 12
    await env.save(record("acme", rid, [user("acme's secret")]))
    globex = env.clients["globex"]
    with trio.fail_after(TIMEOUT_S):
        for call in (globex.responses.retrieve, globex.responses.delete):
            with pytest.raises(openai.NotFoundError) as info:
                await in_thread(call, rid)
            assert info.value.body == {
                "message": f"Response with id '{rid}' not found.",
                "type": "invalid_request_error",
                "param": None,
                "code": None,
            }
        with pytest.raises(openai.NotFoundError):
            await in_thread(globex.responses.input_items.list, rid)
        with pytest.raises(openai.NotFoundError):
            await in_thread(globex.responses.retrieve, "resp_unknown")
        still = await in_thread(env.clients["acme"].responses.retrieve, rid)
    assert still.id == rid


async def test_the_same_id_in_two_tenants_is_two_responses(env: Env) -> None:
    rid = "resp_" + "c3" * 12
    await env.save(record("acme", rid, [user("a")], "for acme"))
    await env.save(record("globex", rid, [user("g")], "for globex"))
    with trio.fail_after(TIMEOUT_S):
        acme = await in_thread(env.clients["acme"].responses.retrieve, rid)
        globex = await in_thread(env.clients["globex"].responses.retrieve, rid)
    assert (acme.output_text, globex.output_text) == ("for acme", "for globex")


async def test_a_deleted_response_is_gone(env: Env) -> None:
    rid = "resp_" + "d4" * 12
    await env.save(record("acme", rid, [user("forget me")]))
    acme = env.clients["acme"]
    with trio.fail_after(TIMEOUT_S):
        assert await in_thread(acme.responses.delete, rid) is None
        for call in (acme.responses.retrieve, acme.responses.delete):
            with pytest.raises(openai.NotFoundError):
                await in_thread(call, rid)
    assert await env.app.store.get_response("acme", rid) is None


async def test_input_items_page_through_the_whole_history(env: Env) -> None:
    rid = "resp_" + "e5" * 12
    history: list[dict[str, Any]] = [user(f"turn {i}") for i in range(7)]
    history[3] = {**history[3], "id": "msg_kept_by_the_client"}
    history.insert(4, {"type": "function_call_output", "call_id": "call_1", "output": "42"})
    await env.save(record("acme", rid, history))
    acme = env.clients["acme"]

    def walk(**query: Any) -> list[Any]:
        return list(acme.responses.input_items.list(rid, **query))  # auto-pagination

    with trio.fail_after(TIMEOUT_S):
        asc = await in_thread(walk, limit=3, order="asc")
        desc = await in_thread(walk, limit=2)
        first = await in_thread(acme.responses.input_items.list, rid, limit=3)
    assert len(asc) == len(history) == 8
    assert [i.id for i in desc] == [i.id for i in reversed(asc)]  # newest first by default
    assert len({i.id for i in asc}) == 8
    assert asc[3].id == "msg_kept_by_the_client"
    assert asc[4].type == "function_call_output"
    assert asc[4].id.startswith("item_")
    assert [i.content[0].text for i in asc if i.type == "message"] == [
        f"turn {i}" for i in range(7)
    ]
    assert [i.id for i in first.data] == [i.id for i in desc[:3]]
    assert first.has_more


async def test_a_response_expires_after_retention_and_the_sweep_deletes_it(env: Env) -> None:
    old, fresh = "resp_" + "f6" * 12, "resp_" + "a7" * 12
    await env.save(record("acme", old, [user("old")], at=T0))
    await env.save(record("acme", fresh, [user("fresh")], at=T0 + 600))
    acme = env.clients["acme"]
    env.clock.now = T0 + RETENTION_S  # the old one is past retention, not yet swept
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(openai.NotFoundError):
            await in_thread(acme.responses.retrieve, old)
        with pytest.raises(openai.NotFoundError):
            await in_thread(acme.responses.input_items.list, old)
        assert (await in_thread(acme.responses.retrieve, fresh)).id == fresh
        assert await env.app.store.sweep(env.clock()) == (1, T0 + 600 + RETENTION_S)
        env.clock.now = T0 + 600 + RETENTION_S
        with pytest.raises(openai.NotFoundError):
            await in_thread(acme.responses.retrieve, fresh)
        assert await env.app.store.sweep(env.clock()) == (1, None)
    rows = await env.app.store._call(
        lambda c: c.execute("SELECT COUNT(*) FROM responses").fetchone()[0]
    )
    assert rows == 0
