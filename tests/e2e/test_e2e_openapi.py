"""``docs/openapi.yaml`` describes the gateway as built: real answers validate against it.

Each response from the running gateway (over the fake providers, the mock, and a gateway
configured to fail in every documented way) is checked against the operation's documented
response for its status: the status must be documented, the body must validate against the
schema of its media type (for an event stream, every event's JSON payload against the
schema named by ``x-runestone-stream-event``), and every required header must be present and
valid. Request bodies are validated against the documented request schemas too.

Schemas are JSON Schema 2020-12 (OpenAPI 3.1); ``$ref``s are resolved with a ``referencing``
registry holding the whole document.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path
from typing import Any

import attrs
import httpx
import jsonschema
import pytest
import trio
import yaml
from conftest import StartGateway
from e2e_helpers import GATEWAY_KEY, Gateway, chat_body, gateway_config, sse_data
from fakes import FakeAnthropic, FakeOpenAI
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from runestone_proxy.config import LimitsConfig, ProviderConfig, UpstreamConfig
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
    if "$ref" in schema:
        schema = {"$ref": URN + schema["$ref"]}
    jsonschema.Draft202012Validator(schema, registry=registry()).validate(instance)


def template_of(path: str) -> str:
    if path.startswith("/v1/models/"):
        return "/v1/models/{model}"
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
    elif media == "text/event-stream":
        payloads = sse_data(response.text)
        assert payloads[-1] == "[DONE]"
        for payload in payloads[:-1]:
            validate(json.loads(payload), content["x-runestone-stream-event"])
    else:
        validate(response.text, content["schema"])


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
    ]
    with trio.fail_after(10):
        for path in paths:
            check(await http.get(path))
            check(await http.get(path, headers={"x-request-id": "my-id"}))


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
        upstream=UpstreamConfig(first_byte_timeout_s=0.2),
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
