"""Legacy ``/v1/completions`` over chat-only providers: request, whole answer, stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runestone_proxy.errors import InvalidParam, UpstreamProtocolError
from runestone_proxy.protocol.sse import DONE, SSEEvent, SSEParser, encode_data
from runestone_proxy.providers.base import ProviderCall, StreamTranslator
from runestone_proxy.providers.completions import (
    ChatToTextStream,
    chat_to_text_completion,
    prompt_to_chat_body,
)
from runestone_proxy.providers.mock import MockProvider, MockSettings
from runestone_proxy.providers.openai import OpenAITranslator

DATA = Path(__file__).parent.parent / "data" / "openai"


def events(wire: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(wire) + parser.close()


def text_stream() -> ChatToTextStream:
    call = ProviderCall(endpoint="chat", body={}, model="m", stream=True)
    return ChatToTextStream(OpenAITranslator("openai").stream(call))


def run(stream: StreamTranslator, wire: bytes) -> list[dict[str, Any]]:
    out = [p for event in events(wire) for p in stream.feed(event)] + stream.finish()
    return [json.loads(p) for p in out]


# -- request --------------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["Say this is a test", ["Say this is a test"]])
def test_prompt_becomes_one_user_message(prompt: object) -> None:
    body = prompt_to_chat_body({"model": "gpt-4o-mini", "prompt": prompt})
    assert body == {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "Say this is a test"}],
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", 7),
        ("temperature", 0.0),
        ("top_p", 0.9),
        ("stop", ["\n", "END"]),
        ("n", 2),
        ("stream", True),
        ("stream_options", {"include_usage": True}),
        ("user", "user-1234"),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 0.5),
        ("seed", 42),
        ("some_future_field", {"kept": True}),
        ("echo", False),
        ("logprobs", None),
        ("best_of", 1),
    ],
)
def test_fields_are_carried(field: str, value: object) -> None:
    body = prompt_to_chat_body({"model": "m", "prompt": "p", field: value})
    if field in ("echo", "logprobs", "best_of"):
        assert field not in body  # completions-only, and harmless at these values
    else:
        assert body[field] == value


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": [[1, 2], [3]]}, "prompt"),
        ({"prompt": ["a", "b"]}, "prompt"),  # a batch: one choice per prompt
        ({}, "prompt"),
        ({"prompt": 3}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": "p", "echo": True}, "echo"),
        ({"prompt": "p", "suffix": "end"}, "suffix"),
        ({"prompt": "p", "best_of": 3}, "best_of"),
        ({"prompt": "p", "logprobs": 5}, "logprobs"),
    ],
)
def test_what_chat_cannot_express_is_refused(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        prompt_to_chat_body({"model": "m", **body})
    assert info.value.param == param
    assert info.value.http_status == 400


# -- whole answer ---------------------------------------------------------------------------


def test_chat_completion_becomes_text_completion() -> None:
    chat = json.loads((DATA / "chat_response.json").read_bytes())
    out = json.loads(chat_to_text_completion((DATA / "chat_response.json").read_bytes()))
    golden = json.loads((DATA / "completion_response.json").read_bytes())
    assert set(out) == set(golden)
    assert out["object"] == "text_completion"
    for key in ("id", "created", "model", "usage", "system_fingerprint"):
        assert out[key] == chat[key]
    assert out["choices"] == [
        {
            "text": "Hello! How can I assist you today?",
            "index": 0,
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]


def test_null_content_becomes_empty_text() -> None:
    chat = {
        "id": "x",
        "choices": [{"index": 0, "message": {"content": None}, "finish_reason": "length"}],
    }
    out = json.loads(chat_to_text_completion(json.dumps(chat).encode()))
    assert out["choices"][0]["text"] == ""


@pytest.mark.parametrize("body", [b"nope", b"[]", b'{"id":"x"}'])
def test_bad_chat_body_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        chat_to_text_completion(body)


# -- stream ---------------------------------------------------------------------------------


def test_stream_becomes_text_completion_chunks() -> None:
    stream = text_stream()
    chunks = run(stream, (DATA / "stream_text.sse").read_bytes())
    assert stream.done
    assert len(chunks) == 10  # the role-only first chunk says nothing to a completions client
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hello! How can I help you today? 😀"
    assert [c["choices"][0]["finish_reason"] for c in chunks][-2:] == [None, "stop"]
    assert all(c["choices"][0]["logprobs"] is None for c in chunks)


def test_usage_chunk_is_kept() -> None:
    call = ProviderCall(
        endpoint="chat",
        body={"messages": [{"role": "user", "content": "hi"}]},
        model="m",
        stream=True,
        include_usage=True,
    )
    mock_chunks = MockProvider(MockSettings(chunk_count=4), clock=lambda: 1).chat_chunks(call)
    wire = b"".join(encode_data(c) for c in mock_chunks) + DONE
    stream = ChatToTextStream(OpenAITranslator("mock", "generic").stream(call))
    chunks = run(stream, wire)
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == json.loads(mock_chunks[-1])["usage"]
    assert chunks[-1]["object"] == "text_completion"


def test_cut_stream_still_fails() -> None:
    whole = (DATA / "stream_text.sse").read_bytes().removesuffix(DONE)
    wire = whole[: whole.rindex(b"data: ")]  # cut before the chunk with the finish_reason
    with pytest.raises(UpstreamProtocolError):
        run(text_stream(), wire)


def test_finished_stream_without_done_ends() -> None:
    wire = (DATA / "stream_text.sse").read_bytes()
    assert run(text_stream(), wire.removesuffix(DONE)) == run(text_stream(), wire)
