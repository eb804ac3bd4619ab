"""API keys made at run time, through the admin API, end to end.

The gateway runs in-process on port 0 with the fakes behind it and its SQLite store in the
test's own directory; the admin API is reached with httpx, the keys it makes are used with
the official ``openai`` SDK (sync client, in a worker thread) and httpx. The life of a key:
created -> works at once; listed masked (config keys too, read-only); limits and its own
max_concurrent apply; revoked -> 401 on the next request; rotated -> both secrets work, the
old one 401 once the grace is over (a settable clock on the running gateway, no waiting);
kept across a restart. Admin keys and client keys never open each other's doors, and
``[admin] listen = "health"`` keeps the routes off the public port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import ENV, HOST, Gateway, chat_body, gateway_config, in_thread
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy import telemetry
from runestone_proxy.config import AdminConfig, AuthConfig, AuthKeyConfig, Config
from runestone_proxy.server.app import App

ADMIN = "admin-key-0123456789abcdef"
CONFIG_KEY = "sk-config-key-0123456789"
ADMIN_ENV = {"RUNESTONE_ADMIN_KEY": ADMIN, "CONFIG_KEY": CONFIG_KEY}
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}


@attrs.define
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


def with_config_key(config: Config) -> Config:
    key = AuthKeyConfig(key_env="CONFIG_KEY", tenant="ops", rpm=100)
    return attrs.evolve(config, auth=AuthConfig(keys=(key,)))


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> Gateway:
    config = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    return await start_gateway(with_config_key(config), ADMIN_ENV)


@pytest.fixture
async def http(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield client


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


async def create(http: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    response = await http.post("/admin/keys", json={"tenant": "acme", **fields}, headers=AS_ADMIN)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


async def chat_status(http: httpx.AsyncClient, key: str, model: str = "gpt-4o-mini") -> int:
    response = await http.post("/v1/chat/completions", json=chat_body(model), headers=bearer(key))
    return response.status_code


async def test_a_created_key_works_at_once_with_the_sdk(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        made = await create(http, name="ci bot", rpm=100)
        assert made["key"].startswith("sk-rs-")
        assert made["id"].startswith("key_")
        assert made["tenant"] == "acme"
        assert made["status"] == "active"
        assert made["limits"]["rpm"] == 100
        assert made["source"] == "store"
        client = openai.OpenAI(
            base_url=f"{gateway.url}/v1", api_key=made["key"], max_retries=0, timeout=10
        )
        try:
            answer = await in_thread(
                client.chat.completions.create,
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": "Hi"}],
            )
        finally:
            client.close()
        assert answer.choices[0].message.content
        assert await chat_status(http, "sk-rs-not-a-key-0123456789") == 401


async def test_the_list_is_masked_and_shows_config_keys_read_only(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        made = await create(http, name="one")
        await create(http, tenant="other")
        listed = (await http.get("/admin/keys", headers=AS_ADMIN)).json()
        assert listed["object"] == "list"
        by_source = {v["source"] for v in listed["data"]}
        assert by_source == {"config", "store"}
        text = str(listed)
        assert made["key"] not in text
        assert made["key"][-20:] not in text
        assert CONFIG_KEY not in text
        assert all(v["mask"].startswith("sk-...") for v in listed["data"])
        acme = (await http.get("/admin/keys?tenant=acme", headers=AS_ADMIN)).json()["data"]
        assert [v["id"] for v in acme] == [made["id"]]
        shown = (await http.get(f"/admin/keys/{made['id']}", headers=AS_ADMIN)).json()
        assert shown["mask"] == made["mask"]
        assert "key" not in shown
        config_key = next(v for v in listed["data"] if v["source"] == "config")
        assert config_key["tenant"] == "ops"
        assert config_key["limits"]["rpm"] == 100
        for method, path in (
            ("PATCH", f"/admin/keys/{config_key['id']}"),
            ("POST", f"/admin/keys/{config_key['id']}/revoke"),
            ("POST", f"/admin/keys/{config_key['id']}/rotate"),
        ):
            response = await http.request(method, path, json={}, headers=AS_ADMIN)
            assert response.status_code == 403, (method, path)
            assert response.json()["error"]["code"] == "config_key_read_only"
        assert await chat_status(http, CONFIG_KEY) == 200


async def test_revoked_is_401_on_the_next_request_and_audited(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    try:
        with trio.fail_after(20):
            made = await create(http)
            assert await chat_status(http, made["key"]) == 200
            revoked = await http.post(f"/admin/keys/{made['id']}/revoke", headers=AS_ADMIN)
            assert revoked.status_code == 200
            assert revoked.json()["status"] == "revoked"
            assert await chat_status(http, made["key"]) == 401
            again = await http.delete(f"/admin/keys/{made['id']}", headers=AS_ADMIN)
            assert again.status_code == 200  # idempotent
            patch = await http.patch(f"/admin/keys/{made['id']}", json={}, headers=AS_ADMIN)
            assert patch.status_code == 400
            assert patch.json()["error"]["code"] == "key_revoked"
    finally:
        remove()
    audit = recorder.named("admin.key")
    assert [(a["action"], a["admin"], a["key_id"]) for a in audit] == [
        ("create", "env", made["id"]),
        ("revoke", "env", made["id"]),
    ]
    assert made["key"] not in str(recorder.events)


async def test_rotate_keeps_the_old_secret_for_the_grace(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    clock = Clock(1_900_000_000.0)
    gateway.app.service.keys.runtime.clock = clock
    gateway.app.keys.clock = clock
    with trio.fail_after(20):
        made = await create(http)
        rotated = await http.post(
            f"/admin/keys/{made['id']}/rotate", json={"grace_s": 60}, headers=AS_ADMIN
        )
        assert rotated.status_code == 200, rotated.text
        new = rotated.json()
        assert new["id"] == made["id"]
        assert new["key"] != made["key"]
        assert new["rotation"] == {"previous_mask": made["mask"], "expires_at": clock.now + 60}
        assert await chat_status(http, made["key"]) == 200
        assert await chat_status(http, new["key"]) == 200
        clock.now += 60
        assert await chat_status(http, made["key"]) == 401
        assert await chat_status(http, new["key"]) == 200
        shown = (await http.get(f"/admin/keys/{made['id']}", headers=AS_ADMIN)).json()
        assert shown["rotation"] is None


async def test_a_keys_limits_apply_and_change_at_once(
    gateway: Gateway, http: httpx.AsyncClient, fake_openai: FakeOpenAI
) -> None:
    with trio.fail_after(20):
        made = await create(http, rpm=1)
        assert await chat_status(http, made["key"]) == 200
        limited = await http.post(
            "/v1/chat/completions", json=chat_body("gpt-4o-mini"), headers=bearer(made["key"])
        )
        assert limited.status_code == 429
        assert limited.headers["retry-after"]
        patch = await http.patch(
            f"/admin/keys/{made['id']}",
            json={"rpm": None, "max_concurrent": 1, "budget_usd_day": 2.5},
            headers=AS_ADMIN,
        )
        assert patch.status_code == 200, patch.text
        assert patch.json()["limits"]["rpm"] is None
        assert patch.json()["budgets"]["budget_usd_day"] == 2.5
        assert await chat_status(http, made["key"]) == 200
        # max_concurrent = 1: a second request while one is in flight is refused, and the
        # slot comes back when the first one's client goes away.
        async with trio.open_nursery() as nursery:
            stalled = trio.CancelScope()

            async def hold() -> None:
                with stalled:
                    await chat_status(http, made["key"], "openai:stall")

            nursery.start_soon(hold)
            await fake_openai.wait_until(lambda: fake_openai.last().body["model"] == "stall")
            busy = await http.post(
                "/v1/chat/completions", json=chat_body("gpt-4o-mini"), headers=bearer(made["key"])
            )
            assert busy.status_code == 429
            assert busy.json()["error"]["code"] == "rate_limit_exceeded"
            stalled.cancel()
        await fake_openai.wait_until(lambda: fake_openai.in_flight == 0)
        assert gateway.app.service.key_slots.in_flight == {}
        assert await chat_status(http, made["key"]) == 200


@pytest.mark.parametrize(
    ("method", "path", "body", "param"),
    [
        ("POST", "/admin/keys", {}, "tenant"),
        ("POST", "/admin/keys", {"tenant": ""}, "tenant"),
        ("POST", "/admin/keys", {"tenant": "a b"}, "tenant"),
        ("POST", "/admin/keys", {"tenant": "a", "rpm": 0}, "rpm"),
        ("POST", "/admin/keys", {"tenant": "a", "rpm": True}, "rpm"),
        ("POST", "/admin/keys", {"tenant": "a", "tpm": 1.5}, "tpm"),
        ("POST", "/admin/keys", {"tenant": "a", "budget_usd_day": -1}, "budget_usd_day"),
        ("POST", "/admin/keys", {"tenant": "a", "name": 7}, "name"),
        ("POST", "/admin/keys", {"tenant": "a", "colour": "red"}, "colour"),
        ("PATCH", "/admin/keys/{id}", {"tenant": "b"}, "tenant"),
        ("PATCH", "/admin/keys/{id}", {"max_concurrent": "2"}, "max_concurrent"),
        ("POST", "/admin/keys/{id}/rotate", {"grace_s": -1}, "grace_s"),
        ("POST", "/admin/keys/{id}/rotate", {"grace_s": 1e9}, "grace_s"),
        ("POST", "/admin/keys/{id}/rotate", {"grrace_s": 1}, "grrace_s"),
        ("POST", "/admin/keys/{id}/revoke", {"now": True}, "now"),
        ("GET", "/admin/keys?team=a", None, "team"),
    ],
)
async def test_bad_input_is_400_naming_the_param(
    gateway: Gateway,
    http: httpx.AsyncClient,
    method: str,
    path: str,
    body: dict[str, Any] | None,
    param: str,
) -> None:
    with trio.fail_after(20):
        made = await create(http)
        response = await http.request(
            method, path.format(id=made["id"]), json=body, headers=AS_ADMIN
        )
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == param
        assert (await http.get(f"/admin/keys/{made['id']}", headers=AS_ADMIN)).json()[
            "tenant"
        ] == "acme"


async def test_unknown_ids_and_bad_json(gateway: Gateway, http: httpx.AsyncClient) -> None:
    with trio.fail_after(20):
        for path in ("/admin/keys/key_0123456789abcdef", "/admin/keys/nonsense"):
            response = await http.get(path, headers=AS_ADMIN)
            assert response.status_code == 404
            assert response.json()["error"]["param"] == "id"
        bad = await http.post("/admin/keys", content=b"{not json", headers=AS_ADMIN)
        assert bad.status_code == 400
        assert bad.json()["error"]["code"] == "invalid_json"


async def test_admin_and_client_keys_never_open_each_others_doors(
    gateway: Gateway, http: httpx.AsyncClient
) -> None:
    with trio.fail_after(20):
        made = await create(http)
        for key in (made["key"], CONFIG_KEY):
            assert (await http.get("/admin/keys", headers=bearer(key))).status_code == 401
            created = await http.post("/admin/keys", json={"tenant": "x"}, headers=bearer(key))
            assert created.status_code == 401
        assert (await http.get("/admin/keys")).status_code == 401
        assert await chat_status(http, ADMIN) == 401


async def test_no_admin_key_no_admin_api(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    with trio.fail_after(20):
        gateway = await start_gateway(config)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            response = await http.post("/admin/keys", json={"tenant": "a"}, headers=AS_ADMIN)
            assert response.status_code == 404


async def test_listen_health_keeps_admin_off_the_public_port(
    nursery: trio.Nursery, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    config = attrs.evolve(
        base,
        server=attrs.evolve(base.server, health_port=0),
        admin=AdminConfig(listen="health"),
    )
    with trio.fail_after(20):
        app = App.build(config, None, {**ENV, **ADMIN_ENV})
        bound = await nursery.start(app.run)
        async with httpx.AsyncClient(timeout=10) as http:
            main = f"http://{HOST}:{bound.port}"
            health = f"http://{HOST}:{bound.health_port}"
            hidden = await http.post(f"{main}/admin/keys", json={"tenant": "a"}, headers=AS_ADMIN)
            assert hidden.status_code == 404
            made = await http.post(f"{health}/admin/keys", json={"tenant": "a"}, headers=AS_ADMIN)
            assert made.status_code == 201
            key = made.json()["key"]
            chat = await http.post(
                f"{main}/v1/chat/completions", json=chat_body("gpt-4o-mini"), headers=bearer(key)
            )
            assert chat.status_code == 200


async def test_keys_survive_a_restart(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = with_config_key(gateway_config(fake_openai.base_url, fake_anthropic.base_url))
    env = {**ENV, **ADMIN_ENV}
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app = App.build(config, None, env)
            bound = await nursery.start(app.run)
            async with httpx.AsyncClient(base_url=f"http://{HOST}:{bound.port}") as http:
                kept = await create(http, rpm=7)
                gone = await create(http)
                await http.post(f"/admin/keys/{gone['id']}/revoke", headers=AS_ADMIN)
            await app.begin_drain()
        async with trio.open_nursery() as nursery:
            app = App.build(config, None, env)
            bound = await nursery.start(app.run)
            async with httpx.AsyncClient(base_url=f"http://{HOST}:{bound.port}") as http:
                assert await chat_status(http, kept["key"]) == 200
                assert await chat_status(http, gone["key"]) == 401
                shown = (await http.get(f"/admin/keys/{kept['id']}", headers=AS_ADMIN)).json()
                assert shown["limits"]["rpm"] == 7
            await app.begin_drain()
