"""Stream endings, large events and the usage chunk, through real sockets (issue 10, 3-5).

* A provider that said how it finished (every ``finish_reason``; Anthropic's
  ``message_delta`` with ``stop_reason``) and then closed without ``[DONE]`` /
  ``message_stop``, or dropped the connection, ends the client's stream normally.
* A stream cut before that, or inside an event, still ends with an error event and
  ``[DONE]``, never a made-up ``finish_reason``.
* One SSE event of several MiB is relayed whole.
* The ``choices: []`` usage chunk reaches only clients that asked for it.

The official openai SDK is the client where one is involved; httpx reads the raw SSE where
the SDK would hide it (error events, the exact payload list).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import chat_body, gateway_config, sse_data, sse_json
from fakes import ARGUMENT_PIECES, BIG_TEXT, TEXT, TEXT_PIECES, USAGE, FakeAnthropic, FakeOpenAI
from test_e2e_sdk import MESSAGES, accumulate, stream_chat

from runestone_proxy.config import UpstreamConfig

ANTHROPIC_TOTAL = 12 + 5  # the fake's input_tokens + output_tokens


def usage_option(include_usage: bool) -> dict[str, Any]:
    return {"stream_options": {"include_usage": True}} if include_usage else {}


# --- ended normally without the terminator -----------------------------------------------------


@pytest.mark.parametrize(
    ("model", "total"),
    [
        ("openai:no-done", USAGE["total_tokens"]),
        ("openai:finish-reset", None),  # dropped before the usage chunk: never made up
        ("anthropic:claude-no-stop", ANTHROPIC_TOTAL),
    ],
)
@pytest.mark.parametrize("include_usage", [False, True])
async def test_finished_stream_without_terminator_ends_normally(
    sdk: openai.OpenAI, model: str, total: int | None, include_usage: bool
) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(
            sdk, model=model, messages=MESSAGES, **usage_option(include_usage)
        )
    folded = accumulate(chunks)
    assert folded["content"] == TEXT
    assert folded["finish_reason"] == "stop"
    usage = [c.usage.total_tokens for c in chunks if c.usage is not None]
    assert usage == ([total] if include_usage and total is not None else [])


async def test_finished_stream_without_done_raw(http: httpx.AsyncClient) -> None:
    for path, body in [
        ("/v1/chat/completions", chat_body("openai:no-done", stream=True)),
        ("/v1/completions", {"model": "openai:no-done", "prompt": "Hi", "stream": True}),
        ("/v1/completions", {"model": "anthropic:claude-no-stop", "prompt": "Hi", "stream": True}),
    ]:
        with trio.fail_after(10):
            response = await http.post(path, json=body)
        chunks = sse_json(response.text)  # ends with [DONE]
        assert all("error" not in c for c in chunks)
        finishes = [ch["finish_reason"] for c in chunks for ch in c["choices"]]
        assert finishes[-1] == "stop"


async def test_max_tokens_cuts_an_open_tool_block(sdk: openai.OpenAI) -> None:
    """Anthropic's message_delta arrives while the tool_use block is still open."""
    with trio.fail_after(10):
        chunks = await stream_chat(sdk, model="anthropic:claude-max-tokens-tool", messages=MESSAGES)
    folded = accumulate(chunks)
    assert folded["finish_reason"] == "length"
    [call] = folded["tool_calls"].values()
    assert call["name"] == "get_weather"
    assert call["arguments"] == ARGUMENT_PIECES[0]  # what came before the cut, nothing more


# --- something was lost: error event, then [DONE] ---------------------------------------------


@pytest.mark.parametrize("model", ["openai:finish-partial", "anthropic:claude-cut"])
async def test_lost_data_still_ends_with_an_error(http: httpx.AsyncClient, model: str) -> None:
    with trio.fail_after(10):
        response = await http.post("/v1/chat/completions", json=chat_body(model, stream=True))
    assert response.status_code == 200
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    *chunks, error = [json.loads(p) for p in payloads[:-1]]
    assert error["error"]["code"] == "upstream_protocol_error"
    if model.startswith("anthropic"):  # cut mid-content: no finish was ever said
        assert all(ch["finish_reason"] is None for c in chunks for ch in c["choices"])
        assert (
            "".join(ch["delta"].get("content") or "" for c in chunks for ch in c["choices"])
            == (TEXT_PIECES[0])
        )


# --- large events -----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["openai:big", "anthropic:claude-big"])
async def test_multi_mib_event_is_relayed_whole(sdk: openai.OpenAI, model: str) -> None:
    with trio.fail_after(20):
        chunks = await stream_chat(sdk, model=model, messages=MESSAGES)
    folded = accumulate(chunks)
    assert len(folded["content"]) == len(BIG_TEXT)
    assert folded["content"] == BIG_TEXT
    assert folded["finish_reason"] == "stop"


# --- the usage chunk only when asked ----------------------------------------------------------


@pytest.mark.parametrize("model", ["openai:usage-always", "anthropic:claude-sonnet-x", "mock-1"])
async def test_unasked_usage_chunk_is_stripped(
    sdk: openai.OpenAI, http: httpx.AsyncClient, model: str
) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(sdk, model=model, messages=MESSAGES)
        response = await http.post("/v1/chat/completions", json=chat_body(model, stream=True))
    assert all(c.choices for c in chunks)  # no choices: [] chunk reached the SDK
    assert all(c.usage is None for c in chunks)
    raw = sse_json(response.text)
    assert all(c["choices"] for c in raw)
    assert all(c.get("usage") is None for c in raw)


async def test_asked_usage_chunk_is_kept(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(
            sdk, model="openai:usage-always", messages=MESSAGES, **usage_option(True)
        )
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == USAGE["total_tokens"]


async def test_event_over_the_cap_is_an_error(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """The cap is ``upstream.max_response_bytes``: one event past it ends the stream with an
    error (the parser never holds more than about one event of that size)."""
    upstream = UpstreamConfig(max_response_bytes=1024 * 1024)
    config = gateway_config(fake_openai.base_url, fake_anthropic.base_url, upstream=upstream)
    gw = await start_gateway(config)
    async with httpx.AsyncClient(base_url=gw.url, timeout=10) as http:
        with trio.fail_after(10):
            response = await http.post(
                "/v1/chat/completions", json=chat_body("openai:big", stream=True)
            )
    payloads = sse_data(response.text)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert error["code"] == "upstream_protocol_error"
    assert "larger than 1048576 bytes" in error["message"]
