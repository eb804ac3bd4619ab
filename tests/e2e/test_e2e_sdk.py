"""The official ``openai`` SDK against the gateway, over the fake providers and the mock.

What an SDK user sees: answers parse into the SDK's types, streamed deltas accumulate into
the same result as the whole answer (text and tool calls, from either wire format), usage
arrives in the ``include_usage`` chunk, and each failure raises the SDK's matching exception.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import ALIASES, CLAUDE_UPSTREAM, GATEWAY_KEY, Gateway, in_thread
from fakes import (
    ARGUMENTS,
    SIGNATURE,
    TEXT,
    THINKING,
    USAGE,
    FakeAnthropic,
    FakeOpenAI,
    embedding_vector,
)

MESSAGES = [{"role": "user", "content": "What's the weather in Paris?"}]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


def accumulate(chunks: list[Any]) -> dict[str, Any]:
    """Fold chat chunks into one message, the way SDK users do: content pieces are joined,
    tool calls are keyed by ``index`` with id/name from their first piece."""
    content: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    finish = None
    for chunk in chunks:
        for choice in chunk.choices:
            delta = choice.delta
            if delta.content:
                content.append(delta.content)
            for piece in delta.tool_calls or ():
                call = calls.setdefault(piece.index, {"id": None, "name": None, "arguments": ""})
                if piece.id:
                    assert call["id"] is None, "id sent twice"
                    call["id"] = piece.id
                if piece.function and piece.function.name:
                    call["name"] = piece.function.name
                if piece.function and piece.function.arguments:
                    call["arguments"] += piece.function.arguments
            if choice.finish_reason:
                assert finish is None, "finish_reason sent twice"
                finish = choice.finish_reason
    return {"content": "".join(content), "tool_calls": calls, "finish_reason": finish}


async def stream_chat(sdk: openai.OpenAI, **kwargs: Any) -> list[Any]:
    def run() -> list[Any]:
        return list(sdk.chat.completions.create(stream=True, **kwargs))

    return await in_thread(run)


# --- chat --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "owner", "upstream"),
    [("fast", "openai", "gpt-4o-mini"), ("smart", "anthropic", CLAUDE_UPSTREAM)],
)
async def test_chat_whole(
    sdk: openai.OpenAI,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    model: str,
    owner: str,
    upstream: str,
) -> None:
    with trio.fail_after(10):
        raw = await in_thread(
            sdk.chat.completions.with_raw_response.create, model=model, messages=MESSAGES
        )
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.content == TEXT
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.total_tokens > 0
    assert raw.headers["x-runestone-provider"] == owner
    fake = fake_openai if owner == "openai" else fake_anthropic
    assert fake.last().body["model"] == upstream  # the alias was resolved before sending


@pytest.mark.parametrize("model", ["fast", "smart", "mock-1"])
async def test_chat_stream_text(sdk: openai.OpenAI, model: str) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(sdk, model=model, messages=MESSAGES)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    folded = accumulate(chunks)
    assert folded["finish_reason"] == "stop"
    assert folded["tool_calls"] == {}
    if model != "mock-1":
        assert folded["content"] == TEXT
    else:
        assert folded["content"]
    assert all(c.usage is None for c in chunks)  # not asked for


@pytest.mark.parametrize(
    ("model", "call_id", "text"),
    [
        ("openai:tools", "call_fake_weather", None),
        ("anthropic:claude-tools", "toolu_01fake", "Let me check."),
    ],
)
async def test_chat_whole_tool_call(
    sdk: openai.OpenAI, model: str, call_id: str, text: str | None
) -> None:
    with trio.fail_after(10):
        completion = await in_thread(
            sdk.chat.completions.create, model=model, messages=MESSAGES, tools=TOOLS
        )
    message = completion.choices[0].message
    assert completion.choices[0].finish_reason == "tool_calls"
    assert message.content == text
    assert message.tool_calls is not None
    (call,) = message.tool_calls
    assert (call.id, call.type, call.function.name) == (call_id, "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_anthropic_thinking_whole(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        completion = await in_thread(
            sdk.chat.completions.create, model="anthropic:claude-thinking", messages=MESSAGES
        )
    message = completion.choices[0].message
    extra = message.model_extra or {}
    assert message.content == TEXT
    assert extra["reasoning_content"] == THINKING
    assert extra["thinking_blocks"] == [
        {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}
    ]


@pytest.mark.parametrize(
    ("model", "call_id", "text"),
    [
        ("openai:tools", "call_fake_weather", ""),
        ("anthropic:claude-tools", "toolu_01fake", "Let me check."),
    ],
)
async def test_chat_stream_tool_call(
    sdk: openai.OpenAI, model: str, call_id: str, text: str
) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(sdk, model=model, messages=MESSAGES, tools=TOOLS)
    folded = accumulate(chunks)
    assert folded["finish_reason"] == "tool_calls"
    assert folded["content"] == text
    assert folded["tool_calls"] == {
        0: {"id": call_id, "name": "get_weather", "arguments": ARGUMENTS}
    }
    assert json.loads(folded["tool_calls"][0]["arguments"]) == {"city": "Paris"}
    pieces = [p for c in chunks for ch in c.choices for p in ch.delta.tool_calls or ()]
    assert len(pieces) >= 3  # really streamed in pieces
    assert all(p.id is None and (p.function is None or p.function.name is None) for p in pieces[1:])


async def test_anthropic_thinking_stream(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(sdk, model="anthropic:claude-thinking", messages=MESSAGES)
    folded = accumulate(chunks)
    assert folded["content"] == TEXT
    extras = [c.choices[0].delta.model_extra or {} for c in chunks if c.choices]
    reasoning = "".join(e.get("reasoning_content") or "" for e in extras)
    blocks = [b for e in extras for b in e.get("thinking_blocks") or ()]
    assert reasoning == THINKING
    assert blocks == [{"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}]


@pytest.mark.parametrize("model", ["fast", "smart", "mock-1"])
async def test_include_usage(sdk: openai.OpenAI, model: str) -> None:
    with trio.fail_after(10):
        chunks = await stream_chat(
            sdk, model=model, messages=MESSAGES, stream_options={"include_usage": True}
        )
    *body, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens > 0
    assert all(c.usage is None for c in body)
    if model == "fast":
        assert last.usage.model_dump(exclude_none=True) == USAGE


# --- legacy completions, embeddings, models -------------------------------------------------------


@pytest.mark.parametrize("model", ["fast", "smart", "mock-1"])
async def test_completions(sdk: openai.OpenAI, model: str) -> None:
    with trio.fail_after(10):
        completion = await in_thread(sdk.completions.create, model=model, prompt="Say hi")
        chunks = await in_thread(
            lambda: list(sdk.completions.create(model=model, prompt="Say hi", stream=True))
        )
    assert completion.object == "text_completion"
    assert completion.choices[0].finish_reason == "stop"
    assert all(c.object == "text_completion" for c in chunks)
    streamed = "".join(choice.text for c in chunks for choice in c.choices)
    assert streamed == completion.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices][-1] == "stop"
    if model != "mock-1":
        assert completion.choices[0].text == TEXT


async def test_completions_over_anthropic_sends_messages(
    sdk: openai.OpenAI, fake_anthropic: FakeAnthropic
) -> None:
    with trio.fail_after(10):
        await in_thread(sdk.completions.create, model="smart", prompt="Say hi", max_tokens=20)
    sent = fake_anthropic.last()
    assert sent.path == "/v1/messages"
    assert sent.body["messages"] == [{"role": "user", "content": "Say hi"}]
    assert sent.body["max_tokens"] == 20
    assert "prompt" not in sent.body


async def test_embeddings(sdk: openai.OpenAI, fake_openai: FakeOpenAI) -> None:
    with trio.fail_after(10):
        result = await in_thread(
            sdk.embeddings.create, model="text-embedding-3-small", input=["one", "two"]
        )
        floats = await in_thread(
            sdk.embeddings.create, model="mock-embed-1", input="one", encoding_format="float"
        )
    assert [e.embedding for e in result.data] == [embedding_vector(0), embedding_vector(1)]
    assert fake_openai.last().body["encoding_format"] == "base64"  # the SDK's default
    assert result.usage.prompt_tokens == 6
    assert len(floats.data[0].embedding) == 16


async def test_models(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        listed = await in_thread(sdk.models.list)
        alias = await in_thread(sdk.models.retrieve, "smart")
        model = await in_thread(sdk.models.retrieve, "gpt-4o-mini")
        with pytest.raises(openai.NotFoundError):
            await in_thread(sdk.models.retrieve, "no-such-model")
    by_id = {m.id: m for m in listed.data}
    assert {"gpt-4o-mini", "text-embedding-3-small", "claude-sonnet", "mock-1", *ALIASES} <= set(
        by_id
    )
    assert by_id["claude-sonnet"].owned_by == "anthropic"
    for name, target in ALIASES.items():
        assert (by_id[name].model_extra or {})["alias_for"] == target
    assert (alias.model_extra or {})["alias_for"] == "claude-sonnet"
    assert (model.id, model.owned_by, model.object) == ("gpt-4o-mini", "openai", "model")


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "exception", "status"),
    [
        ("no-such-model", openai.NotFoundError, 404),
        ("openai:err-404", openai.NotFoundError, 404),
        ("openai:err-429", openai.RateLimitError, 429),
        ("anthropic:claude-err-429", openai.RateLimitError, 429),
        ("openai:err-400", openai.BadRequestError, 400),
        ("openai:err-401", openai.AuthenticationError, 401),
        ("anthropic:claude-err-401", openai.AuthenticationError, 401),
        ("openai:err-500", openai.InternalServerError, 500),
        ("anthropic:claude-err-529", openai.InternalServerError, 503),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_errors_raise_the_sdk_class(
    sdk: openai.OpenAI,
    model: str,
    exception: type[openai.APIStatusError],
    status: int,
    stream: bool,
) -> None:
    with trio.fail_after(10), pytest.raises(exception) as caught:
        await in_thread(
            lambda: (
                list(sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True))
                if stream
                else sdk.chat.completions.create(model=model, messages=MESSAGES)
            )
        )
    error = caught.value
    assert error.status_code == status
    assert isinstance(error.body, dict)
    assert set(error.body) == {"message", "type", "param", "code"}
    assert error.response.headers["x-request-id"]
    if status == 429:
        assert int(error.response.headers["retry-after"]) >= 7
    if model == "openai:err-400":
        assert error.body["param"] == "temperature"
        assert error.body["code"] == "decimal_above_max_value"


async def test_bad_request(sdk: openai.OpenAI) -> None:
    with trio.fail_after(10):
        with pytest.raises(openai.BadRequestError) as empty:
            await in_thread(sdk.chat.completions.create, model="fast", messages=[])
        with pytest.raises(openai.BadRequestError) as missing:
            await in_thread(sdk.completions.create, model="fast", prompt=None)  # type: ignore[arg-type]
    assert empty.value.body["param"] == "messages"  # type: ignore[index]
    assert missing.value.body["param"] == "prompt"  # type: ignore[index]


async def test_authentication(start_gateway: StartGateway) -> None:
    with trio.fail_after(10):
        gateway: Gateway = await start_gateway(env={"RUNESTONE_API_KEYS": f"other,{GATEWAY_KEY}"})
        base = f"{gateway.url}/v1"
        good = openai.OpenAI(base_url=base, api_key=GATEWAY_KEY, max_retries=0, timeout=10)
        bad = openai.OpenAI(base_url=base, api_key="sk-wrong-key-1234", max_retries=0, timeout=10)
        try:
            completion = await in_thread(
                good.chat.completions.create, model="fast", messages=MESSAGES
            )
            assert completion.choices[0].message.content == TEXT
            for call in (
                lambda: bad.chat.completions.create(model="fast", messages=MESSAGES),
                lambda: bad.models.list(),
                lambda: bad.embeddings.create(model="mock-embed-1", input="x"),
            ):
                with pytest.raises(openai.AuthenticationError) as caught:
                    await in_thread(call)
                assert caught.value.body["code"] == "invalid_api_key"  # type: ignore[index]
                assert "sk-wrong-key-1234" not in caught.value.message  # masked
        finally:
            good.close()
            bad.close()
