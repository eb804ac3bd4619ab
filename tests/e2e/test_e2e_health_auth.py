"""Who may read the detailed health views (issue 10, item 12).

With keys configured, the main port's ``/health``, ``/health/providers`` and ``/metrics``
answer 401 (OpenAI's envelope) to a caller without a valid key, and a tenant's key sees its
own tenant only; ``/health/live`` and ``/health/ready`` answer anyone. ``health_port`` is
the operator's listener: everything, no key. With no key configured, nothing changes.
Every check runs over HTTP/1.1 and over h2c (prior knowledge), through real sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import attrs
import httpx
import pytest
import trio
from e2e_helpers import ENV, HOST, chat_body, gateway_config
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.config import AuthConfig, AuthKeyConfig, Config, TenantConfig
from runestone_proxy.server.app import App

KEYS = {"acme": "sk-acme-health-0123456789", "globex": "sk-globex-health-0123456789"}
DETAILED = ("/health", "/health/providers", "/metrics")
PROBES = ("/health/live", "/health/ready")
PROTOCOLS = ["h1", "h2"]


@attrs.frozen
class Ports:
    app: App
    main: str
    health: str


def config(fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, *, keys: bool) -> Config:
    """The e2e gateway with tenants acme and globex (one request a minute each, so a second
    request makes a ``ratelimit.block`` series labelled with the tenant) and a health port."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    entries = tuple(
        AuthKeyConfig(key_env=f"KEY_{name.upper()}", tenant=name, rpm=1) for name in KEYS
    )
    return attrs.evolve(
        base,
        server=attrs.evolve(base.server, health_port=0),
        auth=AuthConfig(keys=entries if keys else ()),
        tenants={name: TenantConfig(max_concurrent=3) for name in KEYS},
    )


async def start(nursery: trio.Nursery, cfg: Config) -> Ports:
    env = {**ENV, **{f"KEY_{name.upper()}": key for name, key in KEYS.items()}}
    app = App.build(cfg, None, env)
    bound = await nursery.start(app.run)
    assert bound.health_port is not None
    return Ports(app, f"http://{HOST}:{bound.port}", f"http://{HOST}:{bound.health_port}")


@pytest.fixture
async def keyed(
    nursery: trio.Nursery, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> Ports:
    ports = await start(nursery, config(fake_openai, fake_anthropic, keys=True))
    async with httpx.AsyncClient(base_url=ports.main, timeout=10) as client:
        for name, key in KEYS.items():  # the second request of each tenant is refused (rpm=1)
            auth = {"authorization": f"Bearer {key}"}
            statuses = [
                (await client.post("/v1/chat/completions", json=body, headers=auth)).status_code
                for body in (chat_body("mock-1"), chat_body("mock-1"))
            ]
            assert statuses == [200, 429], name
    return ports


@pytest.fixture(params=PROTOCOLS)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[httpx.AsyncClient]:
    """HTTP/1.1, or h2c with prior knowledge (the gateway sniffs the preface); every answer
    is checked to have come over the protocol asked for."""
    h2 = request.param == "h2"
    version = "HTTP/2" if h2 else "HTTP/1.1"

    async def check_version(response: httpx.Response) -> None:
        assert response.http_version == version

    hooks = {"response": [check_version]}
    async with httpx.AsyncClient(timeout=10, http1=not h2, http2=h2, event_hooks=hooks) as http:
        yield http


def tenant_rows(response: httpx.Response) -> dict[str, Any]:
    rows: dict[str, Any] = response.json()["components"]["capacity"]["tenants"]
    return rows


async def test_anonymous_gets_401_on_main_port(keyed: Ports, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        for path in DETAILED:
            for headers in ({}, {"authorization": "Bearer sk-wrong-0123456789"}):
                response = await client.get(keyed.main + path, headers=headers)
                assert response.status_code == 401, (path, response.text)
                error = response.json()["error"]
                assert error["code"] == "invalid_api_key"
                assert set(error) == {"message", "type", "param", "code"}
                assert not any(name in response.text for name in KEYS)
            head = await client.head(keyed.main + path)
            assert head.status_code == 401, path
        for path in PROBES:
            assert (await client.get(keyed.main + path)).status_code == 200, path


async def test_tenant_key_sees_its_own_tenant(keyed: Ports, client: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        for tenant, other in (("acme", "globex"), ("globex", "acme")):
            for send in ({"authorization": f"Bearer {KEYS[tenant]}"}, {"x-api-key": KEYS[tenant]}):
                health = await client.get(keyed.main + "/health", headers=send)
                assert health.status_code == 200, health.text
                assert set(tenant_rows(health)) == {tenant}
                assert other not in health.text

                providers = await client.get(keyed.main + "/health/providers", headers=send)
                assert providers.status_code == 200, providers.text
                assert {"openai", "anthropic", "mock"} <= set(providers.json()["providers"])

                metrics = await client.get(keyed.main + "/metrics", headers=send)
                assert metrics.status_code == 200, metrics.text
                assert f'tenant="{tenant}"' in metrics.text
                assert f'tenant="{other}"' not in metrics.text
                assert "runestone_http_requests_total" in metrics.text


async def test_health_port_serves_everything_without_a_key(
    keyed: Ports, client: httpx.AsyncClient
) -> None:
    with trio.fail_after(10):
        for path in (*DETAILED, *PROBES):
            assert (await client.get(keyed.health + path)).status_code == 200, path
        assert set(tenant_rows(await client.get(keyed.health + "/health"))) >= set(KEYS)
        metrics = (await client.get(keyed.health + "/metrics")).text
        assert all(f'tenant="{name}"' in metrics for name in KEYS)


async def test_open_gateway_answers_anyone_as_before(
    nursery: trio.Nursery,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(10):
        ports = await start(nursery, config(fake_openai, fake_anthropic, keys=False))
        for base in (ports.main, ports.health):
            for path in (*DETAILED, *PROBES):
                assert (await client.get(base + path)).status_code == 200, (base, path)
            assert set(tenant_rows(await client.get(base + "/health"))) >= set(KEYS)


async def test_keys_from_a_reload_guard_the_views_at_once(
    nursery: trio.Nursery,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    client: httpx.AsyncClient,
) -> None:
    with trio.fail_after(10):
        ports = await start(nursery, config(fake_openai, fake_anthropic, keys=False))
        assert (await client.get(ports.main + "/metrics")).status_code == 200
        ports.app.gateway.apply_config(config(fake_openai, fake_anthropic, keys=True))
        assert (await client.get(ports.main + "/metrics")).status_code == 401
        assert (await client.get(ports.health + "/metrics")).status_code == 200
        auth = {"x-api-key": KEYS["acme"]}
        assert (await client.get(ports.main + "/metrics", headers=auth)).status_code == 200
