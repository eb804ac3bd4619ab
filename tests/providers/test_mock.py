"""The built-in mock provider: deterministic, OpenAI-shaped, and readable by our own stream
translator (so the mock's streams go through the same relay path as a real provider's)."""

from __future__ import annotations

import base64
import json
import math
import struct
from pathlib import Path
from typing import Any

import pytest

from runestone_proxy.errors import InvalidParam
from runestone_proxy.protocol.sse import DONE, SSEParser, encode_data
from runestone_proxy.providers.base import Endpoint, ProviderCall
from runestone_proxy.providers.mock import MockProvider, MockSettings
from runestone_proxy.providers.openai import OpenAITranslator

DATA = Path(__file__).parent.parent / "data" / "openai"
NOW = 1_700_000_000


def mock(**settings: Any) -> MockProvider:
    return MockProvider(MockSettings(**settings), clock=lambda: NOW)


def chat_call(text: str = "Hello there, mock!", **body: Any) -> ProviderCall:
    return make_call("chat", {"messages": [{"role": "user", "content": text}], **body})


def make_call(
    endpoint: Endpoint, body: dict[str, Any], *, stream: bool = False, include_usage: bool = False
) -> ProviderCall:
    return ProviderCall(
        endpoint=endpoint,
        body={"model": "mock-1", **body},
        model="mock-1",
        stream=stream,
        include_usage=include_usage,
    )


def keys(obj: dict[str, Any]) -> set[str]:
    return set(obj)


def relay(chunks: list[bytes]) -> list[bytes]:
    """Frame the chunks as an upstream would, and read them back as the gateway does."""
    wire = b"".join(encode_data(c) for c in chunks) + DONE
    parser = SSEParser()
    call = make_call("chat", {}, stream=True, include_usage=True)
    stream = OpenAITranslator("mock", "generic").stream(call)
    out = [p for event in parser.feed(wire) for p in stream.feed(event)]
    return out + stream.finish()


# -- chat -----------------------------------------------------------------------------------


def test_chat_is_deterministic_and_shaped_like_openai() -> None:
    first = mock().chat(chat_call())
    assert first == mock().chat(chat_call())
    body = json.loads(first)
    golden = json.loads((DATA / "chat_response.json").read_bytes())
    assert keys(body) == keys(golden)
    assert body["object"] == "chat.completion"
    assert body["created"] == NOW
    assert body["id"].startswith("chatcmpl-mock-")
    message = body["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].startswith("Mock reply #")
    assert message["content"].endswith(" to: Hello there, mock!")
    assert body["choices"][0]["finish_reason"] == "stop"


def test_answer_follows_the_last_user_message() -> None:
    a = json.loads(mock().chat(chat_call("one")))
    b = json.loads(mock().chat(chat_call("two")))
    assert a["id"] != b["id"]
    history = make_call(
        "chat",
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": "two"},
                {"role": "assistant", "content": "ok"},
                {"role": "user", "content": [{"type": "text", "text": "one"}]},
            ]
        },
    )
    assert json.loads(mock().chat(history))["id"] == a["id"]


def test_prompt_is_cut_to_40_characters() -> None:
    text = "x" * 100
    content = json.loads(mock().chat(chat_call(text)))["choices"][0]["message"]["content"]
    assert content.endswith("to: " + "x" * 40)


def test_usage_counts_whitespace_tokens() -> None:
    body = json.loads(mock().chat(chat_call("three little words")))
    reply = body["choices"][0]["message"]["content"]
    assert body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": len(reply.split()),
        "total_tokens": 3 + len(reply.split()),
    }


def test_max_tokens_cuts_with_finish_reason_length() -> None:
    body = json.loads(mock().chat(chat_call(max_tokens=2)))
    assert body["choices"][0]["finish_reason"] == "length"
    assert len(body["choices"][0]["message"]["content"].split()) == 2
    assert body["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("body", [{}, {"messages": []}, {"messages": "hi"}])
def test_chat_needs_messages(body: dict[str, Any]) -> None:
    with pytest.raises(InvalidParam) as info:
        mock().chat(make_call("chat", body))
    assert info.value.param == "messages"


@pytest.mark.parametrize("count", [1, 2, 3, 8, 40])
@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_chunks(count: int, include_usage: bool) -> None:
    provider = mock(chunk_count=count)
    call = make_call("chat", dict(chat_call().body), stream=True, include_usage=include_usage)
    chunks = [json.loads(c) for c in provider.chat_chunks(call)]
    assert len(chunks) == count + include_usage
    content = [c for c in chunks if c["choices"]]
    assert len(content) == count
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None] * (count - 1) + ["stop"]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in content)
    whole = json.loads(provider.chat(call))
    assert text == whole["choices"][0]["message"]["content"]
    assert {c["id"] for c in chunks} == {whole["id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"] == whole["usage"]
        assert all(c["usage"] is None for c in content)
    else:
        assert all("usage" not in c for c in chunks)


def test_mock_stream_survives_the_relay_untouched() -> None:
    call = make_call("chat", dict(chat_call().body), stream=True, include_usage=True)
    chunks = mock().chat_chunks(call)
    assert relay(chunks) == chunks


# -- tools ----------------------------------------------------------------------------------

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}},
    {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}},
]


@pytest.mark.parametrize(
    ("tool_choice", "name"),
    [
        ({}, "get_weather"),
        ({"tool_choice": "auto"}, "get_weather"),
        ({"tool_choice": "required"}, "get_weather"),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "get_time"),
    ],
)
def test_tool_call(tool_choice: dict[str, Any], name: str) -> None:
    body = json.loads(mock().chat(chat_call(tools=TOOLS, **tool_choice)))
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None
    [tool_call] = choice["message"]["tool_calls"]
    assert tool_call["type"] == "function"
    assert tool_call["id"].startswith("call_mock_")
    assert tool_call["function"] == {"name": name, "arguments": "{}"}


def test_tool_choice_none_answers_with_text() -> None:
    body = json.loads(mock().chat(chat_call(tools=TOOLS, tool_choice="none")))
    assert body["choices"][0]["message"]["content"].startswith("Mock reply")
    assert "tool_calls" not in body["choices"][0]["message"]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 8])
def test_tool_call_stream(count: int) -> None:
    provider = mock(chunk_count=count)
    call = make_call("chat", dict(chat_call(tools=TOOLS).body), stream=True)
    chunks = [json.loads(c) for c in provider.chat_chunks(call)]
    assert len(chunks) == count
    deltas = [c["choices"][0]["delta"] for c in chunks]
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert calls[0]["id"].startswith("call_mock_")
    assert calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and "name" not in c["function"] for c in calls[1:])
    assert "".join(c["function"]["arguments"] for c in calls) == "{}"
    assert {c["index"] for c in calls} == {0}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# -- legacy completions ---------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Say this is a test", ["a", "b"], [1, 2, 3], [[1], [2, 3]]])
def test_completion(prompt: object) -> None:
    body = json.loads(mock().completion(make_call("completions", {"prompt": prompt})))
    golden = json.loads((DATA / "completion_response.json").read_bytes())
    assert keys(body) == keys(golden)
    assert body["object"] == "text_completion"
    assert body["id"].startswith("cmpl-mock-")
    [choice] = body["choices"]
    assert keys(choice) == keys(golden["choices"][0])
    assert choice["text"].startswith("Mock reply #")
    assert choice["logprobs"] is None


@pytest.mark.parametrize("count", [1, 2, 8])
def test_completion_chunks(count: int) -> None:
    provider = mock(chunk_count=count)
    call = make_call("completions", {"prompt": "hi there"}, stream=True, include_usage=True)
    chunks = [json.loads(c) for c in provider.completion_chunks(call)]
    assert len(chunks) == count + 1
    whole = json.loads(provider.completion(call))
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1] == {**chunks[-1], "choices": [], "usage": whole["usage"]}
    assert {c["object"] for c in chunks} == {"text_completion"}


@pytest.mark.parametrize("prompt", [None, 3, [], [1, "a"]])
def test_completion_rejects_bad_prompts(prompt: object) -> None:
    with pytest.raises(InvalidParam) as info:
        mock().completion(make_call("completions", {"prompt": prompt}))
    assert info.value.param == "prompt"


# -- embeddings -----------------------------------------------------------------------------


def embed(**body: Any) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(mock().embeddings(make_call("embeddings", body)))
    return result


@pytest.mark.parametrize(
    ("value", "count", "tokens"),
    [
        ("The food was delicious", 1, 4),
        (["one", "two words", "three more words"], 3, 6),
        ([101, 2023, 2003], 1, 3),
        ([[101, 2023], [7, 8, 9]], 2, 5),
    ],
)
def test_embedding_input_shapes(value: object, count: int, tokens: int) -> None:
    body = embed(input=value)
    golden = json.loads((DATA / "embeddings_response.json").read_bytes())
    assert keys(body) == keys(golden)
    assert [d["index"] for d in body["data"]] == list(range(count))
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    for item in body["data"]:
        assert keys(item) == keys(golden["data"][0])
        assert len(item["embedding"]) == 16
        assert math.isclose(math.hypot(*item["embedding"]), 1.0, abs_tol=1e-5)


def test_embeddings_are_deterministic_per_input() -> None:
    a = embed(input=["same", "other"])["data"]
    b = embed(input="same")["data"]
    assert a[0]["embedding"] == b[0]["embedding"]
    assert a[0]["embedding"] != a[1]["embedding"]


def test_dimensions_and_base64() -> None:
    floats = embed(input="x", dimensions=256)["data"][0]["embedding"]
    assert len(floats) == 256
    packed = base64.b64decode(
        embed(input="x", dimensions=256, encoding_format="base64")["data"][0]["embedding"]
    )
    assert list(struct.unpack("<256f", packed)) == floats


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": []}, "input"),
        ({"input": [1, "a"]}, "input"),
        ({"input": [[1], "a"]}, "input"),
        ({"input": 5}, "input"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": "8"}, "dimensions"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_embedding_errors(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        embed(**body)
    assert info.value.param == param


# -- dispatch and settings ------------------------------------------------------------------


def test_respond_and_chunks_dispatch_by_endpoint() -> None:
    provider = mock()
    assert provider.respond(chat_call()) == provider.chat(chat_call())
    completion = make_call("completions", {"prompt": "p"})
    assert provider.chunks(completion) == provider.completion_chunks(completion)
    with pytest.raises(InvalidParam):
        provider.chunks(make_call("embeddings", {"input": "x"}))


@pytest.mark.parametrize(
    "settings",
    [{"chunk_count": 0}, {"embedding_dim": 0}, {"latency_ms": -1}, {"chunk_interval_ms": -0.5}],
)
def test_settings_are_validated(settings: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="must be"):
        MockSettings(**settings)
