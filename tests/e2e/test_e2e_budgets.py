"""Budgets end to end: the gateway as ``App.build`` + ``App.run`` build it, real sockets, the
fake OpenAI provider reporting usage, the ``openai`` and ``anthropic`` SDKs as clients.

Prices (per 1k tokens): 1.0 in, 2.0 out. Every request here sends "Hi there" as a user
message (12 characters: an estimated 3 prompt tokens) with ``max_tokens = 4``: an estimate
of $0.011; the fake reports 9 prompt and 4 completion tokens: $0.017 each. The real cost is
above the estimate on purpose: the prompt estimate is not an upper bound, and the overshoot
bound is checked where it is tight.

Budget clocks are fake where a test crosses a period (in 2099, after every ledger record's
real time, so the ledger seeds a new period with nothing); the restart test holds the clock
at its start. Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``;
no sleeps (waits are for the fake's in-flight count and the answers).
"""

from __future__ import annotations

import calendar
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anthropic
import attrs
import httpx
import openai
import pytest
import trio
from e2e_helpers import ENV, EVERYTHING, Gateway, gateway_config, in_thread
from fakes import USAGE, FakeAnthropic, FakeOpenAI

from runestone_proxy import telemetry
from runestone_proxy.config import AuthConfig, AuthKeyConfig, Config, ModelConfig, TenantConfig
from runestone_proxy.gateway.budget_book import LocalBudgetBook
from runestone_proxy.server.app import App

KEY = "sk-budget-e2e-0123456789abcdef"
AUTH = {"authorization": f"Bearer {KEY}"}
PRICES = {"input_cost_per_1k": 1.0, "output_cost_per_1k": 2.0}
ESTIMATE = (3 * 1.0 + 4 * 2.0) / 1000
COST = (USAGE["prompt_tokens"] * 1.0 + USAGE["completion_tokens"] * 2.0) / 1000
CLI_CREATE = ("keys", "create", "--tenant", "acme")
BUDGET_HEADERS = (
    "x-runestone-budget-limit-usd",
    "x-runestone-budget-remaining-usd",
    "x-runestone-budget-reset",
)


def utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def body(model: str = "priced", **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi there"}],
        "max_tokens": 4,
        **fields,
    }


def budget_config(
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    *,
    key: dict[str, Any] | None = None,
    tenant: dict[str, Any] | None = None,
) -> Config:
    """The e2e gateway with priced models (``priced``: the fake's usual answer; ``priced-
    paced``: its stream held at the second chunk until ``paced_gate``), and one key of tenant
    ``acme`` with ``key`` budgets, the tenant with ``tenant`` budgets."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    models = (
        ModelConfig(
            "priced", "openai", upstream_id="gpt-4o-mini", capabilities=EVERYTHING, **PRICES
        ),
        ModelConfig(
            "priced-paced", "openai", upstream_id="paced", capabilities=EVERYTHING, **PRICES
        ),
    )
    keys = (AuthKeyConfig(key_env="BUDGET_KEY", tenant="acme", **(key or {})),)
    return attrs.evolve(
        base,
        auth=AuthConfig(enabled=True, keys=keys),
        tenants={"acme": TenantConfig(max_concurrent=32, **(tenant or {}))},
        models=(*base.models, *models),
    )


@attrs.define
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@asynccontextmanager
async def running(
    config: Config, clock: Callable[[], float], env: Mapping[str, str] | None = None
) -> AsyncIterator[Gateway]:
    """The gateway until the block ends, then drained (its store flushes the ledger)."""
    app = App.build(config, None, {**ENV, "BUDGET_KEY": KEY, **(env or {})})
    book = app.service.budgets
    assert isinstance(book, LocalBudgetBook)
    book.clock = clock
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(app.run)
        yield Gateway(app, bound.port)
        await app.begin_drain()


def sdk(gateway: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=KEY, max_retries=2, timeout=10)


async def spent(gateway: Gateway) -> float:
    """What the ledger holds for tenant ``acme`` (every record, whatever its time)."""
    store = gateway.app.store
    await store.sync_ledger()
    return (await store.spend("acme", None, 0.0))[0]


async def test_a_burst_overshoots_by_no_more_than_in_flight_then_429_until_the_next_day(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    budget = 0.05  # four estimates fit (0.044), a fifth does not
    config = budget_config(fake_openai, fake_anthropic, key={"budget_usd_day": budget})
    clock = Clock(utc("2099-03-10T12:00:00Z"))
    blocks = telemetry.Recorder()
    remove = telemetry.add_handler(blocks)
    try:
        await burst_then_next_day(fake_openai, config, clock, budget)
    finally:
        remove()
    # Six refusals in the burst, one per SDK call: neither SDK retried.
    assert len(blocks.named("budget.block")) == 8


async def burst_then_next_day(
    fake_openai: FakeOpenAI, config: Config, clock: Clock, budget: float
) -> None:
    statuses: list[int] = []
    answered = trio.Event()
    with trio.fail_after(30):
        async with (
            running(config, clock) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http,
        ):

            async def one() -> None:
                request = body("priced-paced", stream=True)
                async with http.stream("POST", "/v1/chat/completions", json=request) as r:
                    statuses.append(r.status_code)
                    if len(statuses) == 10:
                        answered.set()
                    assert all(r.headers.get(h) for h in BUDGET_HEADERS)
                    await r.aread()

            async with trio.open_nursery() as burst:
                for _ in range(10):
                    burst.start_soon(one)
                await answered.wait()  # six refused at once; four streams have begun
                assert fake_openai.in_flight == 4
                book = gateway.app.service.budgets
                assert isinstance(book, LocalBudgetBook)
                (account,) = book.accounts.values()
                in_flight = account.held_usd
                assert in_flight == pytest.approx(4 * ESTIMATE)
                fake_openai.paced_gate.set()
            assert sorted(statuses) == [200] * 4 + [429] * 6
            total = await spent(gateway)
            assert total == pytest.approx(4 * COST)
            # Over the budget by what the four cost beyond their estimates: no more than
            # what was in flight when the last of them was admitted.
            assert budget < total <= budget + in_flight
            assert total <= budget + 4 * (COST - ESTIMATE) + 1e-9

            # The next request: OpenAI's insufficient_quota, not retried by the SDK.
            client = sdk(gateway)
            with pytest.raises(openai.RateLimitError) as caught:
                await in_thread(client.chat.completions.create, **body())
            error = caught.value
            assert error.code == "insufficient_quota"
            assert error.type == "insufficient_quota"
            assert "daily USD budget of key sk-...cdef" in error.message
            assert "It resets at 2099-03-11T00:00:00Z" in error.message
            headers = error.response.headers
            assert headers["x-runestone-budget-limit-usd"] == "0.05"
            assert headers["x-runestone-budget-remaining-usd"] == "0"
            assert headers["x-runestone-budget-reset"] == "2099-03-11T00:00:00Z"
            assert headers["x-should-retry"] == "false"
            assert int(headers["retry-after"]) == 12 * 3600
            assert len(fake_openai.requests) == 4  # nothing refused reached the provider

            # The Messages dialect: Anthropic's envelope, rate_limit_error at 429.
            claude = anthropic.Anthropic(base_url=gateway.url, api_key=KEY, timeout=10)
            with pytest.raises(anthropic.RateLimitError) as refused:
                await in_thread(
                    claude.messages.create,
                    model="priced",
                    max_tokens=4,
                    messages=[{"role": "user", "content": "Hi there"}],
                )
            assert refused.value.status_code == 429
            assert refused.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
            assert "budget" in refused.value.body["error"]["message"]  # type: ignore[index]
            assert refused.value.response.headers["x-runestone-budget-remaining-usd"] == "0"
            claude.close()

            # The next UTC day admits again.
            clock.now += 86400
            answer = await in_thread(client.chat.completions.with_raw_response.create, **body())
            assert answer.status_code == 200
            assert answer.headers["x-runestone-budget-reset"] == "2099-03-12T00:00:00Z"
            left = float(answer.headers["x-runestone-budget-remaining-usd"])
            assert left == pytest.approx(budget - ESTIMATE)
            client.close()


async def test_a_month_budget_holds_across_days_and_resets_with_the_month(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = budget_config(fake_openai, fake_anthropic, tenant={"budget_usd_month": 0.02})
    clock = Clock(utc("2099-03-30T12:00:00Z"))
    with trio.fail_after(30):
        async with (
            running(config, clock) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http,
        ):
            first = await http.post("/v1/chat/completions", json=body())
            assert first.status_code == 200
            assert first.headers["x-runestone-budget-reset"] == "2099-04-01T00:00:00Z"
            refused = await http.post("/v1/chat/completions", json=body())  # 0.017 + 0.011
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "insufficient_quota"
            assert "monthly USD budget of tenant 'acme'" in refused.json()["error"]["message"]
            clock.now += 86400  # the 31st: the same month
            assert (await http.post("/v1/chat/completions", json=body())).status_code == 429
            clock.now = utc("2099-04-01T00:00:00Z")
            again = await http.post("/v1/chat/completions", json=body(stream=True))
            assert again.status_code == 200
            assert again.headers["x-runestone-budget-reset"] == "2099-05-01T00:00:00Z"


async def test_a_tokens_budget_reports_its_own_headers(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = budget_config(fake_openai, fake_anthropic, key={"budget_tokens_day": 19})
    clock = Clock(utc("2099-03-10T12:00:00Z"))
    with trio.fail_after(30):
        async with (
            running(config, clock) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http,
        ):
            ok = await http.post("/v1/chat/completions", json=body())
            assert ok.status_code == 200
            assert ok.headers["x-runestone-budget-limit-tokens"] == "19"
            assert ok.headers["x-runestone-budget-remaining-tokens"] == "12"  # 19 - 7 held
            assert "x-runestone-budget-limit-usd" not in ok.headers
            refused = await http.post("/v1/chat/completions", json=body())  # 13 + 7 > 19
            assert refused.status_code == 429
            assert refused.headers["x-runestone-budget-remaining-tokens"] == "6"
            assert "daily token budget of key" in refused.json()["error"]["message"]


async def test_a_restart_keeps_the_spend(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """The first gateway spends its tenant's day; a second one on the same store (the
    default SQLite file in the test's directory) seeds from the ledger and refuses."""
    config = budget_config(fake_openai, fake_anthropic, tenant={"budget_usd_day": 0.03})
    start = time.time()  # held: the ledger's records (real time) fall in this clock's day
    with trio.fail_after(30):
        async with running(config, lambda: start) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http:
                for status in (200, 200, 429):  # 0.017, then 0.017 + 0.011 <= 0.03, then not
                    r = await http.post("/v1/chat/completions", json=body())
                    assert r.status_code == status
        async with running(config, lambda: start) as gateway:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http:
                r = await http.post("/v1/chat/completions", json=body())
                assert r.status_code == 429
                assert "$0.034 spent" in r.json()["error"]["message"]
                metrics = (await http.get("/metrics")).text
        lines = metrics.splitlines()
        assert 'runestone_budget_remaining_usd{period="day",tenant="acme"} 0' in lines
        # (The counters are the process's: other tests' refusals count in them too.)
        assert any(x.startswith('runestone_budget_blocks_total{tenant="acme"} ') for x in lines)


async def test_a_runtime_keys_budgets_are_held_as_a_config_keys_are(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Budgets set on keys made at run time (the admin API's POST and PATCH, the CLI's
    ``keys create --budget-usd-day``) reach the principal the budget book reads, so they are
    held exactly as a config key's: headers on every answer, then 429 insufficient_quota."""
    admin = "admin-key-0123456789abcdef"
    as_admin = {"authorization": f"Bearer {admin}"}
    config = budget_config(fake_openai, fake_anthropic)
    clock = Clock(utc("2099-03-10T12:00:00Z"))
    with trio.fail_after(60):
        async with (
            running(config, clock, {"RUNESTONE_ADMIN_KEY": admin}) as gateway,
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
        ):
            made = await http.post(
                "/admin/keys", json={"tenant": "acme", "budget_usd_day": 0.02}, headers=as_admin
            )
            assert made.status_code == 201, made.text
            key_id, mask = made.json()["id"], made.json()["mask"]
            as_key = {"authorization": f"Bearer {made.json()['key']}"}
            ok = await http.post("/v1/chat/completions", json=body(), headers=as_key)
            assert ok.status_code == 200
            assert ok.headers["x-runestone-budget-limit-usd"] == "0.02"
            left = float(ok.headers["x-runestone-budget-remaining-usd"])
            assert left == pytest.approx(0.02 - ESTIMATE)
            refused = await http.post("/v1/chat/completions", json=body(), headers=as_key)
            assert refused.status_code == 429  # 0.017 spent + 0.011 > 0.02
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("insufficient_quota", "insufficient_quota")
            assert f"daily USD budget of key {mask}" in error["message"]
            assert refused.headers["x-should-retry"] == "false"
            assert refused.headers["x-runestone-budget-remaining-usd"] == "0.003"  # 0.02 - 0.017
            assert len(fake_openai.requests) == 1

            # A PATCH is in force at once, and the spend so far stays counted (by key id).
            patched = await http.patch(
                f"/admin/keys/{key_id}", json={"budget_usd_day": 0.03}, headers=as_admin
            )
            assert patched.status_code == 200, patched.text
            again = await http.post("/v1/chat/completions", json=body(), headers=as_key)
            assert again.status_code == 200  # 0.017 + 0.011 <= 0.03
            assert again.headers["x-runestone-budget-limit-usd"] == "0.03"
            assert (await spent(gateway)) == pytest.approx(2 * COST)

            # The CLI's key, made by another process on the same store, reaches this gateway
            # through the keys refresh with its budget (below one request's estimate).
            Path("config.toml").write_text("")  # the default store: the gateway's
            env = {k: v for k, v in os.environ.items() if not k.startswith("RUNESTONE_")}
            shell = await trio.run_process(
                [sys.executable, "-m", "runestone_proxy", *CLI_CREATE, "--budget-usd-day", "0.005"],
                capture_stdout=True,
                stderr=subprocess.DEVNULL,
                env=env,
            )
            as_cli_key = {"authorization": f"Bearer {shell.stdout.decode().strip()}"}
            with trio.fail_after(5):  # the refresh polls every 0.5 s
                while True:
                    r = await http.post("/v1/chat/completions", json=body(), headers=as_cli_key)
                    if r.status_code != 401:
                        break
                    await trio.sleep(0.05)
            assert r.status_code == 429
            assert r.json()["error"]["code"] == "insufficient_quota"
            assert r.headers["x-runestone-budget-limit-usd"] == "0.005"
            assert len(fake_openai.requests) == 2


@attrs.define
class Settled:
    """Wakes waiters whenever a job run settles (``overflow.drain.stop``)."""

    event: trio.Event = attrs.Factory(trio.Event)

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "overflow.drain.stop":
            self.event.set()
            self.event = trio.Event()


async def test_a_queued_job_is_held_to_its_tenants_budget_when_it_runs(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Tenant ``acme`` runs one request at a time; a paced stream holds its slot while two
    requests ask for async handling (each fits the budget then, and is parked, reserving
    nothing). When the slot frees, the drainer runs them: the first fits and is counted,
    the second no longer fits and fails with the 429 a live request would get."""
    config = budget_config(fake_openai, fake_anthropic)
    acme = TenantConfig(max_concurrent=1, budget_usd_day=0.03)
    config = attrs.evolve(config, tenants={"acme": acme})
    clock = Clock(utc("2099-03-10T12:00:00Z"))
    settled = Settled()
    remove = telemetry.add_handler(settled)
    try:
        with trio.fail_after(30):
            async with (
                running(config, clock) as gateway,
                httpx.AsyncClient(base_url=gateway.url, timeout=10, headers=AUTH) as http,
            ):
                jobs: list[str] = []
                async with trio.open_nursery() as nursery:

                    async def held() -> None:
                        request = body("priced-paced", stream=True)
                        r = await http.post("/v1/chat/completions", json=request)
                        assert r.status_code == 200

                    nursery.start_soon(held)
                    await fake_openai.wait_until(lambda: fake_openai.in_flight == 1)
                    for _ in range(2):
                        r = await http.post(
                            "/v1/chat/completions", json=body(), headers={"prefer": "respond-async"}
                        )
                        assert r.status_code == 202
                        jobs.append(r.json()["id"])
                    fake_openai.paced_gate.set()
                views = []
                for job in jobs:
                    while True:
                        wake = settled.event  # taken before the read: no settle is missed
                        view = (await http.get(f"/v1/jobs/{job}")).json()
                        if view["status"] in ("succeeded", "failed"):
                            break
                        await wake.wait()
                    views.append(view)
                assert await spent(gateway) == pytest.approx(2 * COST)  # the stream, job 1
    finally:
        remove()
    assert [v["status"] for v in views] == ["succeeded", "failed"]
    error = views[1]["error"]["error"]
    assert error["code"] == "insufficient_quota"
    assert "daily USD budget of tenant 'acme'" in error["message"]
    assert views[1]["attempts"] == 1  # not retried: it cannot succeed before the reset
