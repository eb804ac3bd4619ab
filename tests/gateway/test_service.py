"""The request service without HTTP (issue 11): plain values in, values out.

The mock provider answers in-process, so nothing here opens a socket; the e2e tests hold the
same flow to the wire. ``accept`` and ``_plan`` are the service's decisions (what a request
is, and whether its bytes are forwarded untouched or rewritten), tested as plain calls;
``complete``, ``open_stream`` and the admission around them run under trio.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import pytest
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import (
    AuthConfig,
    Config,
    ModelConfig,
    ProviderConfig,
    TenantConfig,
)
from runestone_proxy.errors import InvalidParam, RateLimited
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.auth import ANONYMOUS, Principal
from runestone_proxy.gateway.metadata import splice, splice_metadata
from runestone_proxy.gateway.overflow import Enqueued, Job, JobStatus, NewJob, WebhookStatus
from runestone_proxy.gateway.ratelimit import KeyLimits
from runestone_proxy.gateway.request_body import check_idempotency_key
from runestone_proxy.gateway.service import Answer, Service, Stream

CONFIG = Config(
    auth=AuthConfig(enabled=False),
    providers=(ProviderConfig("mock", "mock", chunk_count=3),),
    models=(
        ModelConfig("mock-1", "mock", capabilities=("chat", "streaming", "completions")),
        ModelConfig("mock-embed-1", "mock", capabilities=("embeddings",)),
    ),
    tenants={"full": TenantConfig(max_concurrent=1, on_limit="queue")},
)
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


def raw(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def service(store: Any = None) -> Service:
    built = Service.build(CONFIG, {}, transport=None)  # type: ignore[arg-type]  # mock only
    built.store = store
    return built


@attrs.define
class MemoryQueue:
    """A job queue in a dict: the four operations of the interface."""

    jobs: dict[str, Job] = attrs.Factory(dict)
    is_open: bool = True

    async def enqueue(self, new: NewJob) -> Enqueued:
        job = Job(
            new.id, new.tenant, new.request_id, new.endpoint, new.body, new.webhook_url,
            new.idempotency_key, JobStatus.QUEUED, 0, None, None, 0.0, 0.0, 0.0, None, None,
            None, None, WebhookStatus.NONE, 0, None,
        )  # fmt: skip
        self.jobs[job.id] = job
        return Enqueued(job, True, len(self.jobs))

    async def get(self, job_id: str, tenant: str) -> Job | None:
        job = self.jobs.get(job_id)
        return job if job is not None and job.tenant == tenant else None

    async def find_idempotent(self, tenant: str, key: str) -> Job | None:
        for job in self.jobs.values():
            if job.tenant == tenant and job.idempotency_key == key:
                return job
        return None


# --- accept: what a request is ----------------------------------------------------------------


def test_accept_decides_stream_async_and_tokens_once() -> None:
    svc = service()
    gen = svc.accept(ANONYMOUS, "chat", raw({**CHAT, "stream": True}), "r1")
    assert (gen.stream, gen.wants_async, gen.webhook_url) == (True, False, None)
    assert gen.output_tokens == CONFIG.routing.default_output_tokens
    assert [t.provider for t in gen.route.ordered] == ["mock"]

    legacy = svc.accept(ANONYMOUS, "chat", raw(CHAT), "r2", force_stream=True)
    assert (legacy.stream, legacy.wants_async) == (True, True)

    hook = {**CHAT, "webhook_url": "https://example.com/hook"}
    parked = svc.accept(ANONYMOUS, "chat", raw(hook), "r3")
    assert (parked.stream, parked.wants_async) == (False, True)
    assert parked.webhook_url == "https://example.com/hook"

    assert svc.accept(ANONYMOUS, "chat", raw(CHAT), "r4", prefers_async=True).wants_async

    embed = {"model": "mock-embed-1", "input": "x"}
    embedding = svc.accept(ANONYMOUS, "embeddings", raw(embed), "r5")
    assert (embedding.stream, embedding.output_tokens) == (False, 0)


def test_accept_lets_tenant_id_name_the_tenant_only_without_keys() -> None:
    svc = service()
    gen = svc.accept(ANONYMOUS, "chat", raw({**CHAT, "tenant_id": "acme"}), "r1")
    assert gen.principal.tenant == "acme"
    keyed = Principal("t", "sk-...abcd", "k1")
    svc.keys = attrs.evolve(svc.keys, enabled=True, records={"x": None})  # type: ignore[dict-item]
    assert svc.accept(keyed, "chat", raw({**CHAT, "tenant_id": "acme"}), "r2").principal is keyed


def test_accept_refuses_before_any_answer() -> None:
    svc = service()
    with pytest.raises(InvalidParam, match="webhook_url"):
        svc.accept(ANONYMOUS, "chat", raw({**CHAT, "webhook_url": "ftp://x"}), "r1")
    with pytest.raises(InvalidParam, match="messages"):
        svc.accept(ANONYMOUS, "chat", raw({"model": "mock-1"}), "r2")


# --- plan: forward the bytes, or rewrite --------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "stream", "forwarded"),
    [
        (CHAT, False, True),
        ({**CHAT, "stream": True}, True, True),
        (CHAT, True, False),  # the legacy endpoint streams a body that did not ask to
        ({**CHAT, "stream": True}, False, False),
        ({**CHAT, "provider": "mock"}, False, False),  # Runestone's own field is dropped
    ],
)
def test_plan_forwards_raw_bytes_only_when_nothing_needs_a_rewrite(
    body: dict[str, Any], stream: bool, forwarded: bool
) -> None:
    svc = service()
    data = raw(body)
    parsed = json.loads(data)
    route = svc.route("chat", parsed, len(data))
    targets, call_for, policy = svc._plan("chat", route, parsed, data, "r1", stream)
    call = call_for(targets[0])
    assert (call.raw is data) is forwarded
    assert call.stream is stream
    assert "provider" not in call.body
    assert policy == CONFIG.routing.policy


# --- complete, open_stream and the admission around them --------------------------------------


async def test_complete_answers_whole_with_metadata_and_counts_the_request() -> None:
    svc = service()
    answer = await svc.complete(svc.accept(ANONYMOUS, "chat", raw(CHAT), "req-7"))
    assert isinstance(answer, Answer)
    assert answer.target.provider == "mock"
    body = json.loads(answer.body)
    assert (body["provider"], body["request_id"]) == ("mock", "req-7")
    assert body["routing_policy"] == answer.policy
    assert svc.capacity.in_flight == 0


async def test_open_stream_hands_over_the_first_payloads_and_settles_at_the_end() -> None:
    svc = service()
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    try:
        gen = svc.accept(ANONYMOUS, "chat", raw({**CHAT, "stream": True}), "req-s")
        async with svc.open_stream(gen) as stream:
            assert isinstance(stream, Stream)
            assert stream.first  # received before the block starts
            payloads = [*stream.first]
            while (more := await stream.next()) is not None:
                payloads.extend(more)
            assert stream.usage is not None
    finally:
        remove()
    assert stream.committed.ended
    assert stream.committed.error is None
    assert stream.committed.chunks == len(payloads)
    (done,) = recorder.named("stream.complete")
    assert done["chunks"] == len(payloads)


async def test_a_full_tenant_that_asked_for_async_is_parked_and_replayed_by_key() -> None:
    queue = MemoryQueue()
    svc = service(queue)
    full = attrs.evolve(ANONYMOUS, tenant="full")
    async with svc.capacity.slot("full"):  # the tenant's only slot is taken
        gen = svc.accept(full, "chat", raw(CHAT), "r1", prefers_async=True, idempotency_key=b"k")
        parked = await svc.complete(gen)
        assert isinstance(parked, Parked)
        assert not parked.replayed
        assert parked.job.body == raw(CHAT)
        assert parked.job.idempotency_key == "k"
    # With room now, the same key still answers with the job: nothing runs twice.
    again = svc.accept(full, "chat", raw(CHAT), "r2", idempotency_key=b"k")
    replay = await svc.complete(again)
    assert isinstance(replay, Parked)
    assert replay.replayed
    assert replay.job == parked.job
    async with svc.open_stream(again) as streamed:
        assert streamed == Parked(parked.job, True)


async def test_a_refused_request_gives_its_quota_back_and_says_so() -> None:
    svc = service()
    limited = attrs.evolve(ANONYMOUS, tenant="full", key_id="k", limits=KeyLimits(rpm=5))
    async with svc.capacity.slot("full"):
        gen = svc.accept(limited, "chat", raw(CHAT), "r1")  # wants no async, no queue: 429
        with pytest.raises(RateLimited) as caught:
            await svc.complete(gen)
    headers = dict(caught.value.headers)
    assert headers[b"x-ratelimit-remaining-requests"] == b"5"  # refunded
    answer = await svc.complete(svc.accept(limited, "chat", raw(CHAT), "r2"))
    assert isinstance(answer, Answer)
    assert dict(answer.headers)[b"x-ratelimit-remaining-requests"] == b"4"


async def test_run_job_takes_the_same_flow_answered_whole() -> None:
    queue = MemoryQueue()
    svc = service(queue)
    enqueued = await queue.enqueue(NewJob("t", "req-j", "chat", raw({**CHAT, "stream": True})))
    outcome = await svc.run_job(enqueued.job)
    assert outcome.status == 200
    body = json.loads(outcome.body)  # type: ignore[arg-type]
    assert body["object"] == "chat.completion"
    assert body["request_id"] == "req-j"
    with pytest.raises(InvalidParam):
        await svc.run_job(attrs.evolve(enqueued.job, endpoint="images"))


# --- pure pieces ---------------------------------------------------------------------------------


def test_splice_adds_fields_without_re_encoding() -> None:
    assert splice(b'{"a":1}\n', b'"b":2') == b'{"a":1,"b":2}'
    assert splice(b"{ }", b'"b":2') == b'{"b":2}'
    assert splice(b"[1]", b'"b":2') == b"[1]"  # not an object: left alone
    spliced = json.loads(splice_metadata(b'{"id":"x"}', "p", "cost", 'r"1'))
    assert spliced == {"id": "x", "provider": "p", "routing_policy": "cost", "request_id": 'r"1'}


@pytest.mark.parametrize("value", [b"", b"x" * 256, b"a\x7fb", "é".encode()])
def test_a_malformed_idempotency_key_is_a_400(value: bytes) -> None:
    with pytest.raises(InvalidParam) as caught:
        check_idempotency_key(value)
    assert caught.value.code == "invalid_idempotency_key"


def test_an_idempotency_key_is_printable_ascii() -> None:
    assert check_idempotency_key(None) is None
    assert check_idempotency_key(b"abc-123 ~") == "abc-123 ~"


async def test_nothing_is_held_after_the_stream_block() -> None:
    svc = service()
    gen = svc.accept(ANONYMOUS, "chat", raw({**CHAT, "stream": True}), "r1")
    with trio.CancelScope() as scope:
        async with svc.open_stream(gen) as stream:
            assert isinstance(stream, Stream)
            scope.cancel()  # the client went away mid-stream
            await trio.sleep_forever()
    assert svc.capacity.in_flight == 0
    assert svc.deployments.by_name["mock"].in_flight == 0
