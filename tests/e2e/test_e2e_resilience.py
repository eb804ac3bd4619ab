"""Routing and resilience end to end: the gateway in-process on 127.0.0.1:0 in front of real
fake providers (``flaky_fakes.py``) that refuse, fail, rate-limit, stall or die on demand.

Test rules: only 127.0.0.1, port 0 everywhere; every test runs under ``trio.fail_after``;
events are awaited where there is one (a fake's ``disconnected``/``first_sent``); the only
polling is for the breaker cooldown, which has no event, and it is bounded. The official
``openai`` SDK runs through its sync client in a worker thread (its async client leaves
async generators unfinished after ``[DONE]``, which the suite's ``filterwarnings=error``
would report).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
from flaky_fakes import HOST, KEY, Flaky, refusing_port, text

from runestone_proxy.config import (
    BreakerConfig,
    Config,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
)
from runestone_proxy.server.app import App

ENV = {"FLAKY_KEY": KEY}
LIMIT_S = 10.0
MESSAGES = [{"role": "user", "content": "Hi there"}]


def routing(**fields: Any) -> RoutingConfig:
    """Idle deployments of a group are tried in config order (least in flight, stable)."""
    fields.setdefault("group_strategy", "least_in_flight")
    fields.setdefault("retry_base_ms", 0.0)
    return RoutingConfig(**fields)


def gateway_config(
    providers: dict[str, str],
    models: Sequence[ModelConfig],
    *,
    route: RoutingConfig | None = None,
    aliases: dict[str, str] | None = None,
) -> Config:
    base = Config()
    return Config(
        server=attrs.evolve(base.server, host=HOST, port=0, shutdown_grace_s=0.5),
        logging=attrs.evolve(base.logging, access_log=False),
        routing=route or routing(),
        providers=tuple(
            ProviderConfig(name, "openai", base_url=url, api_key_env="FLAKY_KEY")
            for name, url in providers.items()
        ),
        models=tuple(models),
        aliases=aliases or {},
    )


async def start_fakes(nursery: trio.Nursery, *names: str) -> list[Flaky]:
    fakes = [Flaky(name) for name in names]
    for fake in fakes:
        await nursery.start(fake.serve)
    return fakes


async def start_gateway(
    nursery: trio.Nursery, config: Config, env: dict[str, str] | None = None
) -> tuple[App, str]:
    app = App.build(config, None, {**ENV, **(env or {})})
    bound = await nursery.start(app.run)
    return app, f"http://{HOST}:{bound.port}"


@pytest.fixture
def refusing_url() -> Iterator[str]:
    """The base URL of a provider that refuses every connection."""
    with refusing_port() as port:
        yield f"http://{HOST}:{port}/v1"


def group(model: str, *providers: str, **entry: Any) -> list[ModelConfig]:
    return [ModelConfig(model, p, **entry) for p in providers]


async def alpha_stalls(
    nursery: trio.Nursery, *, route: RoutingConfig | None = None, **entry: Any
) -> tuple[Flaky, Flaky, str]:
    """Fakes alpha (never answers) and beta behind model ``m``, and the gateway's URL."""
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode = "stall"
    config = gateway_config(
        {"alpha": alpha.base_url, "beta": beta.base_url},
        group("m", "alpha", "beta", **entry),
        route=route,
    )
    _, url = await start_gateway(nursery, config)
    return alpha, beta, url


async def providers_health(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/health/providers")
    assert response.status_code == 200
    health: dict[str, Any] = response.json()["providers"]
    return health


def sse_payloads(body: str) -> list[str]:
    """The ``data:`` payloads of a whole event stream, checking the framing as we go."""
    assert body.endswith("\n\n"), body[-200:]
    out = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        out.append(block[len("data: ") :])
    return out


def sdk_stream(url: str, model: str) -> tuple[str, str, list[str | None]]:
    """In a worker thread: one streamed chat completion through the official SDK. Returns
    (x-runestone-provider, the text, the finish reasons); any error is raised."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-unused", max_retries=0, timeout=5)
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        provider = raw.headers["x-runestone-provider"]
        parts: list[str] = []
        finishes: list[str | None] = []
        with raw.parse() as stream:
            for chunk in stream:
                for choice in chunk.choices:
                    parts.append(choice.delta.content or "")
                    finishes.append(choice.finish_reason)
        return provider, "".join(parts), finishes
    finally:
        client.close()


# --- failover -------------------------------------------------------------------------------


async def test_stream_fails_over_before_its_first_byte_and_the_sdk_sees_one_clean_stream(
    nursery: trio.Nursery, refusing_url: str
) -> None:
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode = "500"
    providers = {"down": refusing_url, "alpha": alpha.base_url, "beta": beta.base_url}
    config = gateway_config(providers, group("m", "down", "alpha", "beta"))
    _, url = await start_gateway(nursery, config)
    with trio.fail_after(LIMIT_S):
        provider, content, finishes = await trio.to_thread.run_sync(sdk_stream, url, "m")
        assert (provider, content) == ("beta", text("beta"))
        assert finishes[-1] == "stop"
        assert (alpha.models(), beta.models()) == (["m"], ["m"])
        async with httpx.AsyncClient(base_url=url) as client:
            health = await providers_health(client)
    assert health["down"]["consecutive_failures"] == 1
    assert health["alpha"]["consecutive_failures"] == 1
    assert health["beta"]["state"] == "closed"


async def test_non_stream_failover_on_429_pauses_the_deployment_and_says_who_answered(
    nursery: trio.Nursery,
) -> None:
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode, alpha.retry_after_s = "429", 30
    config = gateway_config(
        {"alpha": alpha.base_url, "beta": beta.base_url}, group("m", "alpha", "beta")
    )
    _, url = await start_gateway(nursery, config)
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url) as client:
            for _ in range(2):
                response = await client.post(
                    "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
                )
                assert response.status_code == 200
                assert response.headers["x-runestone-provider"] == "beta"
                assert response.json()["provider"] == "beta"
                assert response.json()["choices"][0]["message"]["content"] == text("beta")
            health = await providers_health(client)
    assert len(alpha.requests) == 1  # paused by its retry-after: not asked again
    assert 29 < health["alpha"]["paused_for_s"] <= 30
    assert health["alpha"]["state"] == "closed"  # a 429 is not a failure of health


async def test_a_mid_stream_death_ends_with_an_error_event_and_done(
    nursery: trio.Nursery,
) -> None:
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode = "die"
    config = gateway_config(
        {"alpha": alpha.base_url, "beta": beta.base_url}, group("m", "alpha", "beta")
    )
    _, url = await start_gateway(nursery, config)
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url) as client:
            body = {"model": "m", "messages": MESSAGES, "stream": True}
            response = await client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["x-runestone-provider"] == "alpha"
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["type"] == "server_error"
    assert error["message"]
    chunks = [json.loads(p) for p in payloads[:-2]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
    ]
    assert beta.requests == []  # the client had bytes: no failover after the commit


# --- breakers -------------------------------------------------------------------------------


async def test_a_dead_providers_breaker_opens_and_closes_after_the_cooldown(
    nursery: trio.Nursery,
) -> None:
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode = "500"
    route = routing(breaker=BreakerConfig(failure_threshold=2, cooldown_s=0.2))
    config = gateway_config(
        {"alpha": alpha.base_url, "beta": beta.base_url}, group("m", "alpha", "beta"), route=route
    )
    _, url = await start_gateway(nursery, config)
    chat = {"model": "m", "messages": MESSAGES}

    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url) as client:

            async def ask() -> str:
                response = await client.post("/v1/chat/completions", json=chat)
                assert response.status_code == 200
                provider: str = response.headers["x-runestone-provider"]
                return provider

            assert [await ask(), await ask()] == ["beta", "beta"]
            health = await providers_health(client)
            assert health["alpha"]["state"] == "open"
            assert health["alpha"]["error_rate"] == 1.0
            assert await ask() == "beta"
            assert len(alpha.requests) == 2  # open: skipped without a call

            alpha.mode = "ok"  # the provider comes back
            # No event marks the end of a cooldown: poll, bounded (0.2 s cooldown, 5 s cap).
            answered = []
            for _ in range(100):
                await trio.sleep(0.05)
                answered.append(await ask())
                if (await providers_health(client))["alpha"]["state"] == "closed":
                    break
            assert answered[-1] == "alpha"  # the half-open probe, answered
            assert answered.count("alpha") == 1
            health = await providers_health(client)
    assert health["alpha"]["state"] == "closed"
    assert health["alpha"]["consecutive_failures"] == 0


async def test_a_stalled_whole_answer_fails_over_at_the_attempt_timeout(
    nursery: trio.Nursery,
) -> None:
    # No cancel scope per attempt: the upstream pool bounds its own waits by the attempt's
    # deadline, so a provider that never answers is given up on and its connection closed.
    alpha, _, url = await alpha_stalls(nursery, route=routing(attempt_timeout_s=0.3))
    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            started = trio.current_time()
            response = await client.post(
                "/v1/chat/completions", json={"model": "m", "messages": MESSAGES}
            )
            waited = trio.current_time() - started
            await alpha.disconnected.wait()  # the stalled attempt's connection was closed
            health = await providers_health(client)
    assert response.status_code == 200
    assert response.headers["x-runestone-provider"] == "beta"
    assert response.json()["choices"][0]["message"]["content"] == text("beta")
    assert 0.3 <= waited < 2.0
    assert health["alpha"]["consecutive_failures"] == 1
    assert health["alpha"]["in_flight"] == 0


# --- hedging --------------------------------------------------------------------------------


async def test_hedging_picks_the_fast_candidate_and_closes_the_slow_ones_connection(
    nursery: trio.Nursery,
) -> None:
    alpha, beta, url = await alpha_stalls(nursery, hedge_delay_ms=50.0)
    with trio.fail_after(LIMIT_S):
        provider, content, _ = await trio.to_thread.run_sync(sdk_stream, url, "m")
        assert (provider, content) == ("beta", text("beta"))
        await alpha.disconnected.wait()  # the loser's upstream connection was closed
        async with httpx.AsyncClient(base_url=url) as client:
            health = await providers_health(client)
    assert (alpha.models(), beta.models()) == (["m"], ["m"])
    assert health["alpha"]["in_flight"] == 0
    assert health["alpha"]["consecutive_failures"] == 0  # losing a race is not a failure


# --- the cost policy ------------------------------------------------------------------------


async def test_cost_policy_picks_the_cheapest_capable_healthy_model(
    nursery: trio.Nursery, refusing_url: str
) -> None:
    (alpha,) = await start_fakes(nursery, "alpha")
    tools = ("chat", "streaming", "tools")
    models = [
        ModelConfig(
            "pricey", "alpha", input_cost_per_1k=2.0, output_cost_per_1k=8.0, capabilities=tools
        ),
        ModelConfig(
            "mid", "alpha", input_cost_per_1k=0.5, output_cost_per_1k=1.5, capabilities=tools
        ),
        ModelConfig("cheap", "alpha", input_cost_per_1k=0.1, output_cost_per_1k=0.2),
        ModelConfig("cheapest", "down", input_cost_per_1k=0.01, output_cost_per_1k=0.02),
    ]
    providers = {"alpha": alpha.base_url, "down": refusing_url}
    config = gateway_config(providers, models, route=routing(policy="cost"))
    _, url = await start_gateway(nursery, config)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}

    async def ask(client: httpx.AsyncClient, **fields: Any) -> httpx.Response:
        body = {"model": "auto", "messages": MESSAGES, **fields}
        return await client.post("/v1/chat/completions", json=body)

    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url) as client:
            # The cheapest is down: the next cheapest answers.
            response = await ask(client)
            assert response.status_code == 200
            assert response.headers["x-runestone-routing-policy"] == "cost"
            assert response.json()["routing_policy"] == "cost"
            # Tools rule out both cheap ones.
            assert (await ask(client, tools=[tool])).status_code == 200
            assert (await ask(client, tools=[tool], max_cost_per_token=0.0015)).status_code == 200
            refused = await ask(client, tools=[tool], max_cost_per_token=0.001)
            streamed = await ask(client, stream=True, max_cost_per_token=0.0002)
    assert alpha.models() == ["cheap", "mid", "mid", "cheap"]
    assert "max_cost_per_token" not in alpha.requests[2]  # Runestone's own field stays home
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["code"], error["param"]) == ("no_candidate", "model")
    assert "alpha:pricey (price 0.008/token exceeds max_cost_per_token 0.001)" in error["message"]
    assert "alpha:mid (price 0.0015/token exceeds max_cost_per_token 0.001)" in error["message"]
    assert "alpha:cheap (lacks tools)" in error["message"]
    assert streamed.status_code == 200
    assert sse_payloads(streamed.text)[-1] == "[DONE]"


# --- alias hot reload -----------------------------------------------------------------------


async def test_alias_hot_reload_while_streams_are_in_flight(
    nursery: trio.Nursery, tmp_path: Path
) -> None:
    alpha, beta = await start_fakes(nursery, "alpha", "beta")
    alpha.mode = "hold"
    path = tmp_path / "aliases.toml"
    path.write_text('fast = "alpha:m"\n')
    config = gateway_config(
        {"alpha": alpha.base_url, "beta": beta.base_url}, group("m", "alpha", "beta")
    )
    app, url = await start_gateway(nursery, config, {"RUNESTONE_ALIASES_PATH": str(path)})
    streamed: dict[str, Any] = {}

    async def slow_stream(client: httpx.AsyncClient) -> None:
        body = {"model": "fast", "messages": MESSAGES, "stream": True}
        response = await client.post("/v1/chat/completions", json=body)
        streamed["provider"] = response.headers["x-runestone-provider"]
        streamed["payloads"] = sse_payloads(response.text)

    async def ask_fast(client: httpx.AsyncClient) -> str:
        response = await client.post(
            "/v1/chat/completions", json={"model": "fast", "messages": MESSAGES}
        )
        assert response.status_code == 200
        provider: str = response.headers["x-runestone-provider"]
        return provider

    with trio.fail_after(LIMIT_S):
        async with httpx.AsyncClient(base_url=url) as client, trio.open_nursery() as inner:
            inner.start_soon(slow_stream, client)
            await alpha.first_sent.wait()  # the stream is in flight, resolved to alpha

            path.write_text('fast = "beta:m"\n')
            assert app.aliases.reload_aliases()
            assert await ask_fast(client) == "beta"
            listed = (await client.get("/v1/models")).json()["data"]
            assert {"id": "fast", "alias_for": "beta:m"}.items() <= _by_id(listed, "fast").items()

            path.write_text('fast = "gpt-nope"\n')  # invalid: the old table stays
            assert not app.aliases.reload_aliases()
            assert await ask_fast(client) == "beta"
            path.write_text('fast = "beta:m"\nloop = "loop"\n')
            assert not app.aliases.reload_aliases()
            assert await ask_fast(client) == "beta"

            alpha.release.set()  # the in-flight stream finishes from its old target
    assert streamed["provider"] == "alpha"
    payloads = streamed["payloads"]
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == text("alpha")
    assert alpha.models() == ["m"]
    assert beta.models() == ["m", "m", "m"]


def _by_id(listed: list[dict[str, Any]], model_id: str) -> dict[str, Any]:
    (found,) = [m for m in listed if m["id"] == model_id]
    return found
