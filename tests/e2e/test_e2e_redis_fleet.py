"""A fleet on one Redis: independent gateway processes (``python -m runestone_proxy``, each its
own config, port and state dir) share per-tenant slots and per-key windows.

- A burst across three processes never exceeds the tenant's ``max_concurrent``, counted at
  :class:`TenancyFake` (the calls really in flight upstream); an rpm limit is exact across
  them; a process SIGKILLed while it holds slots gives them back within ``lease_s``.
- A key's own ``max_concurrent`` is exact across them too (the rest get the key's 429 at
  once), and a SIGKILLed holder's key slots come back within ``lease_s``.
- Redis killed under load: the ``fail_closed`` gateway answers 503 (never a 500), the
  ``local`` one keeps serving on its own limits; both are back on Redis once it answers.

Test rules: 127.0.0.1 only, port 0 (ports from the ``gateway.ready`` log lines), redis on a
free port in tmp_path; waits are for log lines and the fake's counters; where nothing can
be awaited (a lease running out) a bounded loop polls.
"""

from __future__ import annotations

import signal
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import trio
from fleet_helpers import redis_fleet_config
from helpers import GatewayProcess, gateway_process
from redis_server import RedisServer, redis_server
from tenancy_fakes import HOST, TenancyFake

KEYS = {
    "acme": "sk-acme-fleet-0123456789abcdef",
    "beta": "sk-beta-fleet-0123456789abcdef",
    "gamma": "sk-gamma-fleet-0123456789abcdef",
}
ENV = {
    "TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789",
    "KEY_ACME": KEYS["acme"],
    "KEY_BETA": KEYS["beta"],
    "KEY_GAMMA": KEYS["gamma"],
}
MESSAGES = [{"role": "user", "content": "Hi"}]
LEASE_S = 1.0


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def chat(tenant: str, model: str = "t-fast", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "user": tenant, **extra}


def config_text(upstream: str, redis_url: str, **state: object) -> str:
    return redis_fleet_config(
        upstream,
        redis_url,
        state={"lease_s": LEASE_S, **state},
        tables=[
            ("[[auth.keys]]", {"key_env": "KEY_ACME", "tenant": "acme"}),
            ("[[auth.keys]]", {"key_env": "KEY_BETA", "tenant": "beta", "rpm": 4}),
            (
                "[[auth.keys]]",
                {"key_env": "KEY_GAMMA", "tenant": "gamma", "max_concurrent": 2, "rpm": 1000},
            ),
            ("[tenants.acme]", {"max_concurrent": 3, "max_wait_ms": 60_000}),
            ("[tenants.beta]", {"max_concurrent": 2, "on_limit": "reject"}),
            ("[tenants.gamma]", {"max_concurrent": 10}),
        ],
    )


@asynccontextmanager
async def fleet(
    tmp_path: Path, fake: TenancyFake, redis: RedisServer, states: list[dict[str, object]]
) -> AsyncIterator[list[GatewayProcess]]:
    async with AsyncExitStack() as stack:
        members = []
        for i, state in enumerate(states):
            directory = tmp_path / f"gw{i}"
            directory.mkdir()
            path = directory / "config.toml"
            path.write_text(config_text(fake.base_url, redis.url, **state))
            env = {**ENV, "RUNESTONE_STATE_DIR": str(directory)}
            members.append(await stack.enter_async_context(gateway_process(path, env)))
        yield members


def url(gw: GatewayProcess) -> str:
    return f"http://{HOST}:{gw.port}/v1/chat/completions"


async def hold(
    http: httpx.AsyncClient, gw: GatewayProcess, statuses: list[int], tenant: str = "acme"
) -> None:
    """A held stream through ``gw``; a gateway killed under it counts as status 0."""
    try:
        body = chat(tenant, "t-hold", stream=True)
        async with http.stream("POST", url(gw), json=body, headers=auth(tenant)) as r:
            statuses.append(r.status_code)
            body = await r.aread()
            if r.status_code == 429:
                assert b"Too many concurrent requests for API key" in body
                assert r.headers["x-ratelimit-limit-requests"] == "1000"
    except httpx.TransportError:
        statuses.append(0)


async def test_limits_hold_across_processes_and_a_killed_one_frees_its_slots(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    fake = TenancyFake()
    await nursery.start(fake.serve)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        async with fleet(tmp_path, fake, redis, [{}, {}, {}]) as members:
            async with httpx.AsyncClient(timeout=30) as http:
                with trio.fail_after(60):
                    # A burst of 12 held streams across the three: 3 at a time upstream.
                    statuses: list[int] = []
                    async with trio.open_nursery() as burst:
                        for i in range(12):
                            burst.start_soon(hold, http, members[i % 3], statuses)
                        for left in range(12, 0, -1):
                            want = min(3, left)
                            await fake.wait_until(
                                lambda want=want: len(fake.held) == fake.in_flight["acme"] == want  # type: ignore[misc]
                            )
                            fake.release_oldest()
                    assert statuses == [200] * 12
                    assert fake.peak["acme"] == 3

                    # rpm = 4 for beta's key, counted once across the fleet.
                    codes = [
                        (
                            await http.post(
                                url(members[i % 3]), json=chat("beta"), headers=auth("beta")
                            )
                        ).status_code
                        for i in range(7)
                    ]
                    assert codes == [200] * 4 + [429] * 3

                    # Member 0 takes all three slots, then dies without a word.
                    held: list[int] = []
                    async with trio.open_nursery() as holders:
                        for _ in range(3):
                            holders.start_soon(hold, http, members[0], held)
                        await fake.wait_until(lambda: len(fake.held) == 3)
                        assert redis.command("ZCARD", "runestone:slots:acme") == 3
                        members[0].send_signal(signal.SIGKILL)
                        killed_at = trio.current_time()
                    assert held == [200, 200, 200] or 0 in held
                    await fake.wait_until(lambda: fake.in_flight["acme"] == 0)
                    fake.release_all()
                    # The survivors admit acme again once the dead member's leases run out.
                    late: list[int] = []
                    async with trio.open_nursery() as after:
                        after.start_soon(hold, http, members[1], late)
                        await fake.wait_until(lambda: len(fake.held) == 1)
                        freed_after = trio.current_time() - killed_at
                        fake.release_all()
                    assert late == [200]
                    assert freed_after <= LEASE_S + 1.0, freed_after


async def test_a_keys_max_concurrent_holds_across_processes_and_comes_back_from_a_killed_one(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Key gamma: max_concurrent = 2 (its tenant allows 10), three processes."""
    fake = TenancyFake()
    await nursery.start(fake.serve)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        async with fleet(tmp_path, fake, redis, [{}, {}, {}]) as members:
            async with httpx.AsyncClient(timeout=30) as http:
                with trio.fail_after(60):
                    # A burst of 9 held streams through the key across the three: 2 run, 7
                    # get the key's 429 at once (no waiting for a key slot, as in-process).
                    statuses: list[int] = []
                    async with trio.open_nursery() as burst:
                        for i in range(9):
                            burst.start_soon(hold, http, members[i % 3], statuses, "gamma")
                        await fake.wait_until(lambda: len(fake.held) == 2)
                        while len(statuses) < 9:  # the 429s answer at once
                            await trio.sleep(0.01)
                        assert fake.peak["gamma"] == 2
                        fake.release_all()
                    assert sorted(statuses) == [200] * 2 + [429] * 7
                    # All given back. The release is fire-and-forget (sent after the slot
                    # block, while the stream's last bytes go to the client), so the client
                    # may finish reading a moment before Redis has it.
                    for _ in range(200):  # bounded: 200 x 10 ms
                        if not redis.command("KEYS", "runestone:kslots:*"):
                            break
                        await trio.sleep(0.01)
                    assert not redis.command("KEYS", "runestone:kslots:*")

                    # Member 0 holds both of the key's slots, then dies without a word.
                    held: list[int] = []
                    async with trio.open_nursery() as holders:
                        for _ in range(2):
                            holders.start_soon(hold, http, members[0], held, "gamma")
                        await fake.wait_until(lambda: len(fake.held) == 2)
                        (kslots,) = redis.command("KEYS", "runestone:kslots:*")
                        assert redis.command("ZCARD", kslots) == 2
                        members[0].send_signal(signal.SIGKILL)
                        killed_at = trio.current_time()
                    await fake.wait_until(lambda: fake.in_flight["gamma"] == 0)
                    fake.release_all()
                    refused = await http.post(
                        url(members[1]), json=chat("gamma"), headers=auth("gamma")
                    )
                    assert refused.status_code == 429  # its leases still run
                    while (
                        await http.post(url(members[2]), json=chat("gamma"), headers=auth("gamma"))
                    ).status_code != 200:
                        await trio.sleep(0.05)
                    freed_after = trio.current_time() - killed_at
                    assert freed_after <= LEASE_S + 1.0, freed_after


async def test_redis_killed_under_load(tmp_path: Path, nursery: trio.Nursery) -> None:
    """Two gateways under steady load; Redis dies and comes back."""
    fake = TenancyFake()
    await nursery.start(fake.serve)
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis:
        states: list[dict[str, object]] = [
            {"on_unavailable": "fail_closed"},
            {"on_unavailable": "local"},
        ]
        async with fleet(tmp_path, fake, redis, states) as (closed, local):
            seen: dict[str, Counter[int]] = {"closed": Counter(), "local": Counter()}
            phase = {"now": "before"}
            by_phase: dict[tuple[str, str], Counter[int]] = {}
            stop = trio.Event()

            async def load(name: str, gw: GatewayProcess, http: httpx.AsyncClient) -> None:
                while not stop.is_set():
                    r = await http.post(url(gw), json=chat("acme"), headers=auth("acme"))
                    seen[name][r.status_code] += 1
                    by_phase.setdefault((name, phase["now"]), Counter())[r.status_code] += 1
                    if r.status_code == 503:
                        assert r.json()["error"]["code"] == "service_unavailable"
                        assert r.headers["retry-after"] == "1"
                        await trio.sleep(0.01)

            async def served(name: str, status: int, at_least: int) -> None:
                while by_phase.get((name, phase["now"]), Counter())[status] < at_least:
                    await trio.sleep(0.01)

            with trio.fail_after(60):
                async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as n:
                    for _ in range(2):
                        n.start_soon(load, "closed", closed, http)
                        n.start_soon(load, "local", local, http)
                    await served("closed", 200, 20)
                    await served("local", 200, 20)
                    redis.kill()
                    phase["now"] = "down"
                    await served("closed", 503, 10)
                    await served("local", 200, 20)
                    await local.wait_for_log("state.fallback")
                    redis.start(redis.port)
                    phase["now"] = "back"
                    await served("closed", 200, 20)
                    await served("local", 200, 20)
                    await local.wait_for_log("state.recovered")
                    stop.set()
    assert set(seen["closed"]) <= {200, 503}, seen
    assert set(seen["local"]) == {200}, seen
    assert by_phase[("local", "down")][200] >= 20
