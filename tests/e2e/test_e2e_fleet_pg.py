"""Three gateways, one queue: three ``python -m runestone_proxy`` processes (separate configs,
ports and state directories) on one real PostgreSQL (``[overflow] backend = "postgres"``).

Each gateway's tenant runs one request at a time and queues what finds it busy. A live
request held open by the fake upstream fills each gateway's slot, then four jobs (each with
a ``webhook_url``) go to each gateway: all twelve answered 202. The holds are released and
the fleet drains the shared queue; each gateway calls the upstream with its own key, so the
fake knows who ran what. The first job gateway A runs is held, and A is killed with SIGKILL
mid-run. Then: every job succeeded; every job reached the upstream exactly once, except A's
interrupted one, run again by another gateway once A's lease expired; every webhook was
delivered exactly once; the survivors drain and exit 0 on SIGTERM.

Test rules: 127.0.0.1 and port 0 everywhere; waits are for the fake's arrivals, log lines
and webhook deliveries, bounded by ``fail_after``; the fake upstream's 50 ms per answer is
the provider's latency (so jobs spread across the fleet), not a wait.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from collections.abc import Mapping
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import attrs
import httpx
import pg_server
import psycopg
import trio
from fakes import Exchange, FakeProvider, _chat_completion
from fleet_helpers import gateway_config, start_fleet
from jobs_helpers import SECRET, WebhookReceiver
from psycopg.rows import dict_row

GATEWAYS = ("a", "b", "c")
JOBS_EACH = 4
TIMEOUT_S = 60


def config(base_url: str) -> str:
    overflow = {"lease_s": 2.0, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
    fake = {"name": "fake", "kind": "openai", "base_url": base_url, "api_key_env": "FAKE_KEY"}
    return gateway_config(
        {"shutdown_grace_s": 1.0},
        [
            ("[auth]", {"enabled": False}),
            ("[tenants.default]", {"max_concurrent": 1, "on_limit": "queue"}),
            ("[overflow]", {"backend": "postgres", **overflow}),
            ("[routing]", {"max_attempts": 1}),
            ("[[providers]]", fake),
            ("[[models]]", {"id": "job-1", "provider": "fake"}),
            ("[[models]]", {"id": "hold-1", "provider": "fake"}),
        ],
    )


@attrs.define(eq=False)
class Upstream(FakeProvider):
    """Counts every job call by (gateway key, job marker); holds ``hold-1`` calls until
    ``release``, and gateway A's first job until ``a_killed``."""

    calls: list[tuple[str, str]] = attrs.Factory(list)
    release: trio.Event = attrs.Factory(trio.Event)
    a_killed: trio.Event = attrs.Factory(trio.Event)
    a_held: str | None = None

    async def handle(self, path: str, headers: Mapping[str, str], body: Any, ex: Exchange) -> None:
        key = headers.get("authorization", "").removeprefix("Bearer ")
        if body["model"] == "hold-1":
            await self.release.wait()
        else:
            marker = body["messages"][0]["content"]
            self.calls.append((key, marker))
            self._notify()
            if key == "key-a" and self.a_held is None:
                self.a_held = marker
                self._notify()
                await self.a_killed.wait()
                return  # its gateway is gone: nobody reads an answer
            await trio.sleep(0.05)
        await ex.json(200, _chat_completion(body["model"]))


def job_rows(url: str) -> list[dict[str, Any]]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM jobs").fetchall()


async def hold(http: httpx.AsyncClient, answers: list[int]) -> None:
    chat = {"model": "hold-1", "messages": [{"role": "user", "content": "hold"}]}
    answers.append((await http.post("/v1/chat/completions", json=chat)).status_code)


async def test_a_fleet_runs_each_job_once_and_survives_a_killed_gateway(
    tmp_path: Path, pg: pg_server.PgServer, nursery: trio.Nursery
) -> None:
    url = pg.create_database("fleet")
    upstream = Upstream("unused")
    await nursery.start(upstream.serve)
    receiver = WebhookReceiver()
    await nursery.start(receiver.serve)
    holds: list[int] = []
    jobs: dict[str, str] = {}  # job id -> its marker

    with trio.fail_after(TIMEOUT_S):
        async with AsyncExitStack() as stack:
            processes, clients = await start_fleet(
                stack,
                tmp_path,
                GATEWAYS,
                config(upstream.base_url),
                lambda name: {
                    "RUNESTONE_OVERFLOW_URL": url,
                    "RUNESTONE_WEBHOOK_SECRET": SECRET,
                    "FAKE_KEY": f"key-{name}",
                },
                timeout_s=30,
            )
            async with trio.open_nursery() as holders:
                for http in clients.values():
                    holders.start_soon(hold, http, holds)
                await upstream.wait_until(lambda: upstream.in_flight == len(GATEWAYS))
                for name, http in clients.items():
                    for i in range(JOBS_EACH):
                        marker = f"job {name}{i}"
                        chat = {
                            "model": "job-1",
                            "messages": [{"role": "user", "content": marker}],
                            "webhook_url": receiver.url,
                        }
                        answer = await http.post("/v1/chat/completions", json=chat)
                        assert answer.status_code == 202, answer.text
                        jobs[answer.json()["job_id"]] = marker
                upstream.release.set()
            assert holds == [200] * len(GATEWAYS)

            await upstream.wait_until(lambda: upstream.a_held is not None)
            processes["a"].send_signal(signal.SIGKILL)
            assert await processes["a"].wait() == -signal.SIGKILL
            upstream.a_killed.set()

            delivered = await receiver.wait_for(set(jobs))
            views = {
                job_id: (await clients["b"].get(f"/v1/jobs/{job_id}")).json() for job_id in jobs
            }
            for name in ("b", "c"):
                processes[name].send_signal(signal.SIGTERM)
                assert await processes[name].wait() == 0

    assert {v["status"] for v in views.values()} == {"succeeded"}
    runs = Counter(marker for _, marker in upstream.calls)
    assert set(runs) == set(jobs.values())
    assert upstream.a_held is not None
    assert runs[upstream.a_held] == 2  # interrupted on A, run again elsewhere
    assert all(n == 1 for marker, n in runs.items() if marker != upstream.a_held)
    rerun = [key for key, marker in upstream.calls if marker == upstream.a_held]
    assert rerun[0] == "key-a"
    assert rerun[1] in ("key-b", "key-c")
    assert len({key for key, _ in upstream.calls}) == 3  # the whole fleet ran jobs

    assert set(delivered) == set(jobs)
    ok = Counter(d.job_id for d in receiver.deliveries if d.status == 200)
    assert ok == dict.fromkeys(jobs, 1)  # each webhook exactly once, fleet-wide
    assert all(d.verified for d in receiver.deliveries)
    for d in delivered.values():
        payload = json.loads(d.body)
        assert payload["status"] == "succeeded"

    rows = job_rows(url)
    assert {r["id"] for r in rows} == set(jobs)
    assert {(r["status"], r["webhook_status"]) for r in rows} == {("succeeded", "delivered")}
