"""Queued Anthropic Messages jobs in the request service: a parked Messages request keeps the
client headers a native provider receives, and ``run_job`` forwards them as a live call
would; its result is the whole Anthropic Message (native, or translated from the mock) with
Runestone's metadata spliced in.

No socket: the native provider's requests go to :class:`RecordingTransport`, a transport
that records what it is asked to send and answers with a canned Anthropic Message
(https://docs.anthropic.com/en/api/messages, the response shape).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import attrs

from runestone_proxy.config import (
    AuthConfig,
    Config,
    ModelConfig,
    ProviderConfig,
    TenantConfig,
)
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.auth import ANONYMOUS
from runestone_proxy.gateway.overflow import Enqueued, Job, JobStatus, NewJob, WebhookStatus
from runestone_proxy.gateway.service import Service
from runestone_proxy.gateway.transport import Body, Headers, UpstreamTimeouts

CONFIG = Config(
    auth=AuthConfig(enabled=False),
    providers=(
        ProviderConfig(
            "anthropic", "anthropic", base_url="https://api.anthropic.test", api_key_env="KEY"
        ),
        ProviderConfig("mock", "mock", chunk_count=3),
    ),
    models=(
        ModelConfig("claude-sonnet", "anthropic", upstream_id="claude-sonnet-4-5"),
        ModelConfig("mock-1", "mock"),
    ),
    tenants={"full": TenantConfig(max_concurrent=1, on_limit="queue")},
)
ENV = {"KEY": "sk-ant-test-0123456789"}
FULL = attrs.evolve(ANONYMOUS, tenant="full")
HEADERS = (
    (b"anthropic-version", b"2023-06-01"),
    (b"anthropic-beta", b"interleaved-thinking-2025-05-14,fine-grained-tool-streaming"),
    (b"x-app", b"cli"),
)
MESSAGE = {
    "id": "msg_01native",
    "type": "message",
    "role": "assistant",
    "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hello from Anthropic."}],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 10, "output_tokens": 5},
}


def messages(model: str) -> bytes:
    body = {"model": model, "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}
    return json.dumps(body).encode()


@attrs.frozen
class Sent:
    method: str
    url: str
    headers: Headers
    body: Body


@attrs.frozen
class Reply:
    status: int
    headers: Headers
    body: bytes
    body_done: bool = False

    async def receive(self) -> bytes:
        return b""

    async def read(self, max_bytes: int | None = None) -> bytes:
        return self.body


@attrs.define
class RecordingTransport:
    """Records each request and answers it with :data:`MESSAGE`."""

    sent: list[Sent] = attrs.Factory(list)

    @asynccontextmanager
    async def request(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body = b"",
        timeouts: UpstreamTimeouts | None = None,
        deadline: float | None = None,
    ) -> AsyncIterator[Reply]:
        self.sent.append(Sent(method, url, headers, body))
        yield Reply(200, [(b"content-type", b"application/json")], json.dumps(MESSAGE).encode())


@attrs.define
class MemoryQueue:
    """A job queue in a dict: the four operations of the interface."""

    jobs: dict[str, Job] = attrs.Factory(dict)
    is_open: bool = True

    async def enqueue(self, new: NewJob) -> Enqueued:
        for job in self.jobs.values():
            if new.idempotency_key is not None and job.idempotency_key == new.idempotency_key:
                return Enqueued(job, False, len(self.jobs))
        job = Job(
            new.id, new.tenant, new.request_id, new.endpoint, new.body, new.webhook_url,
            new.idempotency_key, JobStatus.QUEUED, 0, None, None, 0.0, 0.0, 0.0, None, None,
            None, None, WebhookStatus.NONE, 0, None, headers=new.headers,
        )  # fmt: skip
        self.jobs[job.id] = job
        return Enqueued(job, True, len(self.jobs))

    async def get(self, job_id: str, tenant: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    async def find_idempotent(self, tenant: str, key: str) -> Job | None:
        return None  # enqueue answers the twin: the replay path is test_service's


def service() -> tuple[Service, RecordingTransport, MemoryQueue]:
    transport, queue = RecordingTransport(), MemoryQueue()
    built = Service.build(CONFIG, ENV, transport)
    built.store = queue
    return built, transport, queue


async def park(svc: Service, model: str, request_id: str) -> Job:
    """A Messages request at the full tenant, asking for async: parked as a job."""
    async with svc.capacity.slot("full"):  # the tenant's only slot is taken
        gen = svc.accept(
            FULL, "messages", messages(model), request_id, prefers_async=True, headers=HEADERS
        )
        parked = await svc.complete(gen)
    assert isinstance(parked, Parked)
    assert not parked.replayed
    return parked.job


async def test_a_parked_messages_job_keeps_and_forwards_the_client_headers() -> None:
    svc, transport, _ = service()
    job = await park(svc, "claude-sonnet", "req-native")
    assert (job.endpoint, job.body, job.headers) == ("messages", messages("claude-sonnet"), HEADERS)
    assert transport.sent == []  # nothing ran yet
    outcome = await svc.run_job(job)
    (sent,) = transport.sent
    assert sent.url == "https://api.anthropic.test/v1/messages"
    sent_headers = list(sent.headers)
    for header in HEADERS:  # each exactly once, as the client sent it
        assert sent_headers.count(header) == 1
    assert (b"x-api-key", ENV["KEY"].encode()) in sent_headers
    assert json.loads(sent.body)["model"] == "claude-sonnet-4-5"  # type: ignore[arg-type]
    assert outcome.status == 200
    result = json.loads(outcome.body)
    assert {k: result[k] for k in MESSAGE} == MESSAGE  # the whole Message, as answered
    assert (result["provider"], result["request_id"]) == ("anthropic", "req-native")
    assert result["routing_policy"] == svc.policy


async def test_a_translated_messages_job_stores_the_message_in_anthropic_shape() -> None:
    svc, transport, _ = service()
    job = await park(svc, "mock-1", "req-mock")
    outcome = await svc.run_job(job)
    assert transport.sent == []  # the mock answers in-process
    result: dict[str, Any] = json.loads(outcome.body)
    assert (result["type"], result["role"], result["model"]) == ("message", "assistant", "mock-1")
    assert result["content"][0]["type"] == "text"
    assert result["stop_reason"] == "end_turn"
    assert set(result["usage"]) >= {"input_tokens", "output_tokens"}
    assert (result["provider"], result["request_id"]) == ("mock", "req-mock")


async def test_a_job_without_headers_reaches_anthropic_with_the_configured_version() -> None:
    svc, transport, _ = service()
    job = attrs.evolve(await park(svc, "claude-sonnet", "req-bare"), headers=())
    await svc.run_job(job)
    (sent,) = transport.sent
    names = [name for name, _ in sent.headers]
    assert names.count(b"anthropic-version") == 1
    assert b"anthropic-beta" not in names
