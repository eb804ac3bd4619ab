"""A fleet on one Redis and one PostgreSQL: three independent gateway processes (``python -m
runestone_proxy``, each its own config, port and state directory) share the tenant's
concurrency (``[state] backend = "redis"``) and the overflow queue (``[overflow] backend =
"postgres"``), as three hosts would.

Tenant ``acme`` may run 2 requests at once across the fleet and queues what finds it full.
Two held streams, through gateways 0 and 1, fill the fleet; nine requests spread over all
three gateways then find it full and are all parked (202) in the shared queue: none is
served live, so the limit held across the processes. Gateway 0 is then killed with SIGKILL
while it holds a slot and has jobs of its own in the queue. The other held stream ends. The
survivors run every job (gateway 0's too, its slot back within the Redis lease): every job
succeeds, each reaches the upstream exactly once, the upstream never sees more than 2 of
acme's calls at once, and the survivors drain and exit 0.

Test rules: 127.0.0.1 and port 0 everywhere; waits are for the fake's counters and the jobs
API, bounded by ``fail_after``; the job poll is a bounded loop (the jobs API is the only way
to see a job finish).
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pg_server
import trio
from fleet_helpers import redis_fleet_config
from helpers import GatewayProcess, gateway_process
from redis_server import redis_server
from tenancy_fakes import HOST, TenancyFake

KEY = "sk-acme-fleet-0123456789abcdef"
ENV = {"TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789", "KEY_ACME": KEY}
HEADERS = {"authorization": f"Bearer {KEY}"}
JOBS = 9
TIMEOUT_S = 90
POLL_S = 0.05


def config_text(upstream: str, redis_url: str) -> str:
    return redis_fleet_config(
        upstream,
        redis_url,
        state={"lease_s": 1.0},
        tables=[
            ("[overflow]", {"backend": "postgres", "lease_s": 2.0, "backoff_base_s": 0.05}),
            ("[[auth.keys]]", {"key_env": "KEY_ACME", "tenant": "acme"}),
            ("[tenants.acme]", {"max_concurrent": 2, "on_limit": "queue"}),
        ],
    )


def chat(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Hi"}],
        "user": "acme",
        **extra,
    }


async def hold(http: httpx.AsyncClient, gw: GatewayProcess, statuses: list[int]) -> None:
    """A held stream through ``gw``; one whose gateway is killed under it counts as 0."""
    try:
        url = f"http://{HOST}:{gw.port}/v1/chat/completions"
        body = chat("t-hold", stream=True)
        async with http.stream("POST", url, json=body, headers=HEADERS) as answer:
            await answer.aread()
            statuses.append(answer.status_code)
    except httpx.TransportError:
        statuses.append(0)


async def test_a_fleet_shares_limits_and_queue_and_loses_nothing_when_one_dies(
    tmp_path: Path, pg: pg_server.PgServer, nursery: trio.Nursery
) -> None:
    fake = TenancyFake()
    await nursery.start(fake.serve)
    database = pg.create_database("fleet_both")
    (tmp_path / "redis").mkdir()
    with redis_server(tmp_path / "redis") as redis, trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            members: list[GatewayProcess] = []
            for i in range(3):
                home = tmp_path / f"gw{i}"
                home.mkdir()
                path = home / "config.toml"
                path.write_text(config_text(fake.base_url, redis.url))
                env = {**ENV, "RUNESTONE_STATE_DIR": str(home), "RUNESTONE_OVERFLOW_URL": database}
                members.append(await stack.enter_async_context(gateway_process(path, env)))
            http = await stack.enter_async_context(httpx.AsyncClient(timeout=30))
            held: list[int] = []
            async with trio.open_nursery() as holders:
                holders.start_soon(hold, http, members[0], held)
                await fake.wait_until(lambda: len(fake.held) == 1)
                holders.start_soon(hold, http, members[1], held)
                await fake.wait_until(lambda: len(fake.held) == 2)

                # The fleet is full: every member parks what comes, none serves it live.
                jobs: dict[str, int] = {}
                for i in range(JOBS):
                    gw = members[i % 3]
                    url = f"http://{HOST}:{gw.port}/v1/chat/completions"
                    answer = await http.post(url, json=chat("t-fast"), headers=HEADERS)
                    assert answer.status_code == 202, answer.text
                    jobs[answer.json()["job_id"]] = i % 3
                assert fake.peak["acme"] == 2
                assert fake.completed == 0

                # Member 0 dies holding a slot, with its own jobs in the shared queue.
                members[0].send_signal(signal.SIGKILL)
                assert await members[0].wait() == -signal.SIGKILL
                await fake.wait_until(lambda: len(fake.held) == 1)
                fake.release_all()
            assert sorted(held) == [0, 200]

            survivor = f"http://{HOST}:{members[1].port}"
            pending = set(jobs)
            while pending:
                for job_id in sorted(pending):
                    view = (await http.get(f"{survivor}/v1/jobs/{job_id}", headers=HEADERS)).json()
                    assert view["status"] in ("queued", "running", "succeeded"), view
                    if view["status"] == "succeeded":
                        pending.discard(job_id)
                if pending:
                    await trio.sleep(POLL_S)
            for gw in members[1:]:
                gw.send_signal(signal.SIGTERM)
                assert await gw.wait() == 0

    assert fake.peak["acme"] == 2  # never more than the fleet-wide limit, jobs included
    # Each job reached the upstream once; plus the one held stream that finished.
    assert fake.completed == JOBS + 1
    assert {member for member in jobs.values()} == {0, 1, 2}
