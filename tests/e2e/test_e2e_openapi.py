"""``docs/openapi.yaml`` describes the gateway as built: real answers validate against it.

Each response from the running gateway (over the fake providers, the mock, and a gateway
configured to fail in every documented way) is checked against the operation's documented
response for its status: the status must be documented, the body must validate against the
schema of its media type (for an event stream, every event's JSON payload against the
schema named by ``x-runestone-stream-event``), and every required header must be present and
valid. Request bodies are validated against the documented request schemas too.

All three client dialects are checked: OpenAI's (``data:`` events ended by ``data:
[DONE]``, the ``{"error": ...}`` envelope), Anthropic's Messages (``event: <type>`` frames
whose payload's ``type`` is the event's name and no ``[DONE]``; ``{"type": "error", "error":
...}``) and OpenAI's Responses (named frames as Messages, each payload's ``sequence_number``
counting from 0, ending with the whole Response or an ``error`` event; OpenAI's envelope),
over native providers (the fake Anthropic for Messages, the fake OpenAI for Responses),
translated ones (the fake OpenAI's chat, the fake Anthropic, the mock), and a gateway that
fails or rate-limits. The Responses dialect's stored turns (``previous_response_id``,
``GET`` / ``DELETE /v1/responses/{id}``, ``input_items``) are checked too.

Schemas are JSON Schema 2020-12 (OpenAPI 3.1); ``$ref``s are resolved with a ``referencing``
registry holding the whole document.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import jsonschema
import pytest
import trio
import yaml
from conftest import StartGateway
from e2e_helpers import ANTHROPIC_KEY, GATEWAY_KEY, Gateway, chat_body, gateway_config, sse_data
from fakes import RESPONSE_ID, FakeAnthropic, FakeOpenAI
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runestone_proxy.config import (
    AuthConfig,
    AuthKeyConfig,
    BreakerConfig,
    LimitsConfig,
    ModelConfig,
    ProviderConfig,
    UpstreamConfig,
)
from runestone_proxy.errors import GatewayError

SPEC_PATH = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"
URN = "urn:runestone:openapi"
ENDPOINTS = {
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("post", "/v1/embeddings"),
    ("get", "/v1/models"),
    ("get", "/v1/models/{model}"),
    ("post", "/v1/chat/stream"),
    ("post", "/v1/messages"),
    ("post", "/v1/messages/count_tokens"),
    ("post", "/v1/responses"),
    ("get", "/v1/responses/{response_id}"),
    ("delete", "/v1/responses/{response_id}"),
    ("get", "/v1/responses/{response_id}/input_items"),
    ("get", "/"),
    ("get", "/health"),
    ("get", "/health/live"),
    ("get", "/health/ready"),
}
METHODS = {"get", "post", "put", "patch", "delete", "head", "options"}


@functools.cache
def spec() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text(encoding="utf-8"))
    return loaded


@functools.cache
def registry() -> Registry:
    return Registry().with_resource(URN, Resource.from_contents(spec(), DRAFT202012))


def deref(node: dict[str, Any]) -> dict[str, Any]:
    """Follow a local ``$ref`` (``#/a/b``) to the node it names."""
    while "$ref" in node:
        target: Any = spec()
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part.replace("~1", "/").replace("~0", "~")]
        node = target
    return node


def validate(instance: object, schema: dict[str, Any]) -> None:
    jsonschema.Draft202012Validator(anchored(schema), registry=registry()).validate(instance)


def anchored(node: Any) -> Any:
    """An inline schema of the document with its local ``$ref``s made absolute (they point
    into the document held by the registry, not into the inline schema)."""
    if isinstance(node, dict):
        return {
            key: URN + value if key == "$ref" and value.startswith("#") else anchored(value)
            for key, value in node.items()
        }
    if isinstance(node, list):
        return [anchored(value) for value in node]
    return node


def template_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
    if path.startswith("/v1/responses/"):
        if path.endswith("/input_items"):
            return "/v1/responses/{response_id}/input_items"
        return "/v1/responses/{response_id}"
    return path


def check(response: httpx.Response, sent: object = None) -> None:
    """``response`` (and the JSON body ``sent``) as the document says they are."""
    request = response.request
    path = template_of(request.url.path)
    operation = spec()["paths"][path].get(request.method.lower())
    if operation is None:  # a method the path does not have: 405, as every path answers it
        operation = {"responses": {"405": {"$ref": "#/components/responses/MethodNotAllowed"}}}
    if sent is not None:
        schema = operation["requestBody"]["content"]["application/json"]["schema"]
        validate(sent, schema)
    documented = operation["responses"].get(str(response.status_code))
    assert documented is not None, f"{request.method} {path}: {response.status_code} undocumented"
    documented = deref(documented)
    for name, header in documented.get("headers", {}).items():
        header = deref(header)
        value = response.headers.get(name)
        if header.get("required"):
            assert value is not None, f"{name} missing from {response.status_code} {path}"
        if value is not None:
            validate(value, header["schema"])
    media = response.headers["content-type"].partition(";")[0].strip()
    content = documented["content"].get(media)
    assert content is not None, f"{request.method} {path}: {media} undocumented"
    if media == "application/json":
        validate(response.json(), content["schema"])
    elif media == "text/event-stream" and content["schema"] in (ANTHROPIC_STREAM, RESPONSES_STREAM):
        events = named_events(response.text)
        for name, payload in events:
            validate(payload, content["x-runestone-stream-event"])
            assert payload["type"] == name, (name, payload)
        if content["schema"] == RESPONSES_STREAM:
            numbers = [payload["sequence_number"] for _, payload in events]
            assert numbers == list(range(len(events))), numbers
            assert events[-1][0] in RESPONSES_ENDINGS, events[-1]
    elif media == "text/event-stream":
        payloads = sse_data(response.text)
        assert payloads[-1] == "[DONE]"
        for payload in payloads[:-1]:
            validate(json.loads(payload), content["x-runestone-stream-event"])
    else:
        validate(response.text, content["schema"])


ANTHROPIC_STREAM = {"$ref": "#/components/schemas/AnthropicEventStream"}
RESPONSES_STREAM = {"$ref": "#/components/schemas/ResponsesEventStream"}
#: The events that may end a Responses stream (a native provider's ``response.failed`` is
#: answered as ``error``).
RESPONSES_ENDINGS = {"response.completed", "response.incomplete", "error"}


def named_events(text: str) -> list[tuple[str, Any]]:
    """``(event name, JSON payload)`` of each frame of an Anthropic Messages or OpenAI
    Responses stream. Checks framing: every frame is one ``event:`` line then ``data:`` lines,
    ended by a blank line; no ``[DONE]`` (these streams end with ``message_stop`` or
    ``response.completed`` and the like, or ``error``)."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text[:-2].split("\n\n"):
        head, *lines = block.split("\n")
        assert head.startswith("event: "), block
        assert lines, block
        assert all(line.startswith("data: ") for line in lines), block
        data = "\n".join(line[len("data: ") :] for line in lines)
        assert data != "[DONE]", block
        events.append((head[len("event: ") :], json.loads(data)))
    return events


# --- the document itself ----------------------------------------------------------------------


def test_document_is_valid() -> None:
    document = spec()
    assert document["openapi"].startswith("3.1.")
    for schema in document["components"]["schemas"].values():
        jsonschema.Draft202012Validator.check_schema(schema)

    def refs(node: object) -> list[str]:
        if isinstance(node, dict):
            own = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
            return own + [r for value in node.values() for r in refs(value)]
        if isinstance(node, list):
            return [r for value in node for r in refs(value)]
        return []

    for ref in refs(document):
        assert ref.startswith("#/"), ref
        deref({"$ref": ref})  # every reference resolves


async def test_document_matches_the_routes(gateway: Gateway) -> None:
    documented = {
        (method, path)
        for path, item in spec()["paths"].items()
        for method in item
        if method in METHODS
    }
    assert documented >= ENDPOINTS
    router = gateway.app.gateway.router
    for method, path in documented:
        concrete = re.sub(r"\{[^}]+\}", "example", path)
        try:
            router.resolve(method.upper(), concrete)
        except GatewayError as exc:
            raise AssertionError(f"{method.upper()} {path} is documented but not routed") from exc
        for status, response in spec()["paths"][path][method]["responses"].items():
            assert "x-request-id" in deref(response)["headers"], (path, status)


# --- real answers -----------------------------------------------------------------------------

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
USAGE = {"stream_options": {"include_usage": True}}
GENERATION = [
    ("/v1/chat/completions", chat_body("fast")),
    ("/v1/chat/completions", chat_body("smart", max_tokens=30)),
    ("/v1/chat/completions", chat_body("mock-1", tools=TOOLS)),
    ("/v1/chat/completions", chat_body("openai:tools", tools=TOOLS)),
    ("/v1/chat/completions", chat_body("anthropic:claude-tools", tools=TOOLS)),
    ("/v1/chat/completions", chat_body("anthropic:claude-thinking")),
    ("/v1/chat/completions", chat_body("fast", stream=True, **USAGE)),
    ("/v1/chat/completions", chat_body("smart", stream=True, **USAGE)),
    ("/v1/chat/completions", chat_body("mock-1", stream=True, tools=TOOLS, **USAGE)),
    ("/v1/chat/completions", chat_body("openai:tools", stream=True, tools=TOOLS)),
    ("/v1/chat/completions", chat_body("anthropic:claude-tools", stream=True, tools=TOOLS)),
    ("/v1/chat/completions", chat_body("anthropic:claude-thinking", stream=True)),
    ("/v1/chat/completions", chat_body("openai:cut", stream=True)),
    ("/v1/chat/completions", chat_body("anthropic:claude-overloaded-mid", stream=True)),
    ("/v1/chat/completions", chat_body("mock-1", provider="mock", tenant_id="t", n=1)),
    ("/v1/completions", {"model": "fast", "prompt": "Hi"}),
    ("/v1/completions", {"model": "smart", "prompt": ["Hi"]}),
    ("/v1/completions", {"model": "mock-1", "prompt": "Hi", "stream": True, **USAGE}),
    ("/v1/completions", {"model": "smart", "prompt": "Hi", "stream": True, **USAGE}),
    ("/v1/completions", {"model": "fast", "prompt": "Hi", "stream": True}),
    ("/v1/completions", {"model": "openai:cut", "prompt": "Hi", "stream": True}),
    ("/v1/embeddings", {"model": "text-embedding-3-small", "input": ["a", "b"]}),
    ("/v1/embeddings", {"model": "mock-embed-1", "input": "a", "encoding_format": "base64"}),
    ("/v1/chat/stream", chat_body("gpt-4o-mini", provider="openai", tenant_id="t")),
    ("/v1/chat/stream", chat_body("smart", tenant_id="t")),
]


async def test_generation_answers(http: httpx.AsyncClient) -> None:
    with trio.fail_after(20):
        for path, body in GENERATION:
            response = await http.post(path, json=body)
            assert response.status_code == 200, (path, body, response.text)
            check(response, body)


async def test_models_and_health_answers(http: httpx.AsyncClient) -> None:
    paths = [
        "/v1/models",
        "/v1/models/fast",
        "/v1/models/claude-sonnet",
        "/v1/models/unknown",
        "/health",
        "/health/live",
        "/health/ready",
        "/health/providers",
        "/metrics",
        "/",
    ]
    with trio.fail_after(10):
        for path in paths:
            check(await http.get(path))
            check(await http.get(path, headers={"x-request-id": "my-id"}))
        head = await http.head("/")  # Claude Code's origin probe
        assert head.status_code == 200
        assert head.headers["x-request-id"]


async def test_models_in_anthropic_shape(http: httpx.AsyncClient) -> None:
    """With ``anthropic-version`` the models endpoints answer Anthropic's shapes, and their
    errors (a bad page, an unknown model, a 405) Anthropic's envelope."""
    with trio.fail_after(10):
        listed = await http.get("/v1/models", headers=VERSION)
        check(listed)
        assert listed.json()["data"][0]["type"] == "model"
        page = await http.get("/v1/models", params={"limit": 1}, headers=VERSION)
        check(page)
        assert len(page.json()["data"]) == 1
        assert page.json()["has_more"] is True
        one = await http.get("/v1/models/claude-sonnet", headers=VERSION)
        check(one)
        assert one.json()["id"] == "claude-sonnet"
        for response, status in [
            (await http.get("/v1/models", params={"limit": 0}, headers=VERSION), 400),
            (await http.get("/v1/models/unknown", headers=VERSION), 404),
            (await http.put("/v1/models", headers=VERSION), 405),
            (await http.get("/v1/messages", headers=VERSION), 405),
        ]:
            assert response.status_code == status, response.text
            check(response)
            assert response.json()["type"] == "error"


async def test_error_answers(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    refusing_port: int,
) -> None:
    """Every error status a client can cause or meet, from one gateway set up to fail."""
    dead = ProviderConfig(
        "dead",
        "openai",
        base_url=f"http://127.0.0.1:{refusing_port}/v1",
        api_key_env="FAKE_OPENAI_KEY",
    )
    config = gateway_config(
        fake_openai.base_url,
        fake_anthropic.base_url,
        extra_providers=[dead],
        # Long enough for a busy host to answer every other case; the stalls wait it out.
        upstream=UpstreamConfig(first_byte_timeout_s=1.0),
    )
    config = attrs.evolve(config, limits=LimitsConfig(max_body_bytes=4096))
    auth = {"authorization": f"Bearer {GATEWAY_KEY}"}
    cases: list[tuple[str, str, object, dict[str, str], int]] = [
        ("POST", "/v1/chat/completions", chat_body("fast"), {}, 401),
        ("GET", "/v1/models", None, {"authorization": "Bearer sk-wrong"}, 401),
        ("GET", "/v1/models/fast", None, {}, 401),
        ("GET", "/health", None, {}, 401),
        ("GET", "/health/providers", None, {"authorization": "Bearer sk-wrong"}, 401),
        ("GET", "/metrics", None, {}, 401),
        ("POST", "/v1/chat/completions", b"{oops", auth, 400),
        ("POST", "/v1/chat/completions", {"model": "fast"}, auth, 400),
        ("POST", "/v1/completions", {"model": "smart", "prompt": "x", "echo": True}, auth, 400),
        ("POST", "/v1/embeddings", {"model": "mock-embed-1"}, auth, 400),
        ("POST", "/v1/chat/completions", chat_body("fast", capabilities=["vision"]), auth, 400),
        ("POST", "/v1/chat/completions", chat_body("openai:err-400"), auth, 400),
        ("POST", "/v1/chat/completions", chat_body("openai:err-401"), auth, 401),
        ("POST", "/v1/chat/completions", chat_body("no-such-model"), auth, 404),
        ("POST", "/v1/chat/completions", chat_body("openai:err-404"), auth, 404),
        ("GET", "/v1/models/no-such-model", None, auth, 404),
        ("PUT", "/v1/models", None, auth, 405),
        ("GET", "/v1/chat/completions", None, auth, 405),
        ("POST", "/v1/chat/completions", chat_body("fast", pad="x" * 5000), auth, 413),
        ("POST", "/v1/chat/completions", chat_body("openai:err-500"), auth, 500),
        ("POST", "/v1/completions", {"model": "dead:x", "prompt": "x"}, auth, 502),
        ("POST", "/v1/chat/completions", chat_body("anthropic:claude-err-529"), auth, 503),
        ("POST", "/v1/embeddings", {"model": "openai:stall", "input": "x"}, auth, 504),
        ("POST", "/v1/chat/completions", chat_body("openai:stall", stream=True), auth, 504),
        # Last: a 429 with retry-after pauses its provider, so later requests would wait.
        ("POST", "/v1/chat/completions", chat_body("openai:err-429"), auth, 429),
        ("POST", "/v1/chat/stream", chat_body("anthropic:claude-err-429"), auth, 429),
    ]
    with trio.fail_after(20):
        gateway: Gateway = await start_gateway(config, env={"RUNESTONE_API_KEYS": GATEWAY_KEY})
        # One connection per case: some answers come before the body was read, after which
        # the gateway closes the connection (see test_e2e_wire's keep-alive test).
        async with httpx.AsyncClient(
            base_url=gateway.url, timeout=10, headers={"connection": "close"}
        ) as client:
            for method, path, body, headers, status in cases:
                if isinstance(body, bytes):
                    response = await client.request(method, path, content=body, headers=headers)
                else:
                    response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == status, (method, path, body, response.text)
                # Invalid bodies are the point of some cases: only the answer is checked.
                check(response)
                assert response.json()["error"]["message"]


@pytest.mark.parametrize(
    "body",
    [
        chat_body("fast", some_future_field=1, tenant_id="t", max_cost_per_token=0.1),
        {"model": "fast", "prompt": [1, 2, 3]},
        {"model": "mock-embed-1", "input": ["a"], "dimensions": 8},
    ],
)
def test_request_schemas_accept_real_requests(body: dict[str, Any]) -> None:
    path = {"messages": "/v1/chat/completions", "prompt": "/v1/completions"}
    target = next((p for key, p in path.items() if key in body), "/v1/embeddings")
    operation = spec()["paths"][target]["post"]
    validate(body, operation["requestBody"]["content"]["application/json"]["schema"])
    with pytest.raises(jsonschema.ValidationError):
        validate(
            {**body, "model": ""}, operation["requestBody"]["content"]["application/json"]["schema"]
        )


# --- the Anthropic Messages dialect ---------------------------------------------------------

ANTHROPIC_TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
VERSION = {"anthropic-version": "2023-06-01"}


def message_body(model: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": model,
        "max_tokens": 64,
        "messages": [{"role": "user", "content": "Hi there"}],
        **fields,
    }


#: (body, native): native answers come from the fake Anthropic as it wrote them; the others
#: are translated from the fake OpenAI's or the mock's chat answers.
MESSAGES = [
    (message_body("anthropic:claude-tools", tools=ANTHROPIC_TOOLS), True),
    (message_body("anthropic:claude-thinking"), True),
    (message_body("claude-sonnet", system="Be brief."), True),
    (message_body("fast"), False),
    (message_body("openai:tools", tools=ANTHROPIC_TOOLS), False),
    (message_body("mock-1"), False),
    (message_body("mock-1", tools=ANTHROPIC_TOOLS), False),
]


async def test_messages_answers(http: httpx.AsyncClient) -> None:
    """Whole and streamed Messages, native and translated, as documented; the stream's
    frames in order, each named by its payload's type."""
    with trio.fail_after(20):
        for body, native in MESSAGES:
            for stream in (False, True):
                sent = {**body, "stream": True} if stream else body
                response = await http.post("/v1/messages", json=sent, headers=VERSION)
                assert response.status_code == 200, (sent, response.text)
                check(response, sent)
                if not stream:
                    assert response.json()["type"] == "message"
                    continue
                names = [name for name, _ in named_events(response.text)]
                assert names[0] == "message_start", names
                assert names[-2:] == ["message_delta", "message_stop"], names
                # The fake Anthropic pings once; a translated stream this quick has no silence.
                assert ("ping" in names) is native, names


async def test_messages_stream_ends_with_an_error_event(http: httpx.AsyncClient) -> None:
    """A failure after the stream started: one documented ``event: error`` frame ends it."""
    with trio.fail_after(20):
        for model in ("anthropic:claude-overloaded-mid", "openai:mid-500"):
            sent = message_body(model, stream=True)
            response = await http.post("/v1/messages", json=sent, headers=VERSION)
            assert response.status_code == 200, (model, response.text)
            check(response, sent)
            events = named_events(response.text)
            assert events[0][0] == "message_start", events
            assert events[-1][0] == "error", events
            assert [name for name, _ in events].count("error") == 1, events


async def test_count_tokens_answers(http: httpx.AsyncClient, fake_anthropic: FakeAnthropic) -> None:
    """count_tokens on each kind of provider: the translated ones are the gateway's estimate
    (and say so); an Anthropic provider counts itself, once the fake serves the path."""
    body = message_body("fast", system="Be brief.", tools=ANTHROPIC_TOOLS)
    del body["max_tokens"]  # count_tokens takes no max_tokens
    with trio.fail_after(20):
        for model in ("fast", "mock-1"):
            sent = {**body, "model": model}
            response = await http.post("/v1/messages/count_tokens", json=sent, headers=VERSION)
            assert response.status_code == 200, (model, response.text)
            check(response, sent)
            assert response.headers["x-runestone-token-count"] == "estimate; method=chars/4"
            assert response.json()["input_tokens"] > 0
        async with httpx.AsyncClient(timeout=10) as direct:
            probe = await direct.post(
                f"{fake_anthropic.base_url}/messages/count_tokens",
                json={**body, "model": "claude-sonnet"},
                headers={**VERSION, "x-api-key": ANTHROPIC_KEY},
            )
        sent = {**body, "model": "claude-sonnet"}
        response = await http.post("/v1/messages/count_tokens", json=sent, headers=VERSION)
        check(response, sent)  # documented whatever it is (404 while the fake lacks the path)
        if probe.status_code == 200:
            assert response.status_code == 200, response.text
            assert "x-runestone-token-count" not in response.headers
            assert response.json() == probe.json()


#: The provider's ``retry-after`` reaches the client (the fakes' values).
RETRY_AFTER = {
    "anthropic:claude-error-overloaded_error": "3",
    "openai:err-503": "1",
    "openai:err-429": "7",
    "anthropic:claude-err-429": "9",
}


async def test_messages_error_answers(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    refusing_port: int,
) -> None:
    """Every error status a Messages client can cause or meet, in Anthropic's envelope (but
    for what the connection answers before any route is chosen: OpenAI's)."""
    dead = ProviderConfig(
        "dead",
        "openai",
        base_url=f"http://127.0.0.1:{refusing_port}/v1",
        api_key_env="FAKE_OPENAI_KEY",
    )
    config = gateway_config(
        fake_openai.base_url,
        fake_anthropic.base_url,
        extra_providers=[dead],
        # Long enough for a busy host to answer every other case; the stalls wait it out.
        upstream=UpstreamConfig(first_byte_timeout_s=1.0),
    )
    # Many provider failures in a row: keep the breakers closed, or the last cases would wait.
    routing = attrs.evolve(config.routing, breaker=BreakerConfig(failure_threshold=100))
    config = attrs.evolve(config, limits=LimitsConfig(max_body_bytes=4096), routing=routing)
    auth = {"x-api-key": GATEWAY_KEY, **VERSION}
    bearer = {"authorization": f"Bearer {GATEWAY_KEY}", **VERSION}
    no_max = {k: v for k, v in message_body("fast").items() if k != "max_tokens"}
    msgs, count = "/v1/messages", "/v1/messages/count_tokens"
    stream = {"stream": True}
    # Answered by the connection before any route is chosen: OpenAI's envelope.
    early: list[tuple[str, str, object, dict[str, str], int]] = [
        ("POST", msgs, message_body("fast", pad="x" * 5000), auth, 413),
    ]
    cases: list[tuple[str, str, object, dict[str, str], int]] = [
        ("POST", msgs, message_body("fast"), VERSION, 401),
        ("POST", msgs, message_body("fast"), {"x-api-key": "sk-wrong", **VERSION}, 401),
        ("POST", count, no_max, VERSION, 401),
        ("POST", msgs, b"{oops", auth, 400),
        ("POST", msgs, no_max, auth, 400),
        ("POST", msgs, message_body("fast", messages=[]), bearer, 400),
        ("POST", count, {"model": "fast"}, auth, 400),
        ("POST", msgs, message_body("anthropic:claude-error-invalid_request_error"), auth, 400),
        ("POST", msgs, message_body("openai:err-400"), auth, 400),
        ("POST", msgs, message_body("anthropic:claude-error-billing_error"), auth, 402),
        ("POST", msgs, message_body("anthropic:claude-error-permission_error"), auth, 403),
        ("POST", msgs, message_body("openai:err-403"), auth, 403),
        ("POST", msgs, message_body("no-such-model"), auth, 404),
        ("POST", count, {**no_max, "model": "no-such-model"}, auth, 404),
        ("POST", msgs, message_body("openai:err-404"), auth, 404),
        ("GET", msgs, None, auth, 405),
        ("POST", msgs, message_body("anthropic:claude-error-conflict_error"), auth, 409),
        ("POST", msgs, message_body("anthropic:claude-error-request_too_large"), auth, 413),
        ("POST", msgs, message_body("anthropic:claude-error-api_error"), auth, 500),
        ("POST", msgs, message_body("openai:err-500"), auth, 500),
        ("POST", msgs, message_body("dead:x"), auth, 500),
        ("POST", msgs, message_body("anthropic:claude-error-timeout_error"), auth, 504),
        ("POST", msgs, message_body("openai:stall", **stream), auth, 504),
        ("POST", msgs, message_body("anthropic:claude-error-overloaded_error"), auth, 529),
        ("POST", msgs, message_body("anthropic:claude-err-529"), auth, 529),
        (
            "POST",
            msgs,
            message_body("anthropic:claude-error-overloaded_error-first", **stream),
            auth,
            529,
        ),
        ("POST", msgs, message_body("openai:err-503"), auth, 529),
        # Last: a 429 with retry-after pauses its provider, so later requests would wait.
        ("POST", msgs, message_body("openai:err-429"), auth, 429),
        ("POST", msgs, message_body("anthropic:claude-err-429", **stream), auth, 429),
    ]
    with trio.fail_after(20):
        gateway: Gateway = await start_gateway(config, env={"RUNESTONE_API_KEYS": GATEWAY_KEY})
        async with httpx.AsyncClient(
            base_url=gateway.url, timeout=10, headers={"connection": "close"}
        ) as client:
            for method, path, body, headers, status in [*early, *cases]:
                if isinstance(body, bytes):
                    response = await client.request(method, path, content=body, headers=headers)
                else:
                    response = await client.request(method, path, json=body, headers=headers)
                assert response.status_code == status, (method, path, body, response.text)
                check(response)
                answer = response.json()
                assert answer["error"]["message"]
                if (method, path, body, headers, status) in cases:
                    assert answer["type"] == "error", (body, answer)
                if isinstance(body, dict) and body["model"] in RETRY_AFTER:
                    assert response.headers["retry-after"] == RETRY_AFTER[body["model"]], body


async def test_messages_rate_limit_headers(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """A rate-limited key sees its limits in both names, resets in Anthropic's as RFC 3339
    times, on answers (whole and streamed) and on the gateway's own 429; count_tokens is not
    charged."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    key = AuthKeyConfig(key_env="LIMITED_KEY", rpm=2)
    config = attrs.evolve(base, auth=AuthConfig(keys=(key,)))
    auth = {"x-api-key": GATEWAY_KEY, **VERSION}
    names = ("limit", "remaining", "reset")
    with trio.fail_after(20):
        gateway: Gateway = await start_gateway(config, env={"LIMITED_KEY": GATEWAY_KEY})
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            counted = await client.post(
                "/v1/messages/count_tokens", json={**message_body("mock-1")}, headers=auth
            )
            assert counted.status_code == 200, counted.text
            check(counted)
            for status, stream in ((200, False), (200, True), (429, False)):
                sent = message_body("mock-1", stream=stream)
                response = await client.post("/v1/messages", json=sent, headers=auth)
                assert response.status_code == status, response.text
                check(response, sent)
                for name in names:
                    assert f"anthropic-ratelimit-requests-{name}" in response.headers, name
                    assert f"x-ratelimit-{name}-requests" in response.headers, name
            assert response.json()["error"]["type"] == "rate_limit_error"
            assert response.headers["retry-after"].isdigit()
            assert response.headers["anthropic-ratelimit-requests-remaining"] == "0"


@pytest.mark.parametrize(
    "body",
    [
        message_body(
            "claude-sonnet",
            system=[{"type": "text", "text": "Be brief.", "cache_control": {"type": "ephemeral"}}],
            tools=ANTHROPIC_TOOLS,
            thinking={"type": "enabled", "budget_tokens": 1024},
            metadata={"user_id": "u-1"},
            some_future_field=1,
            tenant_id="t",
        ),
        message_body(
            "fast",
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"}
                    ],
                },
            ],
            stream=True,
        ),
    ],
)
def test_message_schemas_accept_real_requests(body: dict[str, Any]) -> None:
    def schema(path: str) -> dict[str, Any]:
        content = spec()["paths"][path]["post"]["requestBody"]["content"]
        return content["application/json"]["schema"]  # type: ignore[no-any-return]

    validate(body, schema("/v1/messages"))
    counted = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
    validate(counted, schema("/v1/messages/count_tokens"))
    for broken in (counted, {**body, "model": ""}, {**body, "messages": []}):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken, schema("/v1/messages"))


# --- the OpenAI Responses dialect -----------------------------------------------------------

RESPONSES_TOOLS = [
    {
        "type": "function",
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
HOSTED_TOOLS = [{"type": "web_search"}]
#: A translated id: ``resp_`` and 24 hex digits, made by the gateway (the fake OpenAI's own
#: Responses answers all carry ``fakes.RESPONSE_ID``).
TRANSLATED_ID = re.compile(r"^resp_[0-9a-f]{24}$")


def response_body(model: str, **fields: Any) -> dict[str, Any]:
    return {"model": model, "input": "Hi there", **fields}


def chat_only(fake_openai: FakeOpenAI) -> ProviderConfig:
    """The fake OpenAI as an OpenAI-compatible server without the Responses API."""
    return ProviderConfig(
        "chatonly",
        "openai",
        base_url=fake_openai.base_url,
        api_key_env="FAKE_OPENAI_KEY",
        responses_api=False,
    )


@pytest.fixture
async def responses_http(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> AsyncIterator[httpx.AsyncClient]:
    """A client of a gateway that also has ``chatonly`` (with a model, ``chat-model``)."""
    base = gateway_config(
        fake_openai.base_url, fake_anthropic.base_url, extra_providers=[chat_only(fake_openai)]
    )
    config = attrs.evolve(base, models=(*base.models, ModelConfig("chat-model", "chatonly")))
    gateway = await start_gateway(config)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
        yield client


#: (body, the provider that answers, native): native answers are the fake OpenAI's own
#: Responses; the others are translated from chat (the fake OpenAI's chat API behind
#: ``chatonly``, the fake Anthropic through its chat translator, the mock).
RESPONSES = [
    (response_body("fast"), "openai", True),
    (response_body("openai:tools", tools=RESPONSES_TOOLS), "openai", True),
    (response_body("openai:reasoner", reasoning={"effort": "low"}), "openai", True),
    (response_body("openai:gpt-4o-mini", tools=HOSTED_TOOLS), "openai", True),
    (response_body("claude-sonnet", instructions="Be brief."), "anthropic", False),
    (response_body("anthropic:claude-tools", tools=RESPONSES_TOOLS), "anthropic", False),
    (response_body("anthropic:claude-thinking"), "anthropic", False),
    (response_body("mock-1"), "mock", False),
    (response_body("mock-1", tools=RESPONSES_TOOLS, tool_choice="required"), "mock", False),
    (response_body("chat-model", max_output_tokens=32), "chatonly", False),
    (response_body("chatonly:tools", tools=RESPONSES_TOOLS), "chatonly", False),
    (response_body("chatonly:reasoner"), "chatonly", False),
]


async def test_responses_answers(responses_http: httpx.AsyncClient) -> None:
    """Whole and streamed Responses, native and translated, as documented: the stream's
    frames named by their payload's type, numbered from 0, opened by response.created and
    response.in_progress and closed by response.completed carrying the whole Response."""
    with trio.fail_after(30):
        for body, provider, native in RESPONSES:
            for stream in (False, True):
                sent = {**body, "stream": True} if stream else body
                response = await responses_http.post("/v1/responses", json=sent)
                assert response.status_code == 200, (sent, response.text)
                check(response, sent)
                assert response.headers["x-runestone-provider"] == provider, sent
                if stream:
                    events = named_events(response.text)
                    names = [name for name, _ in events]
                    assert names[:2] == ["response.created", "response.in_progress"], names
                    assert names[-1] == "response.completed", names
                    answer = events[-1][1]["response"]
                else:
                    answer = response.json()
                assert answer["status"] == "completed", answer
                assert (answer["id"] == RESPONSE_ID) is native, answer["id"]
                assert native or TRANSLATED_ID.match(answer["id"]), answer["id"]
                kinds = [item["type"] for item in answer["output"]]
                if "tools" in body["model"]:
                    assert kinds[-1] == "function_call", kinds
                if "reasoner" in body["model"] or "thinking" in body["model"]:
                    assert kinds[0] == "reasoning", kinds


async def test_responses_state_answers(
    responses_http: httpx.AsyncClient, fake_openai: FakeOpenAI
) -> None:
    """A conversation across providers through ``previous_response_id``, then its stored
    turns read, paged and deleted, each answer as documented."""
    client = responses_http
    with trio.fail_after(30):
        sent = response_body("mock-1", input="My name is Ada.", instructions="Be brief.")
        first = await client.post("/v1/responses", json=sent)
        check(first, sent)
        first_id = first.json()["id"]

        # Translated (chat-only) follow-up: the whole history reaches the chat server, the
        # first turn's instructions do not.
        sent = response_body("chat-model", input="My name?", previous_response_id=first_id)
        second = await client.post("/v1/responses", json=sent)
        assert second.status_code == 200, second.text
        check(second, sent)
        second_id = second.json()["id"]
        chat = fake_openai.last()
        assert chat.path == "/v1/chat/completions"
        roles = [m["role"] for m in chat.body["messages"]]
        assert roles == ["user", "assistant", "user"], chat.body["messages"]

        # Native streamed follow-up: the fake OpenAI is sent the expanded input, no id.
        sent = response_body(
            "fast", input="And again?", previous_response_id=second_id, stream=True
        )
        third = await client.post("/v1/responses", json=sent)
        assert third.status_code == 200, third.text
        check(third, sent)
        native = fake_openai.last()
        assert native.path == "/v1/responses"
        assert "previous_response_id" not in native.body
        assert len(native.body["input"]) == 5, native.body["input"]

        got = await client.get(f"/v1/responses/{second_id}")
        assert got.status_code == 200, got.text
        check(got)
        assert got.json()["output"] == second.json()["output"]

        listed = await client.get(f"/v1/responses/{second_id}/input_items")
        check(listed)
        newest_first = listed.json()["data"]
        assert [item["role"] for item in newest_first] == ["user", "assistant", "user"]
        assert newest_first[0]["content"][0]["text"] == "My name?"
        page = await client.get(
            f"/v1/responses/{second_id}/input_items", params={"order": "asc", "limit": 2}
        )
        check(page)
        assert page.json()["has_more"] is True
        rest = await client.get(
            f"/v1/responses/{second_id}/input_items",
            params={"order": "asc", "after": page.json()["last_id"]},
        )
        check(rest)
        assert [item["id"] for item in rest.json()["data"]] == [newest_first[0]["id"]]

        deleted = await client.delete(f"/v1/responses/{first_id}")
        assert deleted.status_code == 200, deleted.text
        check(deleted)
        assert deleted.json() == {"id": first_id, "object": "response.deleted", "deleted": True}
        for response in (
            await client.get(f"/v1/responses/{first_id}"),
            await client.delete(f"/v1/responses/{first_id}"),
            await client.get(f"/v1/responses/{first_id}/input_items"),
        ):
            assert response.status_code == 404, response.text
            check(response)

        sent = response_body("mock-1", store=False)
        unstored = await client.post("/v1/responses", json=sent)
        check(unstored, sent)
        gone = await client.get(f"/v1/responses/{unstored.json()['id']}")
        assert gone.status_code == 404, gone.text
        check(gone)


async def test_responses_stream_ends_with_an_error_event(
    responses_http: httpx.AsyncClient,
) -> None:
    """A failure after the stream started, native (the fake's response.failed) or
    translated (a chat error event): one documented ``error`` event ends it, numbered next."""
    with trio.fail_after(20):
        for model, code in (("openai:resp-fail-mid", "server_error"), ("chatonly:mid-500", None)):
            sent = response_body(model, stream=True)
            response = await responses_http.post("/v1/responses", json=sent)
            assert response.status_code == 200, (model, response.text)
            check(response, sent)
            events = named_events(response.text)
            assert events[0][0] == "response.created", events
            assert events[-1][0] == "error", events
            assert [name for name, _ in events].count("error") == 1, events
            assert code is None or events[-1][1]["code"] == code, events[-1]


async def test_responses_error_answers(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Every error a Responses client can cause or meet, in OpenAI's envelope: the gateway's
    own (auth, bad bodies, an unknown model or previous response, a hosted tool where it
    cannot run, paging), a provider's (relayed with its status, param and code) and 405."""
    config = gateway_config(
        fake_openai.base_url, fake_anthropic.base_url, extra_providers=[chat_only(fake_openai)]
    )
    routing = attrs.evolve(config.routing, breaker=BreakerConfig(failure_threshold=100))
    config = attrs.evolve(config, routing=routing)
    auth = {"authorization": f"Bearer {GATEWAY_KEY}"}
    path, one, items = "/v1/responses", "/v1/responses/resp_unknown", "/v1/responses/{}/input_items"
    hosted_choice = {"tool_choice": {"type": "web_search"}, "tools": RESPONSES_TOOLS}
    # (method, path, body, headers, status, the error's param, its code)
    cases: list[tuple[str, str, object, dict[str, str], int, str | None, str | None]] = [
        ("POST", path, response_body("mock-1"), {}, 401, None, "invalid_api_key"),
        ("GET", one, None, {}, 401, None, "invalid_api_key"),
        ("DELETE", one, None, {}, 401, None, "invalid_api_key"),
        ("GET", items.format("resp_unknown"), None, {}, 401, None, "invalid_api_key"),
        ("POST", path, b"{oops", auth, 400, None, "invalid_json"),
        ("POST", path, {"model": "mock-1"}, auth, 400, "input", "missing_required_parameter"),
        ("POST", path, response_body("mock-1", input=3), auth, 400, "input", None),
        ("POST", path, response_body("mock-1", tools=HOSTED_TOOLS), auth, 400, "tools[0]", None),
        (
            "POST",
            path,
            response_body("claude-sonnet", **hosted_choice),
            auth,
            400,
            "tool_choice",
            None,
        ),
        ("POST", path, response_body("chat-x", tools=HOSTED_TOOLS), auth, 404, "model", None),
        ("POST", path, response_body("openai:resp-error"), auth, 400, "temperature", None),
        (
            "POST",
            path,
            response_body("openai:resp-error", stream=True),
            auth,
            400,
            "temperature",
            "unsupported_parameter",
        ),
        (
            "POST",
            path,
            response_body("mock-1", previous_response_id="resp_unknown"),
            auth,
            404,
            "previous_response_id",
            "previous_response_not_found",
        ),
        ("GET", one, None, auth, 404, None, None),
        ("DELETE", one, None, auth, 404, None, None),
        ("GET", items.format("resp_unknown"), None, auth, 404, None, None),
        ("PUT", path, None, auth, 405, None, "method_not_allowed"),
        ("POST", one, None, auth, 405, None, "method_not_allowed"),
        ("POST", path, response_body("openai:err-500"), auth, 500, None, None),
        ("POST", path, response_body("chatonly:err-503"), auth, 503, None, None),
        ("POST", path, response_body("openai:err-429"), auth, 429, None, None),
    ]
    with trio.fail_after(20):
        gateway: Gateway = await start_gateway(config, env={"RUNESTONE_API_KEYS": GATEWAY_KEY})
        async with httpx.AsyncClient(
            base_url=gateway.url, timeout=10, headers={"connection": "close"}
        ) as client:
            stored = await client.post("/v1/responses", json=response_body("mock-1"), headers=auth)
            assert stored.status_code == 200, stored.text
            paging = items.format(stored.json()["id"])
            cases[-3:-3] = [
                ("GET", f"{paging}?limit=0", None, auth, 400, "limit", None),
                ("GET", f"{paging}?order=sideways", None, auth, 400, "order", None),
                ("GET", f"{paging}?after=msg_nope", None, auth, 400, "after", None),
            ]
            for method, target, body, headers, status, param, code in cases:
                if body is None or isinstance(body, bytes):
                    response = await client.request(method, target, content=body, headers=headers)
                else:
                    response = await client.request(method, target, json=body, headers=headers)
                assert response.status_code == status, (method, target, body, response.text)
                check(response)
                error = response.json()["error"]
                assert error["message"], error
                assert error["param"] == param, (target, body, error)
                assert code is None or error["code"] == code, (target, body, error)


@pytest.mark.parametrize(
    "body",
    [
        response_body(
            "fast",
            instructions="Be brief.",
            tools=RESPONSES_TOOLS,
            tool_choice={"type": "function", "name": "get_weather"},
            reasoning={"effort": "high", "summary": "auto"},
            text={"format": {"type": "json_object"}},
            store=False,
            metadata={"k": "v"},
            some_future_field=1,
            tenant_id="t",
        ),
        response_body(
            "mock-1",
            input=[
                {"role": "user", "content": "Weather?"},
                {
                    "type": "function_call",
                    "call_id": "call_1",
                    "name": "get_weather",
                    "arguments": "{}",
                },
                {"type": "function_call_output", "call_id": "call_1", "output": "Sunny"},
            ],
            previous_response_id="resp_0123456789abcdef01234567",
            stream=True,
        ),
    ],
)
def test_response_schemas_accept_real_requests(body: dict[str, Any]) -> None:
    schema = spec()["paths"]["/v1/responses"]["post"]["requestBody"]["content"]
    schema = schema["application/json"]["schema"]
    validate(body, schema)
    without_input = {k: v for k, v in body.items() if k != "input"}
    for broken in (without_input, {**body, "model": ""}, {**body, "input": 3}):
        with pytest.raises(jsonschema.ValidationError):
            validate(broken, schema)
