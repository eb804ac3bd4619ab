"""Breakers and the hedging p95 shared by a fleet on Redis: two gateway processes
(``python -m runestone_proxy``, each its own config and state dir) on one redis-server, in
front of fakes that fail on demand (:mod:`flaky_fakes`: ``alpha`` fails, ``beta`` answers).

- Failures through gateway A open alpha's breaker on gateway B too (the propagation delay
  measured from the two ``circuit.open`` log lines); B then skips alpha without a call;
  past the cooldown exactly one probe reaches alpha from the whole fleet (and while it is
  out neither gateway sends alpha another request); its success closes alpha everywhere.
- TTFT samples taken through A set B's hedge delay (``hedge_p95``): B, with no sample of
  its own, hedges a stalled stream at once.
- Redis killed: both fall back to their own breakers (``health.fallback``), A's breaker
  opens on A alone; Redis back: both rejoin (``health.recovered``) and A's open breaker
  reaches B.

Test rules: 127.0.0.1 only, port 0 (ports from the ``gateway.ready`` log lines), redis on a
free port in tmp_path; waits are for log lines; where nothing can be awaited (a cooldown
running out, a sync round) a bounded loop polls.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from flaky_fakes import HOST, KEY, Flaky
from helpers import GatewayProcess, gateway_process
from redis_server import RedisServer, redis_server

MESSAGES = [{"role": "user", "content": "Hi"}]


def _table(header: str, fields: dict[str, object]) -> str:
    return "\n".join([header, *(f"{k} = {json.dumps(v)}" for k, v in fields.items())]) + "\n"


def config_text(
    alpha: Flaky, beta: Flaky, redis_url: str, *, cooldown_s: float, attempt_timeout_s: float
) -> str:
    """Model ``m`` on alpha then beta (least in flight: alpha first when idle); ``h`` the
    same, hedged at the observed p95. The limits fall back to local when Redis is away."""
    parts = [
        _table("[server]", {"host": HOST, "port": 0, "shutdown_grace_s": 0.5}),
        _table("[logging]", {"level": "info", "format": "json", "access_log": False}),
        _table("[auth]", {"enabled": False}),
        _table(
            "[routing]",
            {
                "group_strategy": "least_in_flight",
                "retry_base_ms": 0.0,
                "attempt_timeout_s": attempt_timeout_s,
            },
        ),
        _table("[routing.breaker]", {"failure_threshold": 2, "cooldown_s": cooldown_s}),
        _table("[state]", {"backend": "redis", "url": redis_url, "on_unavailable": "local"}),
    ]
    for fake in (alpha, beta):
        provider = {"name": fake.name, "kind": "openai", "base_url": fake.base_url}
        parts.append(_table("[[providers]]", {**provider, "api_key_env": "FLAKY_KEY"}))
    for fake in (alpha, beta):
        parts.append(_table("[[models]]", {"id": "m", "provider": fake.name}))
        parts.append(_table("[[models]]", {"id": "h", "provider": fake.name, "hedge_p95": True}))
    return "\n".join(parts)


@asynccontextmanager
async def two_gateways(
    tmp_path: Path, alpha: Flaky, beta: Flaky, redis: RedisServer, **routing: float
) -> AsyncIterator[list[GatewayProcess]]:
    async with AsyncExitStack() as stack:
        members = []
        for name in ("a", "b"):
            directory = tmp_path / name
            directory.mkdir()
            path = directory / "config.toml"
            path.write_text(config_text(alpha, beta, redis.url, **routing))
            env = {"FLAKY_KEY": KEY, "RUNESTONE_STATE_DIR": str(directory)}
            members.append(await stack.enter_async_context(gateway_process(path, env)))
        yield members


async def start_fakes(nursery: trio.Nursery) -> tuple[Flaky, Flaky]:
    alpha, beta = Flaky("alpha"), Flaky("beta")
    await nursery.start(alpha.serve)
    await nursery.start(beta.serve)
    return alpha, beta


def base(gw: GatewayProcess) -> str:
    return f"http://{HOST}:{gw.port}"


async def ask(http: httpx.AsyncClient, gw: GatewayProcess, model: str = "m") -> str:
    """One whole answer through ``gw``; which provider gave it."""
    body = {"model": model, "messages": MESSAGES}
    response = await http.post(f"{base(gw)}/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    provider: str = response.headers["x-runestone-provider"]
    return provider


async def stream(http: httpx.AsyncClient, gw: GatewayProcess, model: str = "h") -> str:
    body = {"model": model, "messages": MESSAGES, "stream": True}
    async with http.stream("POST", f"{base(gw)}/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        await response.aread()
        provider: str = response.headers["x-runestone-provider"]
        return provider


async def alpha_health(http: httpx.AsyncClient, gw: GatewayProcess) -> dict[str, Any]:
    response = await http.get(f"{base(gw)}/health/providers")
    assert response.status_code == 200
    entry: dict[str, Any] = response.json()["providers"]["alpha"]
    return entry


def events(gw: GatewayProcess, event: str) -> list[dict[str, Any]]:
    return [r for r in gw.records if r.get("event") == event]


async def test_failures_through_one_gateway_open_close_and_probe_for_the_fleet(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    alpha, beta = await start_fakes(nursery)
    alpha.mode = "500"
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(40):
        routing = {"cooldown_s": 0.5, "attempt_timeout_s": 1.0}
        async with (
            two_gateways(tmp_path, alpha, beta, redis, **routing) as (a, b),
            httpx.AsyncClient(timeout=10) as http,
        ):
            # Two failures through A (the threshold): answered by beta, alpha opens on A...
            assert [await ask(http, a), await ask(http, a)] == ["beta", "beta"]
            opened_a = await a.wait_for_log("circuit.open")
            # ... and on B, which never called alpha.
            opened_b = await b.wait_for_log("circuit.open")
            assert "fleet" not in opened_a
            assert opened_b["fleet"] is True
            delay_ms = (opened_b["at"] - opened_a["at"]) * 1000
            print(f"breaker open propagated A -> B in {delay_ms:.1f} ms")
            assert 0 <= delay_ms < 500  # a PUBLISH and one read; the periodic sync bounds it
            health = await alpha_health(http, b)
            assert (health["state"], health["health"]) == ("open", "shared")
            assert health["fleet"]["state"] in ("open", "half_open")
            assert len(alpha.requests) == 2
            assert [await ask(http, b) for _ in range(3)] == ["beta"] * 3
            assert len(alpha.requests) == 2  # B skipped alpha without a call
            # Two connections per gateway: commands, and one subscriber for both channels
            # (the slots' freed and the breakers' health); the third line is this check's.
            clients = redis.command("CLIENT", "LIST").decode().splitlines()
            assert len(clients) == 2 * 2 + 1
            assert sorted(c.split(" sub=")[1].split()[0] for c in clients) == ["0"] * 3 + ["2"] * 2

            # Past the cooldown: one probe for the whole fleet. alpha stalls it, so it stays
            # out until the attempt timeout; meanwhile neither gateway calls alpha again.
            alpha.mode = "stall"
            answers: list[str] = []

            async def ask_into(gw: GatewayProcess) -> None:
                answers.append(await ask(http, gw))

            async with trio.open_nursery() as load:
                for i in range(200):  # bounded: the cooldown has no event to wait for
                    load.start_soon(ask_into, (a, b)[i % 2])
                    await trio.sleep(0.02)
                    if len(alpha.requests) == 3:
                        break
                assert len(alpha.requests) == 3  # the probe is out
                for i in range(6):
                    assert await ask(http, (a, b)[i % 2]) == "beta"
                assert len(alpha.requests) == 3  # nobody else probed
                alpha.mode = "ok"  # the next probe will succeed
            assert set(answers) == {"beta"}  # the stalled probe failed over to beta
            probers = [gw for gw in (a, b) if events(gw, "circuit.half_open")]
            assert len(probers) == 1

            # The failed probe reopened alpha for the fleet; the next probe closes it.
            for i in range(200):
                await trio.sleep(0.02)
                if await ask(http, (a, b)[i % 2]) == "alpha":
                    break
            assert len(alpha.requests) == 4  # one probe: it succeeded
            closed = [await a.wait_for_log("circuit.close"), await b.wait_for_log("circuit.close")]
            assert sorted(bool(c.get("fleet")) for c in closed) == [False, True]
            for gw in (a, b):
                # The prober closes locally first and tells the fleet on its next sync round
                # (woken by the transition); until that round its view of the fleet is the
                # last one read. So the fleet block converges within a round, not at once.
                for _ in range(100):  # bounded: 100 x 20 ms, four times the sync interval
                    health = await alpha_health(http, gw)
                    if health["fleet"]["state"] == "closed":
                        break
                    await trio.sleep(0.02)
                assert (health["state"], health["fleet"]["state"]) == ("closed", "closed")
            assert await ask(http, b) == "alpha"


async def test_ttft_through_one_gateway_sets_the_others_hedge_delay(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    alpha, beta = await start_fakes(nursery)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(40):
        routing = {"cooldown_s": 5.0, "attempt_timeout_s": 10.0}
        async with (
            two_gateways(tmp_path, alpha, beta, redis, **routing) as (a, b),
            httpx.AsyncClient(timeout=20) as http,
        ):
            # 25 streams through A: alpha answers (no p95 yet, so no hedge).
            for _ in range(25):
                assert await stream(http, a) == "alpha"
            for _ in range(100):  # bounded: A pushes and B reads on their sync rounds
                fleet = (await alpha_health(http, b))["fleet"]
                if fleet["ttft_samples"] >= 25 and fleet["ttft_ms_p95"] is not None:
                    break
                await trio.sleep(0.05)
            assert fleet["ttft_samples"] == 25
            assert (await alpha_health(http, b))["ttft_ms_p95"] is None  # none of B's own
            p95_ms = fleet["ttft_ms_p95"]
            assert 0 < p95_ms < 1000

            # alpha stalls: B hedges after the fleet's p95, not the 10 s attempt timeout.
            alpha.mode = "stall"
            started = trio.current_time()
            assert await stream(http, b) == "beta"
            assert trio.current_time() - started < 2.0
            await alpha.disconnected.wait()  # the losing attempt was closed


async def test_redis_killed_both_fall_back_then_rejoin(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    alpha, beta = await start_fakes(nursery)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(40):
        routing = {"cooldown_s": 30.0, "attempt_timeout_s": 5.0}
        async with (
            two_gateways(tmp_path, alpha, beta, redis, **routing) as (a, b),
            httpx.AsyncClient(timeout=10) as http,
        ):
            assert await ask(http, a) == "alpha"
            assert (await alpha_health(http, b))["health"] == "shared"
            redis.kill()
            await a.wait_for_log("health.fallback")
            await b.wait_for_log("health.fallback")
            assert (await alpha_health(http, b))["health"] == "local"

            alpha.mode = "500"  # A's own breaker opens; B does not hear of it
            assert [await ask(http, a), await ask(http, a)] == ["beta", "beta"]
            assert "fleet" not in await a.wait_for_log("circuit.open")
            assert (await alpha_health(http, b))["state"] == "closed"

            redis.start(port=redis.port)  # back (empty: it kept nothing)
            await a.wait_for_log("health.recovered")
            await b.wait_for_log("health.recovered")
            opened_b = await b.wait_for_log("circuit.open")  # A told the fleet on rejoining
            assert opened_b["fleet"] is True
            count = len(alpha.requests)
            assert await ask(http, b) == "beta"
            assert len(alpha.requests) == count
            health = await alpha_health(http, b)
            assert (health["state"], health["health"]) == ("open", "shared")
