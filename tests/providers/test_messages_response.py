"""Whole OpenAI answers -> Anthropic Messages, and the SSE frame helpers. No I/O.

Golden files in ``tests/data/messages_response/whole/*.json``: ``{"openai": <a
chat.completion>, "anthropic": <the Message it must become>}``. Every output is also read
back with the official ``anthropic`` SDK's ``Message`` model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic.types
import pytest

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_frames import PING, frame, frame_obj
from runestone_proxy.providers.messages_response import (
    RAW_ARGUMENTS_KEY,
    STOP_REASONS,
    chat_to_message,
    message_id,
    stop_reason,
    tool_input,
    usage_to_anthropic,
)

DATA = Path(__file__).parent.parent / "data" / "messages_response" / "whole"
MODEL = "claude-sonnet-4-5"
NAMES = sorted(p.stem for p in DATA.glob("*.json"))


def load(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


@pytest.mark.parametrize("name", NAMES)
def test_golden(name: str) -> None:
    doc = load(name)
    out = chat_to_message(dumps(doc["openai"]), model=MODEL)
    assert json.loads(out) == doc["anthropic"]
    assert out == dumps(doc["anthropic"])  # compact, and the documented key order
    message = anthropic.types.Message.model_validate_json(out)
    assert message.model == MODEL


def test_golden_covers_the_brief() -> None:
    assert {"text", "tools_parallel", "reasoning_text_tool", "refusal", "length"} <= set(NAMES)


def test_id_is_stable_and_safe() -> None:
    body = dumps(load("text")["openai"])
    first = json.loads(chat_to_message(body, model=MODEL))["id"]
    assert first == json.loads(chat_to_message(body, model=MODEL))["id"]
    assert message_id("chatcmpl-a/b c:d", b"") == "msg_chatcmpl-abcd"
    assert message_id(None, b"x") == message_id("", b"x") == message_id("//", b"x")
    assert message_id(None, b"x") != message_id(None, b"y")
    assert message_id(None, b"x").startswith("msg_")


@pytest.mark.parametrize(("finish", "expected"), sorted(STOP_REASONS.items()))
def test_stop_reasons_table(finish: str, expected: str) -> None:
    assert stop_reason(finish, None, tools=False, refused=False) == (expected, None)


@pytest.mark.parametrize(
    ("finish", "matched", "tools", "refused", "expected"),
    [
        (None, None, False, False, ("end_turn", None)),
        ("eos", None, False, False, ("end_turn", None)),  # a server's own value
        ("stop", None, True, False, ("tool_use", None)),  # tools called, "stop" said
        ("length", None, True, False, ("max_tokens", None)),  # cut inside a tool call
        ("stop", "###", False, False, ("stop_sequence", "###")),  # vLLM: the string matched
        ("stop", 128001, False, False, ("end_turn", None)),  # vLLM: a stop token id
        ("length", "###", False, False, ("max_tokens", None)),
        ("stop", None, False, True, ("refusal", None)),
        ("tool_calls", None, True, True, ("refusal", None)),
    ],
)
def test_stop_reason_refinements(
    finish: Any, matched: Any, tools: bool, refused: bool, expected: tuple[str, str | None]
) -> None:
    assert stop_reason(finish, matched, tools=tools, refused=refused) == expected


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ('{"a": 1}', {"a": 1}),
        ("", {}),
        ("   ", {}),
        (None, {}),
        ({"a": 1}, {"a": 1}),  # a server that sends the object itself
        ('{"a": ', {RAW_ARGUMENTS_KEY: '{"a": '}),
        ("[1]", {RAW_ARGUMENTS_KEY: "[1]"}),
        ('"text"', {RAW_ARGUMENTS_KEY: '"text"'}),
        ("[" * 100_000, {RAW_ARGUMENTS_KEY: "[" * 100_000}),  # too deep for json: kept
    ],
)
def test_tool_input(arguments: Any, expected: dict[str, Any]) -> None:
    assert tool_input(arguments) == expected


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, (0, 0, 0)),
        ({"prompt_tokens": 10, "completion_tokens": 3}, (10, 3, 0)),
        ({"prompt_tokens": 10, "prompt_tokens_details": {"cached_tokens": 4}}, (6, 0, 4)),
        ({"prompt_tokens": 10, "prompt_tokens_details": None}, (10, 0, 0)),
        ({"prompt_tokens": 10, "prompt_cache_hit_tokens": 7}, (3, 0, 7)),  # DeepSeek
        ({"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}}, (0, 0, 2)),
        ({"prompt_tokens": True, "completion_tokens": -1}, (0, 0, 0)),
    ],
)
def test_usage(usage: Any, expected: tuple[int, int, int]) -> None:
    out = usage_to_anthropic(usage)
    got = (out["input_tokens"], out["output_tokens"], out["cache_read_input_tokens"])
    assert got == expected
    assert out["cache_creation_input_tokens"] == 0


@pytest.mark.parametrize(
    ("body", "status", "error_type"),
    [
        (
            {"error": {"message": "Rate limit", "type": "requests", "code": "rate_limit_exceeded"}},
            429,
            "requests",
        ),
        ({"error": {"message": "No endpoints", "code": 503}}, 503, "server_error"),
        ({"object": "error", "message": "bad", "type": "BadRequestError", "code": 400}, 400, None),
    ],
)
def test_error_body_raises(body: dict[str, Any], status: int, error_type: str | None) -> None:
    with pytest.raises(ProviderError) as info:
        chat_to_message(dumps(body), model=MODEL)
    assert info.value.status == status
    if error_type is not None:
        assert info.value.error_type == error_type


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        b'{"choices": []}',
        b'{"id": "x"}',
        b'{"choices": [{"index": 1, "message": {"content": "x"}}]}',
        b'{"choices": [{"index": 0, "message": "x"}]}',
    ],
)
def test_not_a_completion(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        chat_to_message(body, model=MODEL)


def test_only_choice_zero() -> None:
    choice = {"message": {"content": "zero"}, "finish_reason": "stop"}
    body = {"id": "c", "choices": [{"index": 1, "message": {"content": "one"}}, choice]}
    out = json.loads(chat_to_message(dumps(body), model=MODEL))
    assert out["content"] == [{"type": "text", "text": "zero"}]


def test_lone_surrogate_survives() -> None:
    message = b'{"content":"a\\ud800b"}'
    body = b'{"id":"c","choices":[{"index":0,"message":' + message + b',"finish_reason":"stop"}]}'
    out = chat_to_message(body, model=MODEL)
    assert json.loads(out)["content"][0]["text"] == "a\ud800b"


# --- frames ------------------------------------------------------------------------------


def test_frame() -> None:
    assert frame("ping", b'{"type":"ping"}') == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert PING == b'event: ping\ndata: {"type":"ping"}\n\n'


def test_frame_obj_is_compact_and_one_line() -> None:
    obj = {"type": "content_block_delta", "index": 0, "delta": {"text": "a\nb é"}}
    out = frame_obj(obj)
    assert out == b"event: content_block_delta\ndata: " + dumps(obj) + b"\n\n"
    assert out.count(b"\n") == 3
    assert b", " not in out
    assert b": " not in out.split(b"\n")[1][6:]
