"""Hostile request bodies, end to end (issue 10, items 7 and 9): raw httpx bodies and the
official SDK against every generation endpoint, live and queued.

Each hostile body must earn a 4xx in OpenAI's envelope, never a 500 or a dropped
connection; and a queued request (tenant ``default`` held at capacity, with ``on_limit =
"queue"`` or ``Prefer: respond-async``) must be refused exactly as a live one is, at once,
instead of being accepted with 202 to fail later. A lone surrogate in a value Runestone only
carries passes through to the provider intact, re-encoded or not. Since the route is decided
before the slot, a reload while a request waits for its slot must route it again.

Test rules: 127.0.0.1 and port 0 only; the capacity is held in-process through the
gateway's own ``Capacity`` (no sleeps); every test under ``trio.fail_after``.
"""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import openai
import pytest
import trio
import trio.testing
from conftest import StartGateway
from e2e_helpers import Gateway, gateway_config, in_thread
from fakes import FakeAnthropic, FakeOpenAI
from openai.types.chat import ChatCompletion

from runestone_proxy.config import TenantConfig

TIMEOUT_S = 15
DEEP = 100_000
#: endpoint path -> a valid body for it (all served by the built-in mock).
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "mock-1", "messages": [{"role": "user", "content": "Hi"}]},
    "/v1/completions": {"model": "mock-1", "prompt": "Hi"},
    "/v1/embeddings": {"model": "mock-embed-1", "input": "Hi"},
    "/v1/chat/stream": {"model": "mock-1", "messages": [{"role": "user", "content": "Hi"}]},
}
PATHS = list(VALID)
#: The field each endpoint requires, where a hostile value goes.
FIELD = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/chat/stream": "messages",
}


def dumps(body: dict[str, Any]) -> bytes:
    return json.dumps(body).encode()


def with_raw(path: str, field: str, value: bytes) -> bytes:
    """The valid body for ``path`` with ``field`` set to the raw JSON text ``value``."""
    rest = {k: v for k, v in VALID[path].items() if k != field}
    return dumps(rest)[:-1] + b', "' + field.encode() + b'": ' + value + b"}"


def hostile(path: str) -> dict[str, tuple[bytes, int, str | None]]:
    """name -> (body, expected status, expected ``param``) for ``path``."""
    field = FIELD[path]
    valid = dumps(VALID[path])
    deep = b"[" * DEEP + b"]" * DEEP
    return {
        "nested 100k arrays": (with_raw(path, field, deep), 400, None),
        "nested 100k objects": (b'{"a":' * DEEP + b"1" + b"}" * DEEP, 400, None),
        "nested 900 (parses, too deep)": (
            with_raw(path, field, b"[" * 900 + b'"x"' + b"]" * 900),
            400,
            None,
        ),
        "invalid utf-8": (valid.replace(b'"Hi"', b'"H\xff\xfei"'), 400, None),
        "top-level array": (b"[" + valid + b"]", 400, None),
        "top-level string": (b'"hello"', 400, None),
        "duplicate model key": (valid[:-1] + b', "model": "gpt-4o-mini"}', 400, "model"),
        "lone surrogate in model": (
            valid.replace(b'"mock-', b'"\\ud800mock-', 1),
            400,
            "model",
        ),
        "NaN": (valid[:-1] + b', "temperature": NaN}', 400, None),
        "trailing data": (valid + b"{}", 400, None),
        "empty body": (b"", 400, None),
        "non-string provider": (valid[:-1] + b', "provider": 5}', 400, "provider"),
        "capabilities not a list": (
            valid[:-1] + b', "capabilities": "chat"}',
            400,
            "capabilities",
        ),
        "max_cost_per_token a string": (
            valid[:-1] + b', "max_cost_per_token": "0.1"}',
            400,
            "max_cost_per_token",
        ),
        "max_tokens a string": (valid[:-1] + b', "max_tokens": "10"}', 400, "max_tokens"),
        "unknown model": (valid.replace(b'"mock-', b'"nope-', 1), 404, "model"),
    }


def assert_envelope(response: httpx.Response, status: int, param: str | None) -> None:
    assert response.status_code == status, response.text[:300]
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param


async def post(http: httpx.AsyncClient, path: str, body: bytes, **headers: str) -> httpx.Response:
    return await http.post(
        path, content=body, headers={"content-type": "application/json", **headers}
    )


# --- live ------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_hostile_bodies_are_4xx_envelopes_live(http: httpx.AsyncClient, path: str) -> None:
    with trio.fail_after(TIMEOUT_S):
        for name, (body, status, param) in hostile(path).items():
            response = await post(http, path, body)
            assert response.status_code == status, (name, response.text[:300])
            assert_envelope(response, status, param)
        # The connection and the gateway are fine afterwards.
        assert (await post(http, path, dumps(VALID[path]))).status_code == 200


async def test_valid_json_under_any_content_type_is_accepted(http: httpx.AsyncClient) -> None:
    """Documented: the Content-Type header is not consulted (curl -d users forget it)."""
    with trio.fail_after(TIMEOUT_S):
        for path in PATHS:
            for content_type in ("text/plain", None, "application/x-www-form-urlencoded"):
                request = http.build_request("POST", path, content=dumps(VALID[path]))
                request.headers.pop("content-type", None)
                if content_type is not None:
                    request.headers["content-type"] = content_type
                response = await http.send(request)
                assert response.status_code == 200, (path, content_type, response.text[:300])


async def test_a_lone_surrogate_in_content_passes_through_intact(
    http: httpx.AsyncClient, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Forwarded as sent (raw bytes), or re-encoded (extras popped, Anthropic translation)
    with the surrogate written back as an escape: never a 500."""
    with trio.fail_after(TIMEOUT_S):
        for model, provider in (
            ("mock-1", "mock"),
            ("gpt-4o-mini", "openai"),
            ("claude-sonnet", "anthropic"),
        ):
            for extras in (b"", b', "model_family": null'):
                for stream in (b"", b', "stream": true'):
                    head = b'{"model": "%b", ' % model.encode()
                    body = head + b'"messages": [{"role": "user", "content": "a\\ud800b"}]'
                    body += extras + stream + b"}"
                    response = await post(http, "/v1/chat/completions", body)
                    assert response.status_code == 200, (body, response.text[:300])
                    assert response.headers["x-runestone-provider"] == provider
                    if provider == "openai":
                        assert fake_openai.last().body["messages"][0]["content"] == "a\ud800b"
                    elif provider == "anthropic":
                        sent = fake_anthropic.last().body["messages"][0]["content"]
                        assert "a\ud800b" in json.dumps(sent, ensure_ascii=False)
    # Embeddings and completions through the mock, too.
    for path, field in (("/v1/embeddings", "input"), ("/v1/completions", "prompt")):
        response = await post(http, path, with_raw(path, field, b'"x\\udfffy"'))
        assert response.status_code == 200, response.text[:300]


def generated_hostile(rng: random.Random) -> bytes:
    """One hostile chat body: deep nesting, a lone surrogate, a duplicate key, or bytes
    spliced in at random."""
    valid = dumps(VALID["/v1/chat/completions"])
    kind = rng.randrange(4)
    if kind == 0:
        depth = rng.choice((129, 500, 990, 5000, DEEP))
        opener, closer = rng.choice(((b"[", b"]"), (b'{"a":', b"}")))
        return valid.replace(b'"Hi"', opener * depth + b"1" + closer * depth)
    if kind == 1:
        escape = rng.choice((b"\\ud800", b"\\udfff", b"\\uDBFF"))
        target = rng.choice((b'"Hi"', b'"user"', b'"mock-1"', b'"messages"'))
        return valid.replace(target, target[:1] + escape + target[1:])
    if kind == 2:
        key = rng.choice((b'"model"', b'"messages"', b'"stream"', b'"provider"'))
        return valid[:-1] + b", " + key + b": " + rng.choice((b"1", b'"x"', b"[]")) + b"}"
    body = bytearray(valid)
    pieces = (b"[", b"]", b"{", b"}", b'"', b"\\", b":", b",", b"\xff", b"\x00", b"\xed\xa0\x80")
    for _ in range(rng.randint(1, 4)):
        at = rng.randrange(len(body) + 1)
        body[at:at] = rng.choice(pieces) * rng.choice((1, 2, 300))
    return bytes(body)


async def test_generated_hostile_bodies_never_get_a_5xx(gateway: Gateway) -> None:
    """A handful of generated hostile bodies (fixed seed), all on one keep-alive connection:
    each is answered (200 when it still means a valid request), never with a 5xx."""
    rng = random.Random(10)
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            for _ in range(40):
                body = generated_hostile(rng)
                response = await post(http, "/v1/chat/completions", body)
                assert response.status_code < 500, (body[:200], response.text[:300])
                if response.status_code != 200:
                    assert_envelope(response, response.status_code, None)


# --- the official SDK ----------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
async def test_the_sdk_gets_bad_request_errors(sdk: openai.OpenAI, path: str) -> None:
    """The SDK sends bytes it is given as they are: every hostile body is a BadRequestError
    (or NotFoundError) carrying the envelope's fields, never an InternalServerError."""
    sdk_path = path.removeprefix("/v1")
    with trio.fail_after(TIMEOUT_S):
        for name, (body, status, param) in hostile(path).items():
            with pytest.raises(openai.APIStatusError) as caught:
                await in_thread(sdk.post, sdk_path, cast_to=ChatCompletion, content=body)
            error = caught.value
            assert error.status_code == status, (name, error)
            assert isinstance(error, openai.BadRequestError | openai.NotFoundError), name
            assert error.type == "invalid_request_error", name
            if param is not None:
                assert error.param == param, name


async def test_the_sdk_create_call_with_deep_content_and_bad_extras(sdk: openai.OpenAI) -> None:
    deep: Any = "x"
    for _ in range(200):
        deep = [deep]
    messages: Any = [{"role": "user", "content": deep}]
    with trio.fail_after(TIMEOUT_S):
        with pytest.raises(openai.BadRequestError, match="nested more than"):
            await in_thread(sdk.chat.completions.create, model="mock-1", messages=messages)
        with pytest.raises(openai.BadRequestError) as caught:
            await in_thread(
                sdk.chat.completions.create,
                model="mock-1",
                messages=[{"role": "user", "content": "Hi"}],
                extra_body={"provider": 5},
            )
        assert caught.value.param == "provider"


# --- queued: the same answers before any 202 ---------------------------------------------


@attrs.frozen
class Queued:
    gateway: Gateway
    headers: dict[str, str]


@pytest.fixture(params=["on_limit=queue", "prefer: respond-async"])
async def queued(
    request: pytest.FixtureRequest,
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    tmp_path: Path,
) -> AsyncIterator[Queued]:
    """A gateway whose tenant ``default`` (no keys: open) has one slot, held for the test."""
    policy = "queue" if request.param == "on_limit=queue" else "wait"
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    config = attrs.evolve(
        base,
        tenants={"default": TenantConfig(max_concurrent=1, on_limit=policy, max_wait_ms=0)},
        overflow=attrs.evolve(base.overflow, database=str(tmp_path / "jobs.sqlite3")),
    )
    gateway = await start_gateway(config)
    headers = {} if policy == "queue" else {"prefer": "respond-async"}
    async with gateway.app.service.capacity.slot("default"):
        yield Queued(gateway, headers)


async def test_queued_hostile_bodies_are_refused_before_any_202(queued: Queued) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=queued.gateway.url, timeout=10) as http:
            for path in PATHS:
                # The slot is held: a valid body is queued (the test's premise).
                accepted = await post(http, path, dumps(VALID[path]), **queued.headers)
                assert accepted.status_code == 202, accepted.text[:300]
                for name, (body, status, param) in hostile(path).items():
                    response = await post(http, path, body, **queued.headers)
                    assert response.status_code == status, (path, name, response.text[:300])
                    assert_envelope(response, status, param)
                # Valid JSON without the header is queued like any other.
                plain = await http.post(
                    path,
                    content=dumps(VALID[path]),
                    headers={"content-type": "text/plain", **queued.headers},
                )
                assert plain.status_code == 202, plain.text[:300]


async def test_queued_sdk_requests_are_refused_before_any_202(queued: Queued) -> None:
    client = openai.OpenAI(
        base_url=f"{queued.gateway.url}/v1",
        api_key="sk-unused",
        max_retries=0,
        timeout=10,
        default_headers=queued.headers,
    )
    try:
        with trio.fail_after(TIMEOUT_S):
            for path in PATHS:
                for name, (body, status, _param) in hostile(path).items():
                    with pytest.raises(openai.APIStatusError) as caught:
                        await in_thread(
                            client.post,
                            path.removeprefix("/v1"),
                            cast_to=ChatCompletion,
                            content=body,
                        )
                    assert caught.value.status_code == status, (path, name)
    finally:
        client.close()


async def test_a_reload_while_a_request_waits_for_its_slot_re_routes_it(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    """The route is decided before the slot (so a bad body is refused at once); a request
    still waiting when a reload removes its provider is routed again in the new table."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    config = attrs.evolve(
        base, tenants={"default": TenantConfig(max_concurrent=1, on_limit="wait", max_wait_ms=1e4)}
    )
    gateway = await start_gateway(config)
    capacity = gateway.app.service.capacity
    answers: list[httpx.Response] = []
    with trio.fail_after(TIMEOUT_S):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:

            async def waiting_request() -> None:
                body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Hi"}]}
                answers.append(await post(http, "/v1/chat/completions", dumps(body)))

            async with trio.open_nursery() as nursery:
                async with capacity.slot("default"):
                    nursery.start_soon(waiting_request)
                    while capacity.snapshot()["tenants"]["default"]["waiting"] == 0:
                        await trio.testing.wait_all_tasks_blocked()
                    # gpt-4o-mini moves to the mock; the openai provider is gone.
                    mock_only = attrs.evolve(
                        config,
                        providers=tuple(p for p in config.providers if p.name != "openai"),
                        models=(
                            *config.models[3:],
                            attrs.evolve(config.models[0], provider="mock"),
                        ),
                        aliases={},
                    )
                    gateway.app.gateway.apply_config(mock_only)
    [answer] = answers
    assert answer.status_code == 200, answer.text[:300]
    assert answer.headers["x-runestone-provider"] == "mock"
