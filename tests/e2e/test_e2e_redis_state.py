"""The limits on Redis (``[state] backend = "redis"``): several gateways, one real redis-server.

Two or three gateways run in this process (each its own ``App``, config file, port and
state: as separate hosts would be, bar the process boundary; the subprocess fleet is in
``test_e2e_redis_fleet.py``) in front of :class:`TenancyFake`, which counts each tenant's
calls in flight and their peak: what the fleet really let through.

Test rules: 127.0.0.1 only; redis on a free port in tmp_path; every body under
``fail_after``; waits are for the fake's counters or the backend's state callbacks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from fleet_helpers import redis_fleet_config
from redis_server import RedisServer, redis_server
from tenancy_fakes import HOST, USAGE, TenancyFake

from runestone_proxy import config as config_mod
from runestone_proxy import telemetry
from runestone_proxy.server.app import App
from runestone_proxy.server.redis_limits import RedisLimits

KEY = "sk-acme-redis-state-0123456789"
ENV = {"TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789", "KEY_ACME": KEY}
AUTH = {"authorization": f"Bearer {KEY}"}
MESSAGES = [{"role": "user", "content": "Hi"}]


def chat(model: str = "t-fast", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "user": "acme", **extra}


def config_text(
    upstream: str,
    redis_url: str,
    *,
    key: Mapping[str, object] | None = None,
    tenant: Mapping[str, object] | None = None,
    state: Mapping[str, object] | None = None,
) -> str:
    return redis_fleet_config(
        upstream,
        redis_url,
        state=state or {},
        logging={"access_log": False},
        tables=[
            ("[[auth.keys]]", {"key_env": "KEY_ACME", "tenant": "acme", **(key or {})}),
            ("[tenants.acme]", {"max_concurrent": 2, **(tenant or {})}),
        ],
    )


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def fake(nursery: trio.Nursery) -> TenancyFake:
    fake = TenancyFake()
    await nursery.start(fake.serve)
    return fake


Start = Callable[..., Awaitable[list[tuple[App, str]]]]


@pytest.fixture
def start(nursery: trio.Nursery, fake: TenancyFake, redis: RedisServer, tmp_path: Path) -> Start:
    """``await start(n, key=..., tenant=..., state=...)``: n gateways sharing the redis."""

    async def start(n: int, **options: Any) -> list[tuple[App, str]]:
        started = []
        for i in range(n):
            path = tmp_path / f"gw{i}.toml"
            path.write_text(config_text(fake.base_url, redis.url, **options))
            env = {**ENV, "RUNESTONE_STATE_DIR": str(tmp_path / f"state{i}")}
            (tmp_path / f"state{i}").mkdir(exist_ok=True)
            app = App.build(config_mod.load(path, env), path, env)
            bound = await nursery.start(app.run)
            started.append((app, f"http://{HOST}:{bound.port}"))
        return started

    return start


def shared(app: App) -> RedisLimits:
    assert app.shared is not None
    return app.shared


@pytest.fixture
def events() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


async def test_concurrency_is_exact_across_gateways(start: Start, fake: TenancyFake) -> None:
    """max_concurrent = 2 for a tenant on three gateways: 12 held streams, two at a time."""
    gateways = await start(3, tenant={"on_limit": "wait", "max_wait_ms": 60_000})
    statuses: list[int] = []
    with trio.fail_after(30):
        async with httpx.AsyncClient(timeout=30) as http, trio.open_nursery() as nursery:

            async def one(url: str) -> None:
                body = chat("t-hold", stream=True)
                async with http.stream(
                    "POST", f"{url}/v1/chat/completions", json=body, headers=AUTH
                ) as r:
                    statuses.append(r.status_code)
                    await r.aread()

            for i in range(12):
                nursery.start_soon(one, gateways[i % 3][1])
            for left in range(12, 0, -1):
                want = min(2, left)
                await fake.wait_until(
                    lambda want=want: len(fake.held) == fake.in_flight["acme"] == want
                )  # type: ignore[misc]
                assert fake.peak["acme"] == 2
                fake.release_oldest()
    assert statuses == [200] * 12
    assert fake.peak["acme"] == 2
    for app, _ in gateways:
        assert shared(app).snapshot()["held_here"] == 0


async def test_rpm_is_exact_across_gateways(start: Start, redis: RedisServer) -> None:
    gateways = await start(3, key={"rpm": 5, "tpm": 100_000})
    codes = []
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http:
            for i in range(9):
                r = await http.post(
                    f"{gateways[i % 3][1]}/v1/chat/completions", json=chat(), headers=AUTH
                )
                codes.append(r.status_code)
                if r.status_code == 200:
                    assert r.headers["x-ratelimit-remaining-requests"] == str(4 - i)
                    assert r.headers["x-ratelimit-limit-tokens"] == "100000"
                else:
                    assert r.json()["error"]["code"] == "rate_limit_exceeded"
                    assert "Limit 5, Used 5, Requested 1" in r.json()["error"]["message"]
                    assert 1 <= int(r.headers["retry-after"]) <= 61
    assert codes == [200] * 5 + [429] * 4


async def test_the_tpm_settle_rides_on_the_slots_release(start: Start, redis: RedisServer) -> None:
    """One command at a request's end: the slot back and the token window settled to the
    usage the answer reported (the estimate replaced)."""
    ((_, url),) = await start(1, key={"tpm": 100_000})
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http:
            for stream in (False, True):
                body = chat(stream=True) if stream else chat()
                r = await http.post(f"{url}/v1/chat/completions", json=body, headers=AUTH)
                assert r.status_code == 200
        (tpm,) = redis.command("KEYS", "runestone:rl:*:tpm")
        while True:  # fire-and-forget: bounded by fail_after
            flat = redis.command("HGETALL", tpm)
            fields = {int(f): int(c) for f, c in zip(flat[::2], flat[1::2], strict=True)}
            buckets = sum(c for f, c in fields.items() if f >= 0)
            if buckets == 2 * USAGE["total_tokens"]:
                break
            await trio.sleep(0.01)
        assert fields[-1] == buckets  # the running total (server/redis_window.py)
        assert redis.command("ZCARD", "runestone:slots:acme") == 0


async def test_reject_when_full_and_slots_return(start: Start, fake: TenancyFake) -> None:
    (_, url1), (_, url2) = await start(2, tenant={"on_limit": "reject"})
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http:
            async with trio.open_nursery() as nursery:

                async def hold(url: str) -> None:
                    body = chat("t-hold", stream=True)
                    path = f"{url}/v1/chat/completions"
                    async with http.stream("POST", path, json=body, headers=AUTH) as r:
                        assert r.status_code == 200
                        await r.aread()

                nursery.start_soon(hold, url1)
                nursery.start_soon(hold, url2)
                await fake.wait_until(lambda: len(fake.held) == 2)
                refused = await http.post(f"{url1}/v1/chat/completions", json=chat(), headers=AUTH)
                assert refused.status_code == 429
                assert "at capacity (2 concurrent requests)" in refused.json()["error"]["message"]
                fake.release_all()
            ok = await http.post(f"{url2}/v1/chat/completions", json=chat(), headers=AUTH)
            assert ok.status_code == 200


async def test_a_key_slot_is_held_while_waiting_for_the_tenants(
    start: Start, fake: TenancyFake, redis: RedisServer
) -> None:
    """Key max_concurrent = 2, tenant max_concurrent = 1 (wait 300 ms): a request waiting
    for the tenant's slot holds one of the key's; a third is refused for the key at once;
    the waiter's key slot goes back when it gives up, the holder's when it ends."""
    ((app, url),) = await start(
        1, key={"max_concurrent": 2}, tenant={"max_concurrent": 1, "max_wait_ms": 300}
    )
    path = f"{url}/v1/chat/completions"
    key_id = app.service.keys.authenticate(f"Bearer {KEY}".encode(), None).key_id
    kslots = f"runestone:kslots:{key_id}"
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http, trio.open_nursery() as nursery:
            statuses: list[int] = []

            async def post(model: str) -> None:
                body = chat(model, stream=model == "t-hold")
                async with http.stream("POST", path, json=body, headers=AUTH) as r:
                    statuses.append(r.status_code)
                    await r.aread()

            nursery.start_soon(post, "t-hold")
            await fake.wait_until(lambda: len(fake.held) == 1)
            nursery.start_soon(post, "t-fast")  # waits for the tenant's slot
            while redis.command("ZCARD", kslots) != 2:
                await trio.sleep(0.01)
            refused = await http.post(path, json=chat(), headers=AUTH)
            assert refused.status_code == 429
            assert "its limit is 2 in flight" in refused.json()["error"]["message"]
            while 429 not in statuses:  # the waiter gave up after 300 ms
                await trio.sleep(0.01)
            assert redis.command("ZCARD", kslots) == 1
            assert shared(app).snapshot()["key_slots_here"] == 1
            fake.release_all()
        assert sorted(statuses) == [200, 429]
        while redis.command("ZCARD", kslots) != 0:  # fire-and-forget: bounded by fail_after
            await trio.sleep(0.01)
        assert shared(app).snapshot()["key_slots_here"] == 0
        assert app.service.key_slots.in_flight == {}  # the in-process KeySlots not used


async def test_an_admission_cancelled_in_flight_gives_its_slots_back(
    start: Start, redis: RedisServer
) -> None:
    """The request's task is cancelled while its ACQUIRE is in flight: the slots the script
    took for it (the tenant's and the key's) are released when the reply comes."""
    ((app, _),) = await start(1, key={"max_concurrent": 2})
    limits = shared(app)
    principal = app.service.keys.authenticate(f"Bearer {KEY}".encode(), None)
    with trio.fail_after(20):
        with trio.CancelScope() as scope:
            scope.cancel()
            await limits.admit(principal, chat(), 16, "req-cancelled", False)
        assert scope.cancelled_caught
        while limits.client.conn is None or limits.client.conn.pending:
            await trio.sleep(0.01)
        await limits.client.call("PING")  # the release went out before this
        assert redis.command("ZCARD", "runestone:slots:acme") == 0
        assert redis.command("ZCARD", f"runestone:kslots:{principal.key_id}") == 0
        assert redis.command("ZCARD", "runestone:gslots") == 0


async def test_a_dead_holders_slots_come_back_within_the_lease(
    start: Start, redis: RedisServer
) -> None:
    """Slots taken by a process that then vanished (no renewal, no release) expire."""
    ((app, url),) = await start(1, tenant={"on_limit": "reject"}, state={"lease_s": 1.0})
    limits = shared(app)
    tenant = limits._tenant("acme")
    with trio.fail_after(20):
        for member in (b"ghost:1", b"ghost:2"):
            await limits.acquire(limits.job_plan(tenant), member, 0, True, tenant)
        async with httpx.AsyncClient(timeout=10) as http:
            refused = await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            assert refused.status_code == 429
            t0 = trio.current_time()
            while (
                await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            ).status_code != 200:
                await trio.sleep(0.05)
            assert trio.current_time() - t0 <= 1.2


async def test_fail_closed_answers_503_and_recovers(
    start: Start, redis: RedisServer, events: telemetry.Recorder
) -> None:
    ((app, url),) = await start(1)
    limits = shared(app)
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http:
            assert (
                await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            ).status_code == 200
            redis.kill()
            while limits.client.up:
                await trio.sleep(0.01)
            r = await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "service_unavailable"
            assert r.headers["retry-after"] == "1"
            anthropic = await http.post(
                f"{url}/v1/messages",
                json={"model": "t-fast", "max_tokens": 10, "messages": MESSAGES},
                headers={**AUTH, "anthropic-version": "2023-06-01"},
            )
            # Anthropic's envelope for a 503 (as for every 503 of the gateway): 529 overloaded.
            assert anthropic.status_code == 529
            assert anthropic.json()["error"]["type"] == "overloaded_error"
            assert events.named("state.unavailable")
            redis.start(redis.port)
            while not limits.client.up:
                await trio.sleep(0.01)
            assert (
                await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            ).status_code == 200


async def test_local_fallback_serves_and_comes_back(
    start: Start, redis: RedisServer, events: telemetry.Recorder, fake: TenancyFake
) -> None:
    ((app, url),) = await start(1, key={"rpm": 100}, state={"on_unavailable": "local"})
    limits = shared(app)
    with trio.fail_after(20):
        async with httpx.AsyncClient(timeout=10) as http:
            redis.kill()
            while limits.client.up:
                await trio.sleep(0.01)
            for _ in range(3):
                r = await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
                assert r.status_code == 200
                assert r.headers["x-ratelimit-limit-requests"] == "100"
            assert limits.snapshot()["fallback"] is True
            assert len(events.named("state.fallback")) == 1
            redis.start(redis.port)
            while not limits.client.up:
                await trio.sleep(0.01)
            assert events.named("state.recovered")
            r = await http.post(f"{url}/v1/chat/completions", json=chat(), headers=AUTH)
            assert r.status_code == 200
            assert r.headers["x-ratelimit-remaining-requests"] == "99"  # a fresh Redis window
            assert limits.snapshot()["fallback"] is False
