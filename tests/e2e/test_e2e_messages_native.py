"""``/v1/messages`` on the native path: the official ``anthropic`` SDK through the gateway to
an Anthropic provider (FakeAnthropic), bytes passed through.

What a Claude client sees is what Anthropic would have answered (content, stop_reason,
usage, the stream's events in Anthropic's order), and what the upstream sees is what the
client sent: the same body (the client's bytes when no rewrite is needed; else only
``model`` replaced), ``anthropic-version`` / ``anthropic-beta`` / ``x-app`` /
``x-claude-code-session-id`` as sent, and the provider's key, never the client's.

The helpers here (``sdk_client``, ``check_event_order``, ``claude_code_request``) are shared
with the translated-path tests (``test_e2e_messages_translated.py``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import anthropic
import attrs
import httpx
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import (
    ANTHROPIC_KEY,
    CLAUDE_UPSTREAM,
    EVERYTHING,
    Gateway,
    gateway_config,
    in_thread,
)
from fakes import SIGNATURE, TEXT, THINKING, FakeAnthropic, FakeOpenAI, fake_token_count

from runestone_proxy.config import ModelConfig

CLIENT_KEY = "sk-ant-client-key-never-forwarded"
MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
TOOLS = [
    {
        "name": "get_weather",
        "description": "The weather in a city.",
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
]
#: A table model whose id is also Anthropic's: nothing to rewrite, the bytes pass as sent.
SAME_NAME = "claude-opus-4-1-20250805"

# Anthropic's stream grammar (https://docs.anthropic.com/en/docs/build-with-claude/streaming):
# message_start, then blocks (start, deltas, stop), then message_delta and message_stop.
_LETTER = {
    "message_start": "M",
    "content_block_start": "[",
    "content_block_delta": "d",
    "content_block_stop": "]",
    "message_delta": "D",
    "message_stop": "S",
}


@contextmanager
def sdk_client(gateway: Gateway, api_key: str = CLIENT_KEY) -> Iterator[anthropic.Anthropic]:
    """The SDK's sync client on the gateway (it adds ``/v1`` itself); call it in a thread."""
    client = anthropic.Anthropic(base_url=gateway.url, api_key=api_key, max_retries=0, timeout=10)
    try:
        yield client
    finally:
        client.close()


def check_event_order(events: list[Any]) -> None:
    """Raw stream events in Anthropic's order, block indices 0, 1, ... each opened, fed and
    closed before the next (pings, which the SDK skips, may come anywhere)."""
    kinds = [e.type for e in events if e.type != "ping"]
    letters = "".join(_LETTER[k] for k in kinds)
    assert re.fullmatch(r"M(\[d*\])*DS", letters), kinds
    opened = -1
    for event in events:
        if event.type == "content_block_start":
            assert event.index == opened + 1, kinds
            opened = event.index
        elif event.type in ("content_block_delta", "content_block_stop"):
            assert event.index == opened, kinds


def claude_code_request(model: str) -> tuple[dict[str, Any], dict[str, str]]:
    """What Claude Code sends (body and headers), in the shape it has today."""
    tools: list[dict[str, Any]] = []
    for n in range(12):
        tool: dict[str, Any] = {
            "name": f"Tool{n}",
            "description": f"Tool number {n}.",
            "input_schema": {
                "type": "object",
                "properties": {"path": {"type": "string"}},
                "required": ["path"],
                "additionalProperties": False,
                "$schema": "http://json-schema.org/draft-07/schema#",
            },
        }
        if n >= 8:
            tool["defer_loading"] = True
        tools.append(tool)
    tools[-1]["cache_control"] = {"type": "ephemeral"}
    cached = {"type": "ephemeral"}
    body = {
        "model": model,
        "max_tokens": 128000,
        "stream": True,
        "system": [
            {"type": "text", "text": "You are Claude Code, Anthropic's official CLI."},
            {"type": "text", "text": "Work in /repo.", "cache_control": cached},
        ],
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "List the files.", "cache_control": cached}],
            }
        ],
        "tools": tools,
        "metadata": {"user_id": json.dumps({"device_id": "d3v1ce", "session_id": "s3ss10n"})},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "thinking": {"type": "enabled", "budget_tokens": 31999},
        "output_config": {"effort": "high"},
    }
    headers = {
        "x-api-key": CLIENT_KEY,
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,"
        "context-management-2025-06-27",
        "anthropic-dangerous-direct-browser-access": "true",
        "x-app": "cli",
        "x-claude-code-session-id": "0f1e2d3c-session",
        "user-agent": "claude-cli/2.0.14 (external, cli)",
        "x-stainless-lang": "js",
        "x-stainless-package-version": "0.60.0",
        "x-stainless-os": "Linux",
        "x-stainless-runtime": "node",
        "x-stainless-retry-count": "0",
        "x-stainless-timeout": "600",
        "accept": "application/json",
        "accept-encoding": "gzip, br, zstd",
        "content-type": "application/json",
    }
    return body, headers


async def post_claude_code(gateway: Gateway, model: str) -> tuple[httpx.Response, dict[str, Any]]:
    """Post :func:`claude_code_request` as Claude Code does (``?beta=true``, streamed)."""
    body, headers = claude_code_request(model)
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        response = await http.post("/v1/messages?beta=true", json=body, headers=headers)
    return response, body


def sse_events(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of a whole Anthropic SSE body; each frame names its data's type."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for frame in text[:-2].split("\n\n"):
        name, data = frame.split("\n")
        assert name.startswith("event: "), frame
        assert data.startswith("data: "), frame
        parsed = json.loads(data.removeprefix("data: "))
        assert parsed["type"] == name.removeprefix("event: "), frame
        events.append((parsed["type"], parsed))
    return events


# --- whole answers ---------------------------------------------------------------------------


async def test_create_whole(gateway: Gateway, fake_anthropic: FakeAnthropic) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        raw = await in_thread(
            claude.messages.with_raw_response.create,
            model="claude-sonnet",
            max_tokens=256,
            messages=MESSAGES,
            extra_headers={"anthropic-beta": "a,b"},
        )
    message = raw.parse()
    assert message.type == "message"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (12, 5)
    assert raw.headers["x-runestone-provider"] == "anthropic"
    seen = fake_anthropic.last()
    assert seen.path == "/v1/messages"
    assert seen.body == {"max_tokens": 256, "messages": MESSAGES, "model": CLAUDE_UPSTREAM}
    assert seen.headers["anthropic-beta"] == "a,b"
    assert seen.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY  # the provider's key, never the client's
    assert "authorization" not in seen.headers
    assert CLIENT_KEY not in repr(seen.headers)


async def test_client_bytes_forwarded_untouched(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """A model that needs no rewrite: the upstream gets the client's very bytes (odd spacing
    and all: a re-encoded body would have another length), with ``?beta=true`` accepted."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    same = ModelConfig(SAME_NAME, "anthropic", capabilities=EVERYTHING)
    config = attrs.evolve(base, models=(*base.models, same))
    body = {"model": SAME_NAME, "max_tokens": 64, "messages": MESSAGES, "temperature": 1.0}
    raw = json.dumps(body, indent=3).encode()
    headers = {"x-api-key": CLIENT_KEY, "anthropic-version": "2023-06-01"}
    headers["content-type"] = "application/json"
    with trio.fail_after(10):
        gateway = await start_gateway(config)
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            response = await http.post("/v1/messages?beta=true", content=raw, headers=headers)
        assert response.status_code == 200, response.text
        assert response.json()["content"][0]["text"] == TEXT
        seen = fake_anthropic.last()
        assert seen.headers["content-length"] == str(len(raw))
        assert json.dumps(seen.body) == json.dumps(body)  # same keys, same order
        with sdk_client(gateway) as claude:  # the SDK's beta flavour sends ?beta=true
            message = await in_thread(
                claude.beta.messages.create, model=SAME_NAME, max_tokens=64, messages=MESSAGES
            )
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert fake_anthropic.last().body == {
        "max_tokens": 64,
        "messages": MESSAGES,
        "model": SAME_NAME,
    }


# --- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["claude-sonnet", "anthropic:claude-tools"])
async def test_stream_helper_matches_whole(gateway: Gateway, model: str) -> None:
    def run(claude: anthropic.Anthropic) -> tuple[list[str], Any, Any, list[Any]]:
        kwargs: dict[str, Any] = {"model": model, "max_tokens": 256, "messages": MESSAGES}
        if model.endswith("tools"):
            kwargs["tools"] = TOOLS
        whole = claude.messages.create(**kwargs)
        with claude.messages.stream(**kwargs) as stream:
            pieces = list(stream.text_stream)
            final = stream.get_final_message()
        events = list(claude.messages.create(stream=True, **kwargs))
        return pieces, final, whole, events

    with trio.fail_after(10), sdk_client(gateway) as claude:
        pieces, final, whole, events = await in_thread(run, claude)
    assert [b.to_dict() for b in final.content] == [b.to_dict() for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert final.usage.input_tokens == whole.usage.input_tokens
    texts = [b.text for b in whole.content if b.type == "text"]
    assert "".join(pieces) == "".join(texts)
    check_event_order(events)


# --- tools and thinking -----------------------------------------------------------------------


async def test_tool_round_trip(gateway: Gateway, fake_anthropic: FakeAnthropic) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        first = await in_thread(
            claude.messages.create,
            model="anthropic:claude-tools",
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
            {"role": "user", "content": [result]},
        ]
        second = await in_thread(
            claude.messages.create,
            model="anthropic:claude-answer",
            max_tokens=256,
            messages=turns,
            tools=TOOLS,
        )
    assert second.stop_reason == "end_turn"
    assert second.content[0].text == TEXT  # type: ignore[union-attr]
    seen = fake_anthropic.last().body
    assert seen["messages"] == turns  # passed on as sent
    assert seen["tools"] == TOOLS


async def test_thinking_kept_across_a_tool_turn(
    gateway: Gateway, fake_anthropic: FakeAnthropic
) -> None:
    thinking = {"type": "enabled", "budget_tokens": 2048}
    with trio.fail_after(10), sdk_client(gateway) as claude:
        first = await in_thread(
            claude.messages.create,
            model="anthropic:claude-thinking",
            max_tokens=4096,
            thinking=thinking,
            messages=MESSAGES,
        )
        block = first.content[0]
        assert block.type == "thinking"
        assert (block.thinking, block.signature) == (THINKING, SIGNATURE)
        turns = thinking_turns(block.to_dict())
        second = await in_thread(
            claude.messages.create,
            model="anthropic:claude-answer",
            max_tokens=4096,
            thinking=thinking,
            messages=turns,
            tools=TOOLS,
        )
    assert second.content[0].text == TEXT  # type: ignore[union-attr]
    sent_back = fake_anthropic.last().body["messages"][1]["content"][0]
    assert sent_back == {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}


def thinking_turns(thinking_block: dict[str, Any]) -> list[dict[str, Any]]:
    """A conversation whose assistant turn thought, then called a tool; then its result."""
    call = {
        "type": "tool_use",
        "id": "toolu_01x",
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    result = {"type": "tool_result", "tool_use_id": "toolu_01x", "content": "18 C, sunny"}
    return [
        *MESSAGES,
        {"role": "assistant", "content": [thinking_block, call]},
        {"role": "user", "content": [result]},
    ]


# --- count_tokens and Claude Code ---------------------------------------------------------------


async def test_count_tokens_forwarded(gateway: Gateway, fake_anthropic: FakeAnthropic) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        raw = await in_thread(
            claude.messages.with_raw_response.count_tokens,
            model="claude-sonnet",
            system="Answer in one word.",
            messages=MESSAGES,
            extra_headers={"anthropic-beta": "token-counting-2024-11-01"},
        )
    seen = fake_anthropic.last()
    assert seen.path == "/v1/messages/count_tokens"
    assert seen.body["model"] == CLAUDE_UPSTREAM
    assert seen.headers["anthropic-beta"] == "token-counting-2024-11-01"
    assert raw.parse().input_tokens == fake_token_count(seen.body)
    assert "x-runestone-token-count" not in raw.headers  # Anthropic's own count


async def test_claude_code_request(gateway: Gateway, fake_anthropic: FakeAnthropic) -> None:
    with trio.fail_after(10):
        response, body = await post_claude_code(gateway, "claude-sonnet")
    assert response.status_code == 200, response.text
    names = [name for name, _ in sse_events(response.text)]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    seen = fake_anthropic.last()
    assert seen.body == {**body, "model": CLAUDE_UPSTREAM}
    _, headers = claude_code_request("claude-sonnet")
    for name in ("anthropic-beta", "anthropic-version", "x-app", "x-claude-code-session-id"):
        assert seen.headers[name] == headers[name], name
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    assert not [name for name in seen.headers if name.startswith("x-stainless")]  # SDK's own
