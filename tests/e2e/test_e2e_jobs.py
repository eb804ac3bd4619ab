"""The overflow queue end to end, through the product: the gateway as ``App.build`` +
``App.run`` build it (store, ``GET /v1/jobs/{id}``, drainer with ``Api.run_job`` and the real
tenant ``Capacity``), real sockets, the public API only.

Tenant ``acme`` may run one request at a time (``max_concurrent = 1``). A test fills that
slot on purpose with a live request to ``held-1``, a model of the fake upstream that answers
only when the test says so (:meth:`Env.hold`). While the slot is taken, a request asking for
async handling (``Prefer: respond-async``, a ``webhook_url``, or the legacy
``/v1/chat/stream``) is committed and answered 202 with its job; once the slot frees, the
drainer runs the job through the same pipeline as a live request.

Covered: 202 + ``Location``; ``GET /v1/jobs/{id}`` through queued, running, succeeded with
the OpenAI body and Runestone's metadata; signed webhooks retried after a 500; a provider
500 retried by the drainer (attempts == 2); idempotency (one run); tenant isolation (404,
401); the per-tenant ``max_queued_jobs`` cap (429); 400s; live service when there is room.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; waits are for
upstream arrivals, webhook deliveries or ``overflow.drain.stop`` events, never sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from jobs_helpers import SECRET, FakeUpstream, WebhookReceiver

from runestone_proxy import config as config_mod
from runestone_proxy import telemetry
from runestone_proxy.server.app import App

KEYS = {"acme": "sk-acme-0123456789abcdef", "globex": "sk-globex-0123456789abcdef"}
ENV = {"KEY_ACME": KEYS["acme"], "KEY_GLOBEX": KEYS["globex"], "RUNESTONE_WEBHOOK_SECRET": SECRET}
PROMPT = "tell nobody: the launch codes are 0000"
ASYNC = {"prefer": "respond-async"}
TIMEOUT_S = 15

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
shutdown_grace_s = 0.5

[logging]
access_log = false

[[auth.keys]]
key_env = "KEY_ACME"
tenant = "acme"

[[auth.keys]]
key_env = "KEY_GLOBEX"
tenant = "globex"

[tenants.acme]
max_concurrent = 1
max_queued_jobs = 3

[tenants.globex]
max_concurrent = 1

[routing]
max_attempts = 1          # a provider error ends the run; the drainer decides on retries

[overflow]
database = "{database}"
backoff_base_s = 0.05
backoff_max_s = 0.2

[[providers]]
name = "mock"
kind = "mock"

[[providers]]
name = "upstream"
kind = "openai"
base_url = "{upstream}"

[[models]]
id = "mock-1"
provider = "mock"

[[models]]
id = "held-1"
provider = "upstream"

[[models]]
id = "flaky-1"
provider = "upstream"
"""


def auth(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


def chat(model: str = "mock-1", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], **extra}


@attrs.define
class Settled:
    """Wakes waiters whenever a job run settles (``overflow.drain.stop``)."""

    event: trio.Event = attrs.Factory(trio.Event)

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "overflow.drain.stop":
            self.event.set()
            self.event = trio.Event()


@attrs.define
class Env:
    app: App
    http: httpx.AsyncClient
    upstream: FakeUpstream
    receiver: WebhookReceiver
    settled: Settled

    async def post(
        self, tenant: str, body: dict[str, Any], path: str = "/v1/chat/completions", **headers: str
    ) -> httpx.Response:
        return await self.http.post(path, json=body, headers={**auth(tenant), **headers})

    async def job(self, job_id: str, tenant: str) -> httpx.Response:
        return await self.http.get(f"/v1/jobs/{job_id}", headers=auth(tenant))

    async def view(self, job_id: str, tenant: str = "acme") -> dict[str, Any]:
        response = await self.job(job_id, tenant)
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view

    async def wait_finished(self, job_id: str, tenant: str = "acme") -> dict[str, Any]:
        while True:
            settled = self.settled.event  # taken before the read: no settle is missed
            view = await self.view(job_id, tenant)
            if view["status"] in ("succeeded", "failed"):
                return view
            await settled.wait()

    @asynccontextmanager
    async def hold(self, tenant: str = "acme") -> AsyncIterator[None]:
        """Fill ``tenant``'s one slot with a live request to ``held-1`` for the block; the
        live request must then end with 200."""
        answers: list[httpx.Response] = []

        async def live() -> None:
            answers.append(await self.post(tenant, chat("held-1")))

        index = len(self.upstream.arrivals)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(live)
            arrival = (await self.upstream.wait_arrivals(index + 1))[index]
            try:
                yield
            finally:
                arrival.release.set()
        assert [a.status_code for a in answers] == [200]


@pytest.fixture
def events() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


@pytest.fixture
async def env(tmp_path: Path, nursery: trio.Nursery) -> AsyncIterator[Env]:
    receiver, upstream = WebhookReceiver(), FakeUpstream()
    await nursery.start(receiver.serve)
    await nursery.start(upstream.serve)
    path = tmp_path / "config.toml"
    text = CONFIG.replace("{database}", str(tmp_path / "jobs.sqlite3"))
    path.write_text(text.replace("{upstream}", upstream.base_url))
    app = App.build(config_mod.load(path, ENV), path, ENV)
    settled = Settled()
    remove = telemetry.add_handler(settled)
    try:
        async with trio.open_nursery() as gateway:
            bound = await gateway.start(app.run)
            url = f"http://127.0.0.1:{bound.port}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                yield Env(app, http, upstream, receiver, settled)
            await app.begin_drain()
    finally:
        remove()


async def test_a_queued_request_runs_and_its_signed_webhook_arrives(
    env: Env, events: telemetry.Recorder
) -> None:
    env.receiver.script = [500]  # the first delivery is refused: it must be retried
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            body = chat("held-1", webhook_url=env.receiver.url)  # a webhook alone asks for async
            response = await env.post("acme", body, **{"x-request-id": "req-e2e-1"})
            assert response.status_code == 202, response.text
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
            assert (await env.view(job_id))["status"] == "queued"
            arrivals = len(env.upstream.arrivals)
        # The slot is free: the drainer claims the job; its upstream call is held.
        run = (await env.upstream.wait_arrivals(arrivals + 1))[arrivals]
        running = await env.view(job_id)
        assert (running["status"], running["attempts"], running["result"]) == ("running", 1, None)
        run.release.set()
        delivered = (await env.receiver.wait_for({job_id}))[job_id]
        view = await env.view(job_id)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 1
    assert view["request_id"] == "req-e2e-1"
    assert view["error"] is None
    assert view["created_at"] <= view["updated_at"] == view["finished_at"]
    result = view["result"]
    assert result["object"] == "chat.completion"
    assert result["choices"][0]["message"]["content"] == "Hello from upstream."
    assert (result["provider"], result["routing_policy"]) == ("upstream", "default")
    assert result["request_id"] == "req-e2e-1"
    assert "webhook_url" not in run.body  # Runestone's own field never goes upstream
    attempts = [d for d in env.receiver.deliveries if d.job_id == job_id]
    assert [d.status for d in attempts] == [500, 200]
    assert all(d.verified for d in attempts)
    assert delivered.headers["content-type"] == "application/json"
    payload = json.loads(delivered.body)
    assert (payload["id"], payload["request_id"]) == (job_id, "req-e2e-1")
    assert payload["status"] == "succeeded"
    assert payload["result"] == result
    enqueue = events.named("overflow.enqueue")
    assert len(enqueue) == 1
    assert (enqueue[0]["tenant"], enqueue[0]["job_id"]) == ("acme", job_id)
    assert enqueue[0]["key_mask"] == "sk-...cdef"
    assert enqueue[0]["queue_depth"] == 1
    assert [e["result"] for e in events.named("overflow.drain.stop")] == ["succeeded"]
    assert PROMPT not in repr(events.events)


async def test_a_retryable_provider_failure_is_retried_until_it_succeeds(
    env: Env, events: telemetry.Recorder
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            response = await env.post("acme", chat("flaky-1"), **ASYNC)
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
        view = await env.wait_finished(job_id)
    assert view["status"] == "succeeded"
    assert view["attempts"] == 2
    assert view["result"]["provider"] == "upstream"
    assert view["result"]["request_id"] == view["request_id"]
    flaky = [a for a in env.upstream.arrivals if a.body["model"] == "flaky-1"]
    assert len(flaky) == 2
    stops = [e for e in events.named("overflow.drain.stop") if e["job_id"] == job_id]
    assert [(e["attempt"], e["status"], e["result"]) for e in stops] == [
        (1, 500, "retry"),
        (2, 200, "succeeded"),
    ]


async def test_jobs_are_private_to_their_tenant(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            job_id = (await env.post("acme", chat(), **ASYNC)).json()["job_id"]
        await env.wait_finished(job_id)
        other = await env.job(job_id, "globex")
        missing = await env.job("job_doesnotexist", "globex")
        anonymous = await env.http.get(f"/v1/jobs/{job_id}")
    assert other.status_code == missing.status_code == 404
    assert other.json()["error"]["code"] == missing.json()["error"]["code"] == "not_found"
    # Word for word the answer for an id that never existed: nothing tells them apart.
    assert other.text.replace(job_id, "ID") == missing.text.replace("job_doesnotexist", "ID")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"


async def test_an_idempotency_key_returns_the_same_job_and_runs_it_once(
    env: Env, events: telemetry.Recorder
) -> None:
    key = {"idempotency-key": "order-42", **ASYNC}
    with trio.fail_after(TIMEOUT_S):
        async with env.hold("acme"), env.hold("globex"):
            first = await env.post("acme", chat(), **key)
            again = await env.post("acme", chat(), **key)
            other = await env.post("globex", chat(), **key)
            assert first.status_code == again.status_code == other.status_code == 202
            job_id = first.json()["job_id"]
            assert again.json()["job_id"] == job_id
            assert again.headers["idempotent-replayed"] == "true"
            assert "idempotent-replayed" not in first.headers
            assert other.json()["job_id"] != job_id  # keys are per tenant
        await env.wait_finished(job_id)
        await env.wait_finished(other.json()["job_id"], "globex")
        replay = await env.post("acme", chat(), **key)
    assert replay.status_code == 202
    assert replay.json()["job_id"] == job_id
    assert replay.json()["status"] == "succeeded"
    runs = [e["job_id"] for e in events.named("overflow.drain.start")]
    assert runs.count(job_id) == 1
    # The replay found the tenant with room and still ran nothing: two jobs, two mock calls.
    mock_calls = [e for e in events.named("provider.request.start") if e["provider"] == "mock"]
    assert len(mock_calls) == 2


async def test_past_the_tenants_cap_the_gateway_answers_429(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            accepted = [await env.post("acme", chat(), **ASYNC) for _ in range(3)]
            assert [r.status_code for r in accepted] == [202, 202, 202]
            refused = await env.post("acme", chat(), **ASYNC)
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_queued_jobs"
            assert "retry-after" in refused.headers
        for response in accepted:
            assert (await env.wait_finished(response.json()["job_id"]))["status"] == "succeeded"
        assert await env.app.store.counts() == {"succeeded": 3}


async def test_bad_idempotency_keys_and_webhook_urls_are_400(env: Env) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            long_key = await env.post("acme", chat(), **{"idempotency-key": "k" * 300, **ASYNC})
            bad_url = await env.post("acme", chat(webhook_url="ftp://example.com/"))
            not_json = await env.http.post(
                "/v1/chat/completions", content=b"{", headers={**auth("acme"), **ASYNC}
            )
            no_key = await env.http.post("/v1/chat/completions", json=chat(), headers=ASYNC)
    assert long_key.status_code == bad_url.status_code == not_json.status_code == 400
    assert long_key.json()["error"]["code"] == "invalid_idempotency_key"
    assert bad_url.json()["error"]["param"] == "webhook_url"
    assert no_key.status_code == 401
    assert await env.app.store.counts() == {}


async def test_the_legacy_stream_is_queued_when_full_and_anything_runs_live_when_not(
    env: Env,
) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with env.hold():
            legacy = await env.post(
                "acme", chat(), "/v1/chat/stream", **{"x-request-id": "req-legacy"}
            )
            assert legacy.status_code == 202, legacy.text
            job_id = legacy.json()["job_id"]
            assert legacy.headers["location"] == f"/v1/jobs/{job_id}"
        view = await env.wait_finished(job_id)
        # The slot is free again: asking for async does not queue anything.
        live = await env.post("acme", chat(), **ASYNC)
        stream = await env.post("acme", chat(), "/v1/chat/stream")
    assert view["status"] == "succeeded"
    # A queued stream's result is stored as the whole completion.
    assert view["result"]["object"] == "chat.completion"
    assert view["result"]["request_id"] == "req-legacy"
    assert live.status_code == 200
    assert "location" not in live.headers
    assert live.json()["object"] == "chat.completion"
    assert stream.status_code == 200
    assert stream.headers["content-type"].startswith("text/event-stream")
    assert stream.text.endswith("data: [DONE]\n\n")
    assert await env.app.store.counts() == {"succeeded": 1}
