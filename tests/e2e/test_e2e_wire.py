"""The wire contract, read raw with httpx: what the gateway sends upstream, the metadata it
adds, SSE framing and headers, failures mid-stream, upstream failures and their statuses,
and the legacy ``/v1/chat/stream``."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import (
    ANTHROPIC_KEY,
    GATEWAY_KEY,
    HOST,
    OPENAI_KEY,
    Gateway,
    chat_body,
    gateway_config,
    read_until,
    sse_data,
    sse_json,
)
from fakes import TEXT, FakeAnthropic, FakeOpenAI

from runestone_proxy.config import ProviderConfig, UpstreamConfig

# --- what goes upstream ---------------------------------------------------------------------


async def test_openai_request_forwarded(http: httpx.AsyncClient, fake_openai: FakeOpenAI) -> None:
    body = chat_body(
        "gpt-4o-mini",
        temperature=0.5,
        logit_bias={"50256": -100},
        some_future_field={"nested": [1, 2, {"x": None}]},
        tenant_id="acme",
        model_family="general",
    )
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    sent = fake_openai.last()
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    # Unknown OpenAI fields pass through untouched; Runestone's own never leave.
    expected = {k: v for k, v in body.items() if k not in ("tenant_id", "model_family")}
    assert sent.body == expected


async def test_forwarded_bytes_untouched(http: httpx.AsyncClient, fake_openai: FakeOpenAI) -> None:
    """No rewrite needed: the client's bytes go upstream as they were (key order, spacing)."""
    raw = b'{ "messages": [{"role":"user","content":"Hi"}],  "model": "gpt-4o-mini", "z": 1 }'
    with trio.fail_after(10):
        response = await http.post(
            "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
        )
    assert response.status_code == 200
    assert fake_openai.last().body == json.loads(raw)
    assert list(fake_openai.last().body) == ["messages", "model", "z"]


async def test_model_rewritten_after_alias(
    http: httpx.AsyncClient, fake_openai: FakeOpenAI
) -> None:
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=chat_body("fast", seed=7))
    assert response.status_code == 200
    assert fake_openai.last().body == chat_body("gpt-4o-mini", seed=7)
    assert response.json()["model"] == "gpt-4o-mini"  # the provider's answer, unchanged


async def test_anthropic_request(http: httpx.AsyncClient, fake_anthropic: FakeAnthropic) -> None:
    body = {
        "model": "smart",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ],
        "max_tokens": 50,
        "stream": True,
    }
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    sent = fake_anthropic.last()
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.headers["anthropic-version"]
    assert "authorization" not in sent.headers
    assert sent.body["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
    assert sent.body["messages"] == [{"role": "user", "content": "Hi"}]
    assert (sent.body["max_tokens"], sent.body["stream"]) == (50, True)


# --- metadata ----------------------------------------------------------------------------------


async def test_metadata_non_stream(http: httpx.AsyncClient) -> None:
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=chat_body("smart"))
        echoed = await http.post(
            "/v1/chat/completions",
            json=chat_body("mock-1"),
            headers={"x-request-id": "client-chosen-id-42"},
        )
        # Printable ASCII is echoed, quotes and backslashes included: the body stays JSON.
        quoted = await http.post(
            "/v1/chat/completions",
            json=chat_body("mock-1"),
            headers={"x-request-id": 'id-"q"\\b'},
        )
    body = response.json()
    assert response.headers["x-request-id"].startswith("req_")
    assert response.headers["x-runestone-provider"] == "anthropic"
    assert response.headers["x-runestone-routing-policy"] == "default"
    assert body["provider"] == "anthropic"
    assert body["routing_policy"] == "default"
    assert body["request_id"] == response.headers["x-request-id"]
    assert body["choices"][0]["message"]["content"] == TEXT
    assert echoed.headers["x-request-id"] == "client-chosen-id-42"
    assert echoed.json()["request_id"] == "client-chosen-id-42"
    assert echoed.headers["x-runestone-provider"] == "mock"
    assert quoted.json()["request_id"] == quoted.headers["x-request-id"] == 'id-"q"\\b'


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/models", None),
        ("GET", "/v1/models/fast", None),
        ("GET", "/v1/models/nope", None),
        ("GET", "/health", None),
        ("GET", "/health/live", None),
        ("GET", "/health/ready", None),
        ("GET", "/no/such/path", None),
        ("POST", "/v1/chat/completions", b"{not json"),
        ("POST", "/v1/embeddings", {"model": "mock-embed-1", "input": "x"}),
        ("POST", "/v1/chat/completions", chat_body("openai:err-500")),
    ],
)
async def test_request_id_on_every_answer(
    http: httpx.AsyncClient, method: str, path: str, body: object
) -> None:
    kwargs: dict[str, object] = {}
    if isinstance(body, bytes):
        kwargs["content"] = body
    elif body is not None:
        kwargs["json"] = body
    with trio.fail_after(10):
        fresh = await http.request(method, path, **kwargs)  # type: ignore[arg-type]
        echoed = await http.request(method, path, headers={"x-request-id": "abc-123"}, **kwargs)  # type: ignore[arg-type]
    assert fresh.headers["x-request-id"].startswith("req_")
    assert echoed.headers["x-request-id"] == "abc-123"
    if fresh.status_code >= 400:
        assert set(fresh.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("model", ["fast", "smart", "mock-1"])
async def test_sse_headers_and_framing(http: httpx.AsyncClient, model: str) -> None:
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=chat_body(model, stream=True))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-accel-buffering"] == "no"
    assert response.headers["x-request-id"]
    assert response.headers["x-runestone-provider"] == {"fast": "openai", "smart": "anthropic"}.get(
        model, "mock"
    )
    assert response.headers["x-runestone-routing-policy"] == "default"
    chunks = sse_json(response.text)  # ends with data: [DONE], nothing after it
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}


# --- failures mid-stream ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("openai:cut", "upstream_protocol_error"),
        ("openai:cut-hard", None),
        ("anthropic:claude-overloaded-mid", "overloaded_error"),
    ],
)
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
async def test_stream_failure_after_start(
    http: httpx.AsyncClient, model: str, code: str | None, path: str
) -> None:
    body = (
        chat_body(model, stream=True)
        if "chat" in path
        else {
            "model": model,
            "prompt": "Hi",
            "stream": True,
        }
    )
    with trio.fail_after(10):
        response = await http.post(path, json=body)
    assert response.status_code == 200  # the stream had started
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    *chunks, error = [json.loads(p) for p in payloads[:-1]]
    assert chunks, "some chunks were relayed before the failure"
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "server_error"
    if code is not None:
        assert error["error"]["code"] == code
    for chunk in chunks:  # never a made-up ending
        assert all(choice.get("finish_reason") is None for choice in chunk["choices"])


# --- upstream failures --------------------------------------------------------------------------


async def test_upstream_refused_is_502(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    refusing_port: int,
) -> None:
    dead = ProviderConfig(
        "dead",
        "openai",
        base_url=f"http://127.0.0.1:{refusing_port}/v1",
        api_key_env="FAKE_OPENAI_KEY",
    )
    config = gateway_config(fake_openai.base_url, fake_anthropic.base_url, extra_providers=[dead])
    with trio.fail_after(10):
        gateway: Gateway = await start_gateway(config)
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            whole = await client.post("/v1/chat/completions", json=chat_body("dead:gpt-4o"))
            streamed = await client.post(
                "/v1/chat/completions", json=chat_body("dead:gpt-4o", stream=True)
            )
    for response in (whole, streamed):
        assert response.status_code == 502
        assert response.headers["content-type"] == "application/json"
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "upstream_connect_error")
    assert gateway.app.pool.open_connections == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_stall_is_504(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    stream: bool,
) -> None:
    config = gateway_config(
        fake_openai.base_url,
        fake_anthropic.base_url,
        upstream=UpstreamConfig(first_byte_timeout_s=0.2),
    )
    with trio.fail_after(10):
        gateway: Gateway = await start_gateway(config)
        async with httpx.AsyncClient(base_url=gateway.url) as client:
            response = await client.post(
                "/v1/chat/completions", json=chat_body("openai:stall", stream=stream)
            )
        assert response.status_code == 504
        assert response.json()["error"]["code"] == "upstream_timeout"
        # The gateway gave up on the exchange: the fake sees its client leave.
        await fake_openai.wait_until(lambda: fake_openai.disconnects == 1)
    assert gateway.app.pool.open_connections == 0


@pytest.mark.parametrize(
    ("model", "status", "error_type", "code", "param"),
    [
        ("openai:err-400", 400, "invalid_request_error", "decimal_above_max_value", "temperature"),
        ("openai:err-404", 404, "invalid_request_error", "model_not_found", None),
        ("openai:err-429", 429, "requests", "rate_limit_exceeded", None),
        ("anthropic:claude-err-429", 429, "tokens", "rate_limit_exceeded", None),
        ("anthropic:claude-err-401", 401, "invalid_request_error", "invalid_api_key", None),
        ("anthropic:claude-err-529", 503, "server_error", "overloaded_error", None),
    ],
)
async def test_provider_errors_pass_through(
    http: httpx.AsyncClient,
    model: str,
    status: int,
    error_type: str,
    code: str,
    param: str | None,
) -> None:
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=chat_body(model))
    assert response.status_code == status
    error = response.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (error_type, code, param)
    assert error["message"]
    if status == 429:
        assert response.headers["retry-after"] == ("7" if "openai" in model else "9")


async def test_bad_bodies(http: httpx.AsyncClient, fake_openai: FakeOpenAI) -> None:
    cases = [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(), None, "model"),
        (json.dumps({"model": "fast"}).encode(), "missing_required_parameter", "messages"),
        (json.dumps(chat_body("fast", stream="yes")).encode(), None, "stream"),
    ]
    with trio.fail_after(10):
        for raw, code, param in cases:
            response = await http.post(
                "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
            )
            assert response.status_code == 400, raw
            error = response.json()["error"]
            assert error["type"] == "invalid_request_error"
            assert error["param"] == param
            if code is not None:
                assert error["code"] == code
    assert fake_openai.requests == []  # nothing reached the provider


# --- legacy /v1/chat/stream ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fake_name"),
    [
        ({"model": "gpt-4o-mini", "provider": "openai", "tenant_id": "acme"}, "openai"),
        ({"model": "smart", "tenant_id": "acme"}, "anthropic"),
        ({"model": "gpt-4o-mini", "stream": False, "provider": "openai"}, "openai"),
    ],
)
async def test_legacy_chat_stream(
    http: httpx.AsyncClient,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    body: dict[str, object],
    fake_name: str,
) -> None:
    request = {**body, "messages": [{"role": "user", "content": "Hi"}]}
    with trio.fail_after(10):
        response = await http.post("/v1/chat/stream", json=request)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["x-runestone-provider"] == fake_name
    chunks = sse_json(response.text)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == TEXT
    )
    fake = fake_openai if fake_name == "openai" else fake_anthropic
    sent = fake.last().body
    assert sent["stream"] is True
    assert "provider" not in sent
    assert "tenant_id" not in sent


# --- keep-alive after an early answer -----------------------------------------------------------


async def test_keepalive_after_early_rejection(start_gateway: StartGateway) -> None:
    """RFC 9112 §9.6: a server that will close after its response says so (``Connection:
    close``); otherwise it reads and discards the rest of the body and serves the next
    request. Either is fine; closing unannounced is not."""
    body = json.dumps(chat_body("fast")).encode()
    with trio.fail_after(5):
        gateway: Gateway = await start_gateway(env={"RUNESTONE_API_KEYS": GATEWAY_KEY})
        stream = await trio.open_tcp_stream(HOST, gateway.port)
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nhost: test\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        await stream.send_all(head.encode())
        first = await read_until(stream, b'"code":"invalid_api_key"}}')  # before the body
        assert first.startswith(b"HTTP/1.1 401 ")
        if b"\r\nconnection: close\r\n" in first.lower():
            await stream.aclose()
            return
        await stream.send_all(body + b"GET /health/live HTTP/1.1\r\nhost: test\r\n\r\n")
        second = await read_until(stream, b'{"status":"ok"}')
        await stream.aclose()
    assert b"HTTP/1.1 200 " in second
