"""``/v1/messages`` on the translated path: the official ``anthropic`` SDK through the gateway
to an OpenAI-compatible provider (FakeOpenAI) and to the in-process mock.

The client cannot tell the difference: the answer is an Anthropic Message (content blocks,
stop_reason, usage), the stream follows Anthropic's event grammar (with ``ping`` frames
while a slow provider is silent), a tool round trip works (the provider receives OpenAI's
shape: the tool message right after the assistant's tool_calls), thinking blocks sent back
are accepted and dropped, and count_tokens answers Runestone's documented estimate.
"""

from __future__ import annotations

import json
from typing import Any

import anthropic
import attrs
import httpx
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import OPENAI_KEY, Gateway, gateway_config, in_thread
from fakes import REASONING, SIGNATURE, TEXT, THINKING, USAGE, FakeOpenAI
from test_e2e_messages_native import (
    CLIENT_KEY,
    MESSAGES,
    TOOLS,
    check_event_order,
    post_claude_code,
    sdk_client,
    sse_events,
    thinking_turns,
)

from runestone_proxy.config import UpstreamConfig

#: fast -> openai:gpt-4o-mini (FakeOpenAI); mock-1 -> the in-process mock.
TRANSLATED = ["fast", "mock-1"]


def plain(block: Any) -> dict[str, Any]:
    """A content block as data, without the fields the SDK leaves unset."""
    return {k: v for k, v in block.model_dump().items() if v is not None}


# --- whole answers ---------------------------------------------------------------------------


async def test_create_whole_openai(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        raw = await in_thread(
            claude.messages.with_raw_response.create,
            model="fast",
            max_tokens=256,
            system="Be brief.",
            messages=MESSAGES,
            extra_headers={"anthropic-beta": "a,b"},
        )
    message = raw.parse()
    assert message.type == "message"
    assert message.role == "assistant"
    assert [plain(b) for b in message.content] == [{"type": "text", "text": TEXT}]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens == USAGE["prompt_tokens"]
    assert message.usage.output_tokens == USAGE["completion_tokens"]
    assert raw.headers["x-runestone-provider"] == "openai"
    seen = fake_openai.last()
    assert seen.path == "/v1/chat/completions"
    assert seen.body["model"] == "gpt-4o-mini"
    # OpenAI's own API takes max_completion_tokens; other compatible servers max_tokens.
    assert seen.body.get("max_completion_tokens", seen.body.get("max_tokens")) == 256
    assert [m["role"] for m in seen.body["messages"]] == ["system", "user"]
    assert seen.headers["authorization"] == f"Bearer {OPENAI_KEY}"
    assert "anthropic-beta" not in seen.headers  # Anthropic's headers mean nothing there
    assert CLIENT_KEY not in repr(seen.headers)


async def test_create_whole_mock(gateway: Gateway) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        message = await in_thread(
            claude.messages.create, model="mock-1", max_tokens=256, messages=MESSAGES
        )
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text.startswith("Mock reply")  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0


async def test_reasoning_becomes_thinking(gateway: Gateway) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        message = await in_thread(
            claude.messages.create, model="openai:reasoner", max_tokens=256, messages=MESSAGES
        )
    assert [plain(b) for b in message.content] == [
        {"type": "thinking", "thinking": REASONING, "signature": ""},
        {"type": "text", "text": TEXT},
    ]


# --- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", [*TRANSLATED, "openai:tool-turns", "openai:reasoner"])
async def test_stream_helper_matches_whole(gateway: Gateway, model: str) -> None:
    def run(claude: anthropic.Anthropic) -> tuple[list[str], Any, Any, list[Any]]:
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "messages": MESSAGES}
        if model.endswith("tool-turns"):
            kwargs["tools"] = TOOLS
        whole = claude.messages.create(**kwargs)
        with claude.messages.stream(**kwargs) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        events = list(claude.messages.create(stream=True, **kwargs))
        return pieces, final, whole, events

    with trio.fail_after(10), sdk_client(gateway) as claude:
        pieces, final, whole, events = await in_thread(run, claude)
    assert [plain(b) for b in final.content] == [plain(b) for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.input_tokens == whole.usage.input_tokens
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert "".join(pieces) == "".join(b.text for b in whole.content if b.type == "text")
    check_event_order(events)
    if model.endswith("tool-turns"):
        assert whole.stop_reason == "tool_use"
        assert whole.content[-1].input == {"city": "Paris"}  # type: ignore[union-attr]


async def test_slow_provider_stream_gets_pings(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: Any
) -> None:
    """The fake sends its first text piece, then holds until the test has seen a ping."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    config = attrs.evolve(base, upstream=UpstreamConfig(ping_interval_s=0.05))
    body = {"model": "openai:paced", "max_tokens": 64, "messages": MESSAGES, "stream": True}
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    received = ""
    with trio.fail_after(10):
        gateway = await start_gateway(config)
        async with (
            httpx.AsyncClient(base_url=gateway.url, timeout=10) as http,
            http.stream("POST", "/v1/messages", json=body, headers=headers) as response,
        ):
            assert response.status_code == 200
            async for text in response.aiter_text():
                received += text
                at = received.find("event: content_block_delta")
                if not fake_openai.paced_gate.is_set() and 0 <= at < received.find(
                    "event: ping", at
                ):
                    fake_openai.paced_gate.set()
    assert fake_openai.paced_gate.is_set(), received
    events = sse_events(received)
    names = [name for name, _ in events]
    assert "ping" in names
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert "".join(d["text"] for d in deltas) == TEXT


# --- tools and thinking -----------------------------------------------------------------------


async def test_tool_round_trip_openai(gateway: Gateway, fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        first = await in_thread(
            claude.messages.create,
            model="openai:tool-turns",
            max_tokens=256,
            messages=MESSAGES,
            tools=TOOLS,
        )
        assert first.stop_reason == "tool_use"
        call = first.content[-1]
        assert call.type == "tool_use"
        assert (call.name, call.input) == ("get_weather", {"city": "Paris"})
        result = {
            "type": "tool_result",
            "tool_use_id": call.id,
            "content": [{"type": "text", "text": "weather service down"}],
            "is_error": True,
            "cache_control": {"type": "ephemeral"},
        }
        turns = [
            *MESSAGES,
            {"role": "assistant", "content": [b.to_dict() for b in first.content]},
            {"role": "user", "content": [result, {"type": "text", "text": "Use Celsius."}]},
        ]
        second = await in_thread(
            claude.messages.create,
            model="openai:tool-turns",
            max_tokens=256,
            messages=turns,
            tools=TOOLS,
        )
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == TEXT  # type: ignore[union-attr]
    sent = fake_openai.last().body
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "tool", "user"]
    assistant, tool = sent["messages"][1:3]
    (tool_call,) = assistant["tool_calls"]
    assert tool_call["id"] == call.id
    assert tool_call["function"]["name"] == "get_weather"
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}
    assert tool["tool_call_id"] == call.id
    assert "weather service down" in json.dumps(tool["content"])
    assert "cache_control" not in json.dumps(sent)
    assert sent["tools"][0]["function"]["name"] == "get_weather"


async def test_tool_round_trip_mock(gateway: Gateway) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        first = await in_thread(
            claude.messages.create, model="mock-1", max_tokens=256, messages=MESSAGES, tools=TOOLS
        )
        assert first.stop_reason == "tool_use"
        call = first.content[-1]
        assert call.type == "tool_use"
        assert call.name == "get_weather"
        result = {"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}
        second = await in_thread(
            claude.messages.create,
            model="mock-1",
            max_tokens=256,
            tools=TOOLS,
            tool_choice={"type": "none"},
            messages=[
                *MESSAGES,
                {"role": "assistant", "content": [b.to_dict() for b in first.content]},
                {"role": "user", "content": [result]},
            ],
        )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"


@pytest.mark.parametrize("model", TRANSLATED)
async def test_thinking_sent_back_is_dropped(
    gateway: Gateway, fake_openai: FakeOpenAI, model: str
) -> None:
    block = {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}
    with trio.fail_after(10), sdk_client(gateway) as claude:
        message = await in_thread(
            claude.messages.create,
            model=model,
            max_tokens=4096,
            thinking={"type": "enabled", "budget_tokens": 2048},
            messages=thinking_turns(block),
            tools=TOOLS,
            tool_choice={"type": "none"},
        )
    assert message.content[0].type == "text"
    if model == "fast":
        sent = json.dumps(fake_openai.last().body)
        assert SIGNATURE not in sent
        assert THINKING not in sent
        assert fake_openai.last().body["messages"][1]["tool_calls"]


# --- count_tokens and Claude Code ---------------------------------------------------------------


@pytest.mark.parametrize("model", TRANSLATED)
async def test_count_tokens_estimated(
    gateway: Gateway, fake_openai: FakeOpenAI, model: str
) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        raw = await in_thread(
            claude.messages.with_raw_response.count_tokens,
            model=model,
            system="Answer in one word.",
            messages=MESSAGES,
            tools=TOOLS,
        )
    assert raw.parse().input_tokens > 0
    assert raw.headers["x-runestone-token-count"].startswith("estimate")
    assert fake_openai.requests == []  # no provider call


@pytest.mark.parametrize("model", TRANSLATED)
async def test_claude_code_request(gateway: Gateway, fake_openai: FakeOpenAI, model: str) -> None:
    with trio.fail_after(10):
        response, _ = await post_claude_code(gateway, model)
    assert response.status_code == 200, response.text
    names = [name for name, _ in sse_events(response.text)]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    if model == "fast":
        sent = fake_openai.last().body
        assert sent["model"] == "gpt-4o-mini"
        assert sent["stream"] is True
        assert len(sent["tools"]) == 12
        assert all(t["type"] == "function" for t in sent["tools"])
