"""The usage ledger's accuracy: a mixed run ends with ledger totals equal, token for token
and cent for cent, to what the fake providers reported.

The run: whole and streamed chat (include_usage asked and not: Runestone asks the provider
either way, and the client sees the usage chunk only if it asked), an Anthropic-translated
chat, the Messages dialect native and translated, the Responses dialect native, a client
that disconnects mid-stream (recorded as cancelled, its tokens estimated and marked so), and
a failover after a refused first attempt (two attempts, one record). The ledger is the
in-memory one, swapped in on the running gateway (the SQLite one is tested in
tests/server).
"""

from __future__ import annotations

import json
import time
from typing import Any

import attrs
import httpx
import trio
from conftest import StartGateway
from e2e_helpers import (
    ANTHROPIC_KEY,
    ENV,
    Gateway,
    chat_body,
    gateway_config,
    raw_request,
    read_until,
)
from fakes import USAGE, FakeAnthropic, FakeOpenAI

from runestone_proxy.config import ModelConfig, ProviderConfig, RoutingConfig, TenantConfig
from runestone_proxy.gateway.ledger import MemoryLedger, UsageRecord

#: Prices per 1k tokens: (input, output).
GPT = (0.15, 0.6)
CLAUDE = (3.0, 15.0)
#: What the fakes report: OpenAI's USAGE; Anthropic's message usage (input 12, output 5).
OPENAI_TOKENS = (USAGE["prompt_tokens"], USAGE["completion_tokens"])
ANTHROPIC_TOKENS = (12, 5)
MSG = {"anthropic-version": "2023-06-01"}


def priced(base: Any, refusing_port: int) -> Any:
    """The e2e gateway, priced, with a model whose first deployment refuses connections."""
    dead = ProviderConfig(
        "dead", "openai", base_url=f"http://127.0.0.1:{refusing_port}/v1", api_key_env="X"
    )
    models = tuple(
        attrs.evolve(m, input_cost_per_1k=GPT[0], output_cost_per_1k=GPT[1])
        if m.id == "gpt-4o-mini"
        else attrs.evolve(m, input_cost_per_1k=CLAUDE[0], output_cost_per_1k=CLAUDE[1])
        if m.id == "claude-sonnet"
        else m
        for m in base.models
    )
    twice = (
        ModelConfig("twice", "dead", upstream_id="gpt-4o-mini", capabilities=("chat",)),
        ModelConfig(
            "twice",
            "openai",
            upstream_id="gpt-4o-mini",
            capabilities=("chat",),
            input_cost_per_1k=GPT[0],
            output_cost_per_1k=GPT[1],
        ),
    )
    return attrs.evolve(
        base,
        providers=(*base.providers, dead),
        models=(*models, *twice),
        routing=RoutingConfig(max_attempts=2, retry_base_ms=0, group_strategy="least_in_flight"),
    )


def cost(tokens: tuple[int, int], prices: tuple[float, float]) -> float:
    return (tokens[0] * prices[0] + tokens[1] * prices[1]) / 1000


async def test_ledger_totals_equal_what_the_providers_reported(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    refusing_port: int,
) -> None:
    config = priced(gateway_config(fake_openai.base_url, fake_anthropic.base_url), refusing_port)
    gateway: Gateway = await start_gateway(config, {**ENV, "X": "sk-x"})
    ledger = CountingLedger()
    gateway.app.service.ledger = ledger
    expected: list[tuple[tuple[int, int], tuple[float, float]]] = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            # Whole and streamed chat; the stream without include_usage hides the chunk.
            assert (
                await http.post("/v1/chat/completions", json=chat_body("gpt-4o-mini"))
            ).is_success
            expected.append((OPENAI_TOKENS, GPT))
            asked = chat_body("gpt-4o-mini", stream=True, stream_options={"include_usage": True})
            assert _usage_chunks((await http.post("/v1/chat/completions", json=asked)).text)
            expected.append((OPENAI_TOKENS, GPT))
            quiet = (
                await http.post("/v1/chat/completions", json=chat_body("gpt-4o-mini", stream=True))
            ).text
            assert not _usage_chunks(quiet)
            expected.append((OPENAI_TOKENS, GPT))
            # Anthropic-translated chat, whole and streamed.
            for stream in (False, True):
                r = await http.post(
                    "/v1/chat/completions", json=chat_body("claude-sonnet", stream=stream)
                )
                assert r.is_success
                expected.append((ANTHROPIC_TOKENS, CLAUDE))
            # The Messages dialect: native (Anthropic) and translated (OpenAI), streamed.
            for model, tokens, prices in (
                ("claude-sonnet", ANTHROPIC_TOKENS, CLAUDE),
                ("gpt-4o-mini", OPENAI_TOKENS, GPT),
            ):
                body = {**chat_body(model, stream=True), "max_tokens": 64}
                assert (await http.post("/v1/messages", json=body, headers=MSG)).is_success
                expected.append((tokens, prices))
            # The Responses dialect, native (the fake's Response usage: 9 in, 4 out).
            r = await http.post("/v1/responses", json={"model": "gpt-4o-mini", "input": "hi"})
            assert r.is_success
            expected.append((OPENAI_TOKENS, GPT))
            # A failover after a refused first attempt: one record, two attempts.
            assert (await http.post("/v1/chat/completions", json=chat_body("twice"))).is_success
            expected.append((OPENAI_TOKENS, GPT))
        # A client that goes away mid-stream (the fake sends one chunk, then waits for its
        # client to leave): cancelled, its tokens estimated.
        hang = json.dumps(chat_body("openai:hang", stream=True)).encode()
        async with await raw_request(gateway.port, "POST", "/v1/chat/completions", hang) as raw:
            await read_until(raw, b"data: ")
        await ledger.wait_for(len(expected) + 1)
    records = ledger.records
    cancelled = [r for r in records if r.outcome == "cancelled"]
    assert len(cancelled) == 1
    assert cancelled[0].estimated
    assert cancelled[0].status == 499
    assert cancelled[0].completion_tokens >= 1  # the chunks relayed before the client left
    reported = [r for r in records if r.outcome == "ok"]
    assert len(reported) == len(expected)
    assert not any(r.estimated for r in reported)
    assert sum(r.prompt_tokens for r in reported) == sum(t[0] for t, _ in expected)
    assert sum(r.completion_tokens for r in reported) == sum(t[1] for t, _ in expected)
    total = sum(r.cost_usd for r in reported)
    assert round(total, 2) == round(sum(cost(t, p) for t, p in expected), 2)
    assert abs(total - sum(cost(t, p) for t, p in expected)) < 1e-9
    (failover,) = [r for r in reported if r.model == "twice"]
    assert failover.attempts == 2
    assert failover.provider == "openai"
    endpoints = sorted({r.endpoint for r in reported})
    assert endpoints == ["chat", "messages", "responses"]
    assert all(r.tenant == "default" for r in records)
    assert all(r.latency_ms >= 0 for r in records)
    streams = [r for r in reported if r.stream]
    assert all(r.ttfb_ms is not None and r.ttfb_ms <= r.latency_ms for r in streams)
    assert ANTHROPIC_KEY not in json.dumps([r._asdict() for r in records])


def _usage_chunks(sse: str) -> list[dict[str, Any]]:
    chunks = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    return [c for c in chunks if isinstance(c.get("usage"), dict)]


@attrs.define(eq=False)
class CountingLedger(MemoryLedger):
    """The in-memory ledger, with a wait for the n-th record (a cancelled stream's record
    is written as its handler unwinds, after the client is gone)."""

    changed: trio.Event = attrs.Factory(trio.Event)

    def record(self, record: UsageRecord) -> None:
        super().record(record)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.records) < count:
            await self.changed.wait()


async def test_the_durable_ledger_holds_the_same_totals(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """The running gateway's own ledger (the SQLite store): written without a wait per
    request, then read back from its rollups and its spend query."""
    gateway: Gateway = await start_gateway()
    store = gateway.app.store
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            for stream in (False, True):
                body = chat_body("gpt-4o-mini", stream=stream)
                assert (await http.post("/v1/chat/completions", json=body)).is_success
                body = {**chat_body("claude-sonnet", stream=stream), "max_tokens": 64}
                assert (await http.post("/v1/messages", json=body, headers=MSG)).is_success
        await store.sync_ledger()
        rows = await store.usage_totals(
            since=0, until=time.time() + 3600, group_by=["tenant", "model"]
        )
        spent, tokens = await store.spend("default", None, 0)
    by_model = {row["model"]: row for row in rows}
    assert by_model["gpt-4o-mini"]["requests"] == 2
    assert by_model["gpt-4o-mini"]["prompt_tokens"] == 2 * OPENAI_TOKENS[0]
    assert by_model["gpt-4o-mini"]["completion_tokens"] == 2 * OPENAI_TOKENS[1]
    assert by_model["claude-sonnet"]["prompt_tokens"] == 2 * ANTHROPIC_TOKENS[0]
    assert by_model["claude-sonnet"]["completion_tokens"] == 2 * ANTHROPIC_TOKENS[1]
    assert tokens == 2 * sum(OPENAI_TOKENS) + 2 * sum(ANTHROPIC_TOKENS)
    assert spent == 0.0  # the e2e table has no prices


async def test_a_disabled_ledger_keeps_nothing(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    config = attrs.evolve(base, ledger=attrs.evolve(base.ledger, enabled=False))
    gateway: Gateway = await start_gateway(config)
    assert gateway.app.service.ledger is None
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            assert (await http.post("/v1/chat/completions", json=chat_body("fast"))).is_success
        await gateway.app.store.sync_ledger()
    assert gateway.app.store.stats.ledger_recorded == 0


async def test_a_queued_job_leaves_its_record(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """A request parked as a job (its tenant full, policy queue) is recorded when the
    drainer runs it: the provider's usage, its tenant, and no key id (a job keeps none)."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    tenants = {"default": TenantConfig(max_concurrent=1, on_limit="queue")}
    gateway: Gateway = await start_gateway(attrs.evolve(base, tenants=tenants))
    ledger = CountingLedger()
    gateway.app.service.ledger = ledger
    hang = json.dumps(chat_body("openai:hang", stream=True)).encode()
    with trio.fail_after(20):
        async with await raw_request(gateway.port, "POST", "/v1/chat/completions", hang) as raw:
            await read_until(raw, b"data: ")  # the tenant's one slot is taken
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
                parked = await http.post("/v1/chat/completions", json=chat_body("gpt-4o-mini"))
            assert parked.status_code == 202
        await ledger.wait_for(2)  # the hung stream (cancelled), then the job
    (job,) = [r for r in ledger.records if r.outcome == "ok"]
    assert (job.tenant, job.key_id, job.endpoint) == ("default", "", "chat")
    assert (job.prompt_tokens, job.completion_tokens) == OPENAI_TOKENS
    assert not job.estimated
    assert job.request_id == parked.json()["request_id"]
