"""Budgets shared on Redis by a fleet: two gateway processes (``python -m runestone_proxy``,
each its own config, port and state dir) on one real redis-server, in front of
:class:`TenancyFake` (which reports usage on streams and holds ``t-hold`` streams until
released).

A burst across both against a small tenant budget lets through only what fits once (not
once per process), overshoots by no more than the in-flight estimate, and the next request
on either process is refused with ``insufficient_quota``.

Test rules: 127.0.0.1 only, port 0 (ports from the ``gateway.ready`` log lines), redis on a
free port in tmp_path; waits are for the fake's counters and the answers; all under
``fail_after``.
"""

from __future__ import annotations

import json
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fleet_helpers import redis_fleet_config
from helpers import gateway_process
from redis_server import redis_server
from tenancy_fakes import HOST, USAGE, TenancyFake

from runestone_proxy.config import ModelConfig
from runestone_proxy.gateway.budget import estimate

KEY = "sk-acme-budget-fleet-0123456789"
ENV = {"TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789", "KEY_ACME": KEY}
AUTH = {"authorization": f"Bearer {KEY}"}
PRICES = {"input_cost_per_1k": 1.0, "output_cost_per_1k": 2.0}
BODY = {
    "model": "t-hold",
    "messages": [{"role": "user", "content": "Hi there"}],
    "max_tokens": 4,
    "user": "acme",
    "stream": True,
}
EST = estimate(BODY, 256, [ModelConfig("t-hold", "tenancy", **PRICES)]).usd
COST = (USAGE["prompt_tokens"] * 1.0 + USAGE["completion_tokens"] * 2.0) / 1000
BUDGET = 4.5 * EST  # four estimates fit, a fifth does not


def config_text(upstream: str, redis_url: str) -> str:
    return redis_fleet_config(
        upstream,
        redis_url,
        state={"lease_s": 2.0},
        models={"t-hold": PRICES},
        tables=[
            ("[[auth.keys]]", {"key_env": "KEY_ACME", "tenant": "acme"}),
            ("[tenants.acme]", {"max_concurrent": 32, "budget_usd_day": BUDGET}),
        ],
    )


async def test_a_burst_across_two_processes_overshoots_by_no_more_than_in_flight(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    fake = TenancyFake()
    await nursery.start(fake.serve)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        async with AsyncExitStack() as stack:
            members = []
            for i in range(2):
                directory = tmp_path / f"gw{i}"
                directory.mkdir()
                path = directory / "config.toml"
                path.write_text(config_text(fake.base_url, redis.url))
                env = {**ENV, "RUNESTONE_STATE_DIR": str(directory)}
                members.append(await stack.enter_async_context(gateway_process(path, env)))
            urls = [f"http://{HOST}:{gw.port}/v1/chat/completions" for gw in members]
            statuses: list[int] = []
            refused: list[dict[str, Any]] = []
            async with httpx.AsyncClient(timeout=30, headers=AUTH) as http:

                async def one(url: str) -> None:
                    async with http.stream("POST", url, json=BODY) as r:
                        statuses.append(r.status_code)
                        body = await r.aread()
                        if r.status_code == 429:
                            refused.append(json.loads(body))

                with trio.fail_after(60):
                    async with trio.open_nursery() as burst:
                        for i in range(10):
                            burst.start_soon(one, urls[i % 2])
                        await fake.wait_until(lambda: len(fake.held) == 4)
                        while len(statuses) < 10:  # the six refusals come at once
                            await trio.sleep(0.01)
                        day = time.strftime("%Y-%m-%d", time.gmtime())
                        account = f"runestone:bud:tenant:acme:day:{day}"
                        in_flight = float(redis.command("HGET", account, "hu"))
                        assert in_flight == pytest.approx(4 * EST)
                        fake.release_all()
                    assert sorted(statuses) == [200] * 4 + [429] * 6
                    assert {r["error"]["code"] for r in refused} == {"insufficient_quota"}
                    assert fake.peak["acme"] == 4

                    # Each process's next request is refused: the spend is the fleet's.
                    for url in urls:
                        r = await http.post(url, json={**BODY, "stream": False})
                        assert r.status_code == 429
                        assert r.json()["error"]["code"] == "insufficient_quota"
                        assert r.headers["x-runestone-budget-remaining-usd"] == "0"
                    total = float(redis.command("HGET", account, "usd"))
                    assert total == pytest.approx(4 * COST)
                    assert total <= BUDGET + in_flight
                    assert redis.command("ZCARD", f"{account}:holds") == 0
