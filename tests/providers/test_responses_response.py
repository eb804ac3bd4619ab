"""Whole OpenAI chat answers -> Responses API objects (``chat_to_response``). No I/O.

Golden files in ``tests/data/responses_response/whole/*.json``: ``{"request": <the Responses
request>, "chat": <a chat.completion>, "response": <the Response it must become>}``. Every
output is also read back with the official ``openai`` SDK's ``Response`` model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from openai.types.responses import Response

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.responses_response import (
    ECHOED,
    INCOMPLETE_REASONS,
    call_id,
    chat_to_response,
    incomplete_reason,
    item_id,
    output_items,
    usage_to_responses,
)

DATA = Path(__file__).parent.parent / "data" / "responses_response" / "whole"
NAMES = sorted(p.stem for p in DATA.glob("*.json"))
RID = "resp_0123456789abcdef01234567"
CREATED = 1738960001


def load(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def convert(chat: dict[str, Any], request: dict[str, Any] | None = None) -> dict[str, Any]:
    out = chat_to_response(
        dumps(chat), request=request or {"model": "m"}, response_id=RID, created=CREATED
    )
    result: dict[str, Any] = json.loads(out)
    return result


def chat(message: dict[str, Any], finish: Any = "stop") -> dict[str, Any]:
    choice = {"index": 0, "message": {"role": "assistant", **message}, "finish_reason": finish}
    return {"id": "chatcmpl-1", "object": "chat.completion", "model": "up", "choices": [choice]}


@pytest.mark.parametrize("name", NAMES)
def test_golden(name: str) -> None:
    doc = load(name)
    out = chat_to_response(
        dumps(doc["chat"]), request=doc["request"], response_id=RID, created=CREATED
    )
    assert json.loads(out) == doc["response"]
    assert out == dumps(doc["response"])  # compact, and the documented key order
    response = Response.model_validate_json(out)
    assert response.id == RID
    assert "output_text" not in doc["response"]  # an SDK convenience, not a field
    message = doc["chat"]["choices"][0]["message"]
    if isinstance(message.get("content"), str):
        assert response.output_text == message["content"]


def test_golden_covers_the_brief() -> None:
    wanted = {"text", "tools_parallel", "reasoning_text_tool", "refusal", "length"}
    assert wanted | {"content_filter", "legacy_function_call"} <= set(NAMES)


def test_item_ids_follow_the_response_id_and_index() -> None:
    out = convert(chat({"reasoning_content": "r", "content": "t", "tool_calls": [{}, {}]}))
    assert [item["id"] for item in out["output"]] == [
        item_id("rs", RID, 0),
        item_id("msg", RID, 1),
        item_id("fc", RID, 2),
        item_id("fc", RID, 3),
    ]
    assert item_id("msg", RID, 1) == "msg_0123456789abcdef01234567_1"
    assert [item["call_id"] for item in out["output"][2:]] == [
        call_id(None, RID, 2),
        call_id("", RID, 3),
    ]
    assert call_id("call_x", RID, 2) == "call_x"


@pytest.mark.parametrize(("finish", "reason"), sorted(INCOMPLETE_REASONS.items()))
def test_incomplete_table(finish: str, reason: str) -> None:
    out = convert(chat({"content": "cut"}, finish))
    assert out["status"] == "incomplete"
    assert out["incomplete_details"] == {"reason": reason}
    assert out["output"][0]["status"] == "incomplete"


@pytest.mark.parametrize("finish", ["stop", "tool_calls", "function_call", None, "eos", 7])
def test_other_finishes_complete(finish: Any) -> None:
    assert incomplete_reason(finish) is None
    out = convert(chat({"content": "x"}, finish))
    assert (out["status"], out["incomplete_details"]) == ("completed", None)


def test_only_the_last_item_is_cut() -> None:
    calls = [{"id": f"c{n}", "function": {"name": "f", "arguments": "{"}} for n in range(2)]
    out = convert(chat({"content": "a", "tool_calls": calls}, "length"))
    assert [item["status"] for item in out["output"]] == ["completed", "completed", "incomplete"]
    reasoning_only = convert(chat({"reasoning": "thinking..."}, "length"))
    assert "status" not in reasoning_only["output"][0]


def test_text_and_refusal_share_one_message() -> None:
    (message,) = convert(chat({"content": "partly", "refusal": "no more"}))["output"]
    assert message["content"] == [
        {"type": "output_text", "text": "partly", "annotations": []},
        {"type": "refusal", "refusal": "no more"},
    ]


def test_arguments_as_an_object_become_text() -> None:
    items = output_items(
        {"tool_calls": [{"id": "c", "function": {"name": "f", "arguments": {"a": 1}}}]},
        RID,
        incomplete=False,
    )
    assert items[0]["arguments"] == '{"a":1}'


def test_echo_defaults_and_given_values() -> None:
    plain = convert(chat({"content": "x"}))
    for key, default in ECHOED.items():
        if default is ...:
            assert key not in plain
        else:
            assert plain[key] == default
    given = {key: f"given-{key}" for key in ECHOED}
    echoed = convert(chat({"content": "x"}), given)
    assert all(echoed[key] == value for key, value in given.items())
    assert echoed["model"] == "up"  # the upstream's answer names the model


def test_model_falls_back_to_the_request() -> None:
    body = chat({"content": "x"})
    del body["model"]
    assert convert(body, {"model": "asked"})["model"] == "asked"


@pytest.mark.parametrize(
    ("usage", "expected"),
    [
        (None, None),
        ("x", None),
        (
            {"prompt_tokens": 10, "completion_tokens": 3},
            (10, 0, 3, 0, 13),
        ),
        (
            {
                "prompt_tokens": 10,
                "completion_tokens": 30,
                "total_tokens": 40,
                "prompt_tokens_details": {"cached_tokens": 4},
                "completion_tokens_details": {"reasoning_tokens": 20},
            },
            (10, 4, 30, 20, 40),
        ),
        ({"prompt_tokens": 10, "prompt_cache_hit_tokens": 7}, (10, 7, 0, 0, 10)),  # DeepSeek
        ({"prompt_tokens": 2, "prompt_tokens_details": {"cached_tokens": 9}}, (2, 2, 0, 0, 2)),
        ({"prompt_tokens": True, "completion_tokens": -1}, (0, 0, 0, 0, 0)),
    ],
)
def test_usage(usage: Any, expected: tuple[int, ...] | None) -> None:
    out = usage_to_responses(usage)
    if expected is None:
        assert out is None
        return
    assert out is not None
    got = (
        out["input_tokens"],
        out["input_tokens_details"]["cached_tokens"],
        out["output_tokens"],
        out["output_tokens_details"]["reasoning_tokens"],
        out["total_tokens"],
    )
    assert got == expected


def test_error_in_body_raises_provider_error() -> None:
    body = {"error": {"message": "Rate limit", "type": "rate_limit_error", "code": 429}}
    with pytest.raises(ProviderError) as info:
        chat_to_response(dumps(body), request={}, response_id=RID, created=CREATED)
    assert info.value.status == 429


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[1]",
        b'{"choices": []}',
        b'{"choices": [{"index": 1, "message": {}}]}',
        b'{"choices": [{"index": 0}]}',
    ],
)
def test_not_a_chat_completion(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        chat_to_response(body, request={}, response_id=RID, created=CREATED)
