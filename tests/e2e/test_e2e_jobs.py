"""The overflow queue end to end, over real sockets: 202 and ``Location``, job status and
result, signed webhooks (retried until the receiver accepts), idempotency, tenant isolation
and the per-tenant cap.

The gateway runs in-process (``App.build``) with the store, the jobs routes and the drainer
wired in as app.py will wire them (``jobs_helpers.start_jobs_gateway``). Requests are queued
through ``POST /test/async``, which calls ``accept_async`` exactly as a /v1 handler will; the
drainer's runner sends each job back through the gateway's own ``/v1/chat/completions``
(mock provider) with the tenant's key, so results are what a live request gets.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; waits are for
webhook deliveries or ``overflow.drain.stop`` events, never sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from jobs_helpers import SECRET, FakeCapacity, JobsGateway, WebhookReceiver, start_jobs_gateway

from runestone_proxy import telemetry
from runestone_proxy.config import (
    AuthConfig,
    AuthKeyConfig,
    Config,
    LoggingConfig,
    OverflowConfig,
    TenantConfig,
)
from runestone_proxy.gateway.overflow import Job, JobOutcome
from runestone_proxy.server.drainer import Runner

KEYS = {"acme": "sk-acme-0123456789abcdef", "globex": "sk-globex-0123456789abcdef"}
ENV = {"KEY_ACME": KEYS["acme"], "KEY_GLOBEX": KEYS["globex"], "RUNESTONE_WEBHOOK_SECRET": SECRET}
PROMPT = "tell nobody: the launch codes are 0000"
TIMEOUT_S = 15


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def chat(**extra: Any) -> dict[str, Any]:
    return {"model": "mock-1", "messages": [{"role": "user", "content": PROMPT}], **extra}


def jobs_config(tmp_path: Path) -> Config:
    base = Config()
    return Config(
        server=attrs.evolve(base.server, port=0, shutdown_grace_s=0.5),
        logging=LoggingConfig(access_log=False),
        auth=AuthConfig(
            keys=(
                AuthKeyConfig(key_env="KEY_ACME", tenant="acme"),
                AuthKeyConfig(key_env="KEY_GLOBEX", tenant="globex"),
            )
        ),
        tenants={"acme": TenantConfig(max_queued_jobs=3)},
        overflow=OverflowConfig(
            database=str(tmp_path / "jobs.sqlite3"), backoff_base_s=0.05, backoff_max_s=0.2
        ),
    )


@attrs.define
class LoopbackRunner:
    """Runs a job through the gateway's own /v1/chat/completions, as the tenant."""

    gate: trio.Event = attrs.Factory(trio.Event)
    runs: list[str] = attrs.Factory(list)

    def __attrs_post_init__(self) -> None:
        self.gate.set()

    def make(self, port: int) -> Runner:
        async def run(job: Job) -> JobOutcome:
            await self.gate.wait()
            self.runs.append(job.id)
            async with httpx.AsyncClient(timeout=10) as client:
                response = await client.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions",
                    content=job.body,
                    headers={**auth(job.tenant), "x-request-id": job.request_id},
                )
            retryable = response.status_code >= 500 or response.status_code == 429
            return JobOutcome(response.status_code, response.content, retryable)

        return run


@attrs.define
class Settled:
    """Wakes waiters whenever a job run settles (``overflow.drain.stop``)."""

    event: trio.Event = attrs.Factory(trio.Event)

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "overflow.drain.stop":
            self.event.set()
            self.event = trio.Event()


@pytest.fixture
def events() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


@attrs.define
class Env:
    gateway: JobsGateway
    http: httpx.AsyncClient
    runner: LoopbackRunner
    receiver: WebhookReceiver
    settled: Settled

    async def enqueue(self, tenant: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        return await self.http.post("/test/async", json=body, headers={**auth(tenant), **headers})

    async def job(self, job_id: str, tenant: str) -> httpx.Response:
        return await self.http.get(f"/v1/jobs/{job_id}", headers=auth(tenant))

    async def wait_finished(self, job_id: str, tenant: str) -> dict[str, Any]:
        while True:
            settled = self.settled.event
            view: dict[str, Any] = (await self.job(job_id, tenant)).json()
            if view["status"] in ("succeeded", "failed"):
                return view
            await settled.wait()


@pytest.fixture
async def env(
    tmp_path: Path, nursery: trio.Nursery, events: telemetry.Recorder
) -> AsyncIterator[Env]:
    receiver = WebhookReceiver()
    await nursery.start(receiver.serve)
    runner = LoopbackRunner()
    settled = Settled()
    remove = telemetry.add_handler(settled)
    gateway = await start_jobs_gateway(
        nursery, jobs_config(tmp_path), ENV, runner.make, FakeCapacity(per_tenant=2)
    )
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{gateway.port}", timeout=10) as http:
        yield Env(gateway, http, runner, receiver, settled)
    remove()


async def test_a_queued_request_runs_and_its_signed_webhook_arrives(
    env: Env, events: telemetry.Recorder
) -> None:
    env.receiver.script = [500]  # the first delivery is refused: it must be retried
    with trio.fail_after(TIMEOUT_S):
        response = await env.enqueue(
            "acme", chat(webhook_url=env.receiver.url), **{"x-request-id": "req-e2e-1"}
        )
        assert response.status_code == 202
        accepted = response.json()
        job_id = accepted["job_id"]
        assert accepted == {
            "id": job_id,
            "object": "runestone.job",
            "job_id": job_id,
            "request_id": "req-e2e-1",
            "status": "queued",
            "status_url": f"/v1/jobs/{job_id}",
        }
        assert response.headers["location"] == f"/v1/jobs/{job_id}"
        assert response.headers["x-request-id"] == "req-e2e-1"
        delivered = (await env.receiver.wait_for({job_id}))[job_id]
    view = (await env.job(job_id, "acme")).json()
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert view["request_id"] == "req-e2e-1"
    assert view["error"] is None
    assert view["created_at"] <= view["updated_at"] == view["finished_at"]
    assert view["result"]["object"] == "chat.completion"
    assert view["result"]["request_id"] == "req-e2e-1"
    attempts = [d for d in env.receiver.deliveries if d.job_id == job_id]
    assert [d.status for d in attempts] == [500, 200]
    assert all(d.verified for d in attempts)
    assert delivered.headers["content-type"] == "application/json"
    payload = json.loads(delivered.body)
    assert payload["id"] == job_id
    assert payload["status"] == "succeeded"
    assert payload["result"] == view["result"]
    enqueue = events.named("overflow.enqueue")
    assert enqueue[0]["tenant"] == "acme"
    assert enqueue[0]["job_id"] == job_id
    assert enqueue[0]["key_mask"] == "sk-...cdef"
    assert enqueue[0]["queue_depth"] == 1
    assert [e["result"] for e in events.named("overflow.drain.stop")] == ["succeeded"]
    assert PROMPT not in repr(events.events)


async def test_jobs_are_private_to_their_tenant(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        job_id = (await env.enqueue("acme", chat())).json()["job_id"]
        await env.wait_finished(job_id, "acme")
        other = await env.job(job_id, "globex")
        missing = await env.job("job_doesnotexist", "globex")
        anonymous = await env.http.get(f"/v1/jobs/{job_id}")
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    # Word for word the answer for an id that never existed: nothing tells them apart.
    assert other.text.replace(job_id, "ID") == missing.text.replace("job_doesnotexist", "ID")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"


async def test_an_idempotency_key_returns_the_same_job_and_runs_it_once(env: Env) -> None:
    env.runner.gate = trio.Event()  # hold the runs until every request is in
    with trio.fail_after(TIMEOUT_S):
        first = await env.enqueue("acme", chat(), **{"idempotency-key": "order-42"})
        again = await env.enqueue("acme", chat(), **{"idempotency-key": "order-42"})
        other = await env.enqueue("globex", chat(), **{"idempotency-key": "order-42"})
        assert first.status_code == again.status_code == other.status_code == 202
        job_id = first.json()["job_id"]
        assert again.json()["job_id"] == job_id
        assert again.headers["idempotent-replayed"] == "true"
        assert "idempotent-replayed" not in first.headers
        assert other.json()["job_id"] != job_id
        env.runner.gate.set()
        await env.wait_finished(job_id, "acme")
        await env.wait_finished(other.json()["job_id"], "globex")
        replay = await env.enqueue("acme", chat(), **{"idempotency-key": "order-42"})
    assert replay.json()["job_id"] == job_id
    assert replay.json()["status"] == "succeeded"
    assert env.runner.runs.count(job_id) == 1


async def test_past_the_tenants_cap_the_gateway_answers_429(env: Env) -> None:
    env.runner.gate = trio.Event()
    with trio.fail_after(TIMEOUT_S):
        accepted = [await env.enqueue("acme", chat()) for _ in range(3)]
        assert [r.status_code for r in accepted] == [202, 202, 202]
        refused = await env.enqueue("acme", chat())
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "too_many_queued_jobs"
        assert "retry-after" in refused.headers
        assert (await env.enqueue("globex", chat())).status_code == 202
        env.runner.gate.set()
        for response in accepted:
            await env.wait_finished(response.json()["job_id"], "acme")
        assert (await env.enqueue("acme", chat())).status_code == 202


async def test_bad_idempotency_keys_and_webhook_urls_are_400(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        long_key = await env.enqueue("acme", chat(), **{"idempotency-key": "k" * 300})
        bad_url = await env.enqueue("acme", chat(webhook_url="ftp://example.com/"))
        not_json = await env.http.post("/test/async", content=b"{", headers=auth("acme"))
    assert long_key.status_code == bad_url.status_code == not_json.status_code == 400
    assert long_key.json()["error"]["code"] == "invalid_idempotency_key"
    assert bad_url.json()["error"]["param"] == "webhook_url"
    assert await env.gateway.store.counts() == {}
