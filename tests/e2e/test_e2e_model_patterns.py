"""Model-name patterns, the Anthropic-shaped model list and the origin probe, end to end.

Through real sockets: the official ``openai`` SDK sends dated Claude ids and names no
provider claims exactly, and the fakes record what reached them; the official
``anthropic`` SDK lists and retrieves models as Claude Code's SDK does; a raw socket sends
``HEAD /`` as Claude Code does before it starts.

Test rules (e2e_helpers.py): 127.0.0.1, port 0, every body under ``trio.fail_after``, SDKs'
sync clients in a worker thread.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import anthropic
import attrs
import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import GATEWAY_KEY, HOST, Gateway, gateway_config, in_thread, read_until
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.config import Config, ProviderConfig

PROMPT = [{"role": "user", "content": "Hi"}]
SONNET = "claude-sonnet-4-5-20250929"
HAIKU = "claude-haiku-4-5-20251001"
OPUS = "claude-opus-4-1-20250805"


def patterns_config(openai_url: str, anthropic_url: str) -> Config:
    """The e2e gateway, with anthropic claiming ``claude-*``, a ``local`` OpenAI-compatible
    provider (the OpenAI fake) claiming ``local-*``, and every Haiku sent to it."""
    base = gateway_config(openai_url, anthropic_url)
    local = ProviderConfig(
        "local",
        "openai",
        base_url=openai_url,
        api_key_env="FAKE_OPENAI_KEY",
        model_patterns=("local-*",),
    )
    providers = tuple(
        attrs.evolve(p, model_patterns=("claude-*",)) if p.name == "anthropic" else p
        for p in base.providers
    )
    return attrs.evolve(
        base,
        providers=(*providers, local),
        aliases={**base.aliases, "claude-*haiku*": "local:qwen3-coder"},
    )


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> Gateway:
    config = patterns_config(fake_openai.base_url, fake_anthropic.base_url)
    return await start_gateway(config, env={"RUNESTONE_API_KEYS": GATEWAY_KEY})


@pytest.fixture
def sdk(gateway: Gateway) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=GATEWAY_KEY, max_retries=0, timeout=10
    )
    yield client
    client.close()


@pytest.fixture
def claude(gateway: Gateway) -> Iterator[anthropic.Anthropic]:
    """The Anthropic SDK as Claude Code configures it: ``ANTHROPIC_BASE_URL`` is the origin."""
    client = anthropic.Anthropic(
        base_url=gateway.url, api_key=GATEWAY_KEY, max_retries=0, timeout=10
    )
    yield client
    client.close()


async def chat(sdk: openai.OpenAI, model: str) -> tuple[str | None, str | None]:
    """(x-runestone-provider, the answer's text) for one chat request."""

    def run() -> tuple[str | None, str | None]:
        raw = sdk.chat.completions.with_raw_response.create(model=model, messages=PROMPT)
        return raw.headers.get("x-runestone-provider"), raw.parse().choices[0].message.content

    return await in_thread(run)


# --- routing by pattern -------------------------------------------------------------------------


async def test_a_provider_pattern_reaches_an_openai_compatible_provider(
    sdk: openai.OpenAI, fake_openai: FakeOpenAI
) -> None:
    with trio.fail_after(10):
        provider, text = await chat(sdk, "local-llama-3.3-70b")
    assert provider == "local"
    assert text
    assert fake_openai.last().path == "/v1/chat/completions"
    assert fake_openai.last().body["model"] == "local-llama-3.3-70b"  # as given


async def test_dated_claude_ids_reach_anthropic_as_given(
    sdk: openai.OpenAI, fake_anthropic: FakeAnthropic
) -> None:
    with trio.fail_after(10):
        for model in (SONNET, OPUS):
            provider, _ = await chat(sdk, model)
            assert provider == "anthropic"
            assert fake_anthropic.last().body["model"] == model


async def test_an_alias_pattern_sends_every_haiku_elsewhere(
    sdk: openai.OpenAI, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    with trio.fail_after(10):
        provider, _ = await chat(sdk, HAIKU)
    assert provider == "local"
    assert fake_openai.last().body["model"] == "qwen3-coder"
    assert not fake_anthropic.requests


async def test_exact_names_still_win(sdk: openai.OpenAI, fake_anthropic: FakeAnthropic) -> None:
    with trio.fail_after(10):
        provider, _ = await chat(sdk, "claude-sonnet")  # a [[models]] id inside claude-*
    assert provider == "anthropic"
    assert fake_anthropic.last().body["model"] == SONNET  # its upstream_id


async def test_an_unavailable_claimant_is_404_saying_why(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    config = patterns_config(fake_openai.base_url, fake_anthropic.base_url)
    with trio.fail_after(10):
        gateway = await start_gateway(config, env={"FAKE_ANTHROPIC_KEY": ""})
        client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key="x", max_retries=0)
        with client, pytest.raises(openai.NotFoundError) as info:
            await in_thread(client.chat.completions.create, model=SONNET, messages=PROMPT)
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "model_not_found"
    assert "anthropic: FAKE_ANTHROPIC_KEY is not set" in error["message"]


# --- /v1/models in both dialects ----------------------------------------------------------------


async def test_openai_sdk_lists_models_in_openai_shape(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        page = await in_thread(sdk.models.list)
        fast = await in_thread(sdk.models.retrieve, "fast")
    ids = [m.id for m in page.data]
    assert {"gpt-4o-mini", "claude-sonnet", "fast"} <= set(ids)
    assert not any("*" in mid for mid in ids)  # patterns are not listed
    assert page.data[0].object == "model"
    assert (fast.id, fast.owned_by) == ("fast", "runestone")


async def test_anthropic_sdk_lists_and_retrieves_models(claude: anthropic.Anthropic) -> None:
    with trio.fail_after(10):
        listed = await in_thread(lambda: list(claude.models.list()))
        # limit=2 pages: the SDK follows has_more / last_id to the end.
        paged = await in_thread(lambda: list(claude.models.list(limit=2)))
        first = await in_thread(lambda: claude.models.list(limit=2))
        sonnet = await in_thread(claude.models.retrieve, "claude-sonnet")
        dated = await in_thread(claude.models.retrieve, OPUS)
        with pytest.raises(anthropic.NotFoundError):
            await in_thread(claude.models.retrieve, "no-such-model")
    ids = [m.id for m in listed]
    assert {"gpt-4o-mini", "claude-sonnet", "mock-1", "fast", "smart"} <= set(ids)
    assert [m.id for m in paged] == ids
    assert (first.has_more, first.first_id, first.last_id) == (True, ids[0], ids[1])
    for model in (*listed, sonnet, dated):
        assert model.type == "model"
        assert model.display_name == model.id
        assert model.created_at.year == 1970
    assert sonnet.id == "claude-sonnet"
    assert dated.id == OPUS  # claimed by a pattern: retrievable, though not listed


async def test_anthropic_list_shape_on_the_wire(gateway: Gateway) -> None:
    headers = {"x-api-key": GATEWAY_KEY, "anthropic-version": "2023-06-01"}
    with trio.fail_after(10):
        status, _, body = await raw(gateway.port, "GET", "/v1/models?limit=1", headers)
        _, _, bad = await raw(gateway.port, "GET", "/v1/models?limit=0", headers)
    assert status == 200
    page = json.loads(body)
    assert set(page) == {"data", "has_more", "first_id", "last_id"}
    assert page["has_more"] is True
    (item,) = page["data"]
    assert item == {
        "type": "model",
        "id": page["first_id"],
        "display_name": page["first_id"],
        "created_at": "1970-01-01T00:00:00Z",
        "lifecycle": "active",
    }
    # An Anthropic client's error comes in Anthropic's envelope (it sent anthropic-version).
    error = json.loads(bad)
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert "limit" in error["error"]["message"]


# --- the origin probe ---------------------------------------------------------------------------


async def raw(
    port: int, method: str, path: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """One request on its own connection (closed after): status, headers, body."""
    stream = await trio.open_tcp_stream(HOST, port)
    async with stream:
        lines = [f"{method} {path} HTTP/1.1", f"host: {HOST}", "connection: close"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        await stream.send_all(("\r\n".join(lines) + "\r\n\r\n").encode())
        received = await read_until(stream, b"\r\n\r\n")
        while chunk := await stream.receive_some(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("latin-1").split("\r\n")
    parsed = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    return int(status_line.split()[1]), parsed, body


async def test_head_and_get_root_answer_without_a_key(gateway: Gateway) -> None:
    with trio.fail_after(10):
        get_status, get_headers, get_body = await raw(gateway.port, "GET", "/")
        head_status, head_headers, head_body = await raw(gateway.port, "HEAD", "/")
        models_status, _, _ = await raw(gateway.port, "GET", "/v1/models")
    assert models_status == 401  # keys are configured: the API needs one, the probe does not
    assert (get_status, head_status) == (200, 200)
    assert json.loads(get_body) == {"name": "runestone", "status": "ok"}
    assert head_body == b""
    assert head_headers["content-type"] == get_headers["content-type"] == "application/json"
    assert head_headers["content-length"] == get_headers["content-length"] == str(len(get_body))


async def test_head_root_keeps_the_connection_usable(gateway: Gateway) -> None:
    """No stray body after a HEAD answer: the next request on the connection parses."""
    with trio.fail_after(10):
        stream = await trio.open_tcp_stream(HOST, gateway.port)
        async with stream:
            probe = f"HEAD / HTTP/1.1\r\nhost: {HOST}\r\n\r\n"
            live = f"GET /health/live HTTP/1.1\r\nhost: {HOST}\r\nconnection: close\r\n\r\n"
            await stream.send_all((probe + live).encode())
            received = b""
            while chunk := await stream.receive_some(65536):
                received += chunk
    first, _, rest = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 200 ")
    assert rest.startswith(b"HTTP/1.1 200 ")
    assert rest.endswith(b'{"status":"ok"}')
