"""Anthropic Messages request -> OpenAI chat body (``providers/messages_request``). No I/O.

    tests/data/messages_request/*.json    {"doc", "anthropic": <Messages body>,
                                           "openai": <the chat body it must become>}

Each fate in ``FIELD_FATES`` has a test here; the top-level ``dropped`` and ``refused``
fates are checked straight from the table. Plain data only: no sockets, no event loop.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.base import RUNESTONE_FIELDS
from runestone_proxy.providers.messages_request import (
    ATTACHMENTS_ONLY,
    ESTIMATE_METHOD,
    FIELD_FATES,
    IMAGE_TOKENS,
    MESSAGE_OVERHEAD_TOKENS,
    estimate_input_tokens,
    messages_to_chat,
)

DATA = Path(__file__).parent.parent / "data" / "messages_request"
EPH = {"type": "ephemeral"}
PNG = {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}


def body(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "max_tokens": 64, "messages": list(messages) or [user("hi")], **fields}


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content}


def text(t: str, **extra: Any) -> dict[str, Any]:
    return {"type": "text", "text": t, **extra}


def tool_use(id_: str, name: str = "f", args: Any = None) -> dict[str, Any]:
    return {"type": "tool_use", "id": id_, "name": name, "input": args or {}}


def refused(b: dict[str, Any]) -> InvalidParam:
    with pytest.raises(InvalidParam) as info:
        messages_to_chat(b)
    assert info.value.status == 400
    return info.value


def chat_messages(*messages: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = messages_to_chat(body(*messages, **fields))["messages"]
    return out


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    before = copy.deepcopy(case["anthropic"])
    out = messages_to_chat(case["anthropic"])
    assert out == case["openai"]
    assert case["anthropic"] == before  # the input is never changed
    json.dumps(out, allow_nan=False)


def test_golden_claude_code_covers_the_brief() -> None:
    case = json.loads((DATA / "claude_code.json").read_text())["anthropic"]
    assert case["max_tokens"] == 128000
    assert all("cache_control" in b for b in case["system"][1:])
    assert sum(bool(t.get("defer_loading")) for t in case["tools"]) >= 3
    assert len(case["tools"]) >= 12
    assert json.loads(case["metadata"]["user_id"])["session_id"]
    assert case["context_management"]
    assert case["thinking"]["type"] == "enabled"


# --- the fates table ------------------------------------------------------------------------

KINDS = ("mapped", "copied", "dropped", "refused")
TOP_LEVEL = {k: v for k, v in FIELD_FATES.items() if k.isidentifier()}
#: A realistic value for every top-level field the table drops or refuses.
SAMPLES: dict[str, Any] = {
    "top_k": 40,
    "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
    "container": "container_011CPR5CNjB747bTd36fQLFk",
    "mcp_servers": [{"type": "url", "url": "https://mcp.example.com/sse", "name": "example"}],
    "service_tier": "standard_only",
    "speed": "fast",
    "inference_geo": "eu",
    "betas": ["context-management-2025-06-27"],
    "cache_control": EPH,
    "diagnostics": {"previous_message_id": None},
    "user_profile_id": "up_1",
    "workspace_id": "wrkspc_1",
}


def test_every_fate_names_its_kind() -> None:
    for field, fate in FIELD_FATES.items():
        assert fate.split(":")[0].split(";")[0] in KINDS, field


def test_every_dropped_or_refused_field_has_a_sample() -> None:
    settled = {k for k, v in TOP_LEVEL.items() if v.startswith(("dropped", "refused"))}
    assert settled == set(SAMPLES)


@pytest.mark.parametrize("field", sorted(SAMPLES))
def test_top_level_fate_is_what_the_table_says(field: str) -> None:
    plain = body()
    if TOP_LEVEL[field].startswith("dropped"):
        assert messages_to_chat({**plain, field: SAMPLES[field]}) == messages_to_chat(plain)
    else:
        assert refused({**plain, field: SAMPLES[field]}).param == field
        # an empty value asks for nothing
        assert messages_to_chat({**plain, field: []}) == messages_to_chat(plain)


def test_unknown_and_runestone_fields_are_not_copied() -> None:
    plain = messages_to_chat(body())
    extra = dict.fromkeys(RUNESTONE_FIELDS, "x") | {"brand_new_field": {"a": 1}}
    assert messages_to_chat({**body(), **extra}) == plain


# --- top-level parameters -------------------------------------------------------------------


def test_parameters() -> None:
    out = messages_to_chat(
        body(temperature=0, top_p=1, stop_sequences=["###"], metadata={"user_id": "u1"})
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 0,
        "top_p": 1,
        "stop": ["###"],
        "user": "u1",
    }


def test_no_max_tokens_no_stop_when_empty() -> None:
    b = body(stop_sequences=[], metadata={})
    del b["max_tokens"]  # count_tokens bodies have none
    assert messages_to_chat(b) == {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_user_id_is_cut_to_256_characters() -> None:
    long = json.dumps({"device_id": "d" * 300, "session_id": "s"})
    assert messages_to_chat(body(metadata={"user_id": long}))["user"] == long[:256]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (True, {"stream": True, "stream_options": {"include_usage": True}}),
        (False, {"stream": False}),
    ],
)
def test_stream(stream: bool, expected: dict[str, Any]) -> None:
    out = messages_to_chat(body(stream=stream))
    assert {k: out[k] for k in out if k.startswith("stream")} == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 3}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"temperature": 1.5}, "temperature"),
        ({"top_p": "0.5"}, "top_p"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"metadata": "u"}, "metadata"),
        ({"metadata": {"user_id": 7}}, "metadata.user_id"),
        ({"stream": "yes"}, "stream"),
        ({"system": 3}, "system"),
        ({"system": [{"type": "image", "source": PNG}]}, "system[0]"),
        ({"system": [{"type": "text"}]}, "system[0].text"),
    ],
)
def test_bad_top_level_values(fields: dict[str, Any], param: str) -> None:
    assert refused({**body(), **fields}).param == param


# --- thinking, effort and structured output --------------------------------------------------


@pytest.mark.parametrize(
    ("budget", "effort"),
    [(1024, "low"), (4095, "low"), (4096, "medium"), (16383, "medium"), (16384, "high")],
)
def test_thinking_budget_to_effort(budget: int, effort: str) -> None:
    out = messages_to_chat(body(thinking={"type": "enabled", "budget_tokens": budget}))
    assert out["reasoning_effort"] == effort


@pytest.mark.parametrize(
    ("thinking", "effort", "expected"),
    [
        ({"type": "adaptive"}, "low", "low"),
        ({"type": "adaptive"}, "medium", "medium"),
        ({"type": "adaptive"}, "high", "high"),
        ({"type": "adaptive"}, "xhigh", "high"),
        ({"type": "adaptive"}, "max", "high"),
        ({"type": "adaptive"}, None, None),
        ({"type": "disabled"}, "high", None),
        (None, "low", "low"),
        ({"type": "enabled", "budget_tokens": 20000}, "low", "low"),  # explicit effort wins
    ],
)
def test_effort(thinking: Any, effort: str | None, expected: str | None) -> None:
    fields: dict[str, Any] = {"output_config": {"effort": effort}}
    if thinking is not None:
        fields["thinking"] = thinking
    assert messages_to_chat(body(**fields)).get("reasoning_effort") == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"thinking": "on"}, "thinking"),
        ({"thinking": {"type": "sometimes"}}, "thinking.type"),
        ({"thinking": {"type": "enabled"}}, "thinking"),
        ({"thinking": {"type": "enabled", "budget_tokens": -1}}, "thinking.budget_tokens"),
        ({"output_config": {"effort": "extreme"}}, "output_config.effort"),
        ({"output_config": []}, "output_config"),
        ({"output_config": {"format": {"type": "xml"}}}, "output_config.format"),
        ({"output_config": {"format": {"type": "json_schema"}}}, "output_config.format.schema"),
        ({"output_format": {"type": "regex"}}, "output_format"),
    ],
)
def test_bad_thinking_and_output_config(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


@pytest.mark.parametrize("field", ["output_config", "output_format"])
def test_structured_output(field: str) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    fmt = {"type": "json_schema", "schema": schema}
    value = {"format": fmt} if field == "output_config" else fmt
    assert messages_to_chat(body(**{field: value}))["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "output", "schema": schema, "strict": True},
    }


# --- tools ----------------------------------------------------------------------------------

SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}


def test_custom_tool() -> None:
    tool = {
        "name": "search",
        "description": "Search",
        "input_schema": SCHEMA,
        "strict": True,
        "cache_control": EPH,
        "defer_loading": True,
        "input_examples": [{"q": "x"}],
        "eager_input_streaming": True,
        "allowed_callers": ["direct"],
        "type": "custom",
    }
    assert messages_to_chat(body(tools=[tool]))["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "search",
                "description": "Search",
                "parameters": SCHEMA,
                "strict": True,
            },
        }
    ]


@pytest.mark.parametrize(
    "tool",
    [
        {"type": "web_search_20250305", "name": "web_search", "max_uses": 5},
        {"type": "bash_20250124", "name": "bash"},
        {"type": "text_editor_20250728", "name": "str_replace_based_edit_tool"},
        {"type": "computer_20250124", "name": "computer", "display_width_px": 1024},
        {"type": "code_execution_20250825", "name": "code_execution"},
        {"type": "web_fetch_20250910", "name": "web_fetch"},
        {"type": "memory_20250818", "name": "memory"},
        {"type": "mcp_toolset", "mcp_server_name": "x"},
    ],
)
def test_server_tools_are_refused(tool: dict[str, Any]) -> None:
    err = refused(body(tools=[{"name": "f", "input_schema": SCHEMA}, tool]))
    assert err.param == "tools[1]"
    assert tool["type"] in err.message


def test_tool_search_tool_is_dropped_and_no_tools_means_no_tool_fields() -> None:
    search = {"type": "tool_search_tool_bm25_20251119", "name": "tool_search_tool_bm25"}
    out = messages_to_chat(
        body(tools=[search], tool_choice={"type": "any", "disable_parallel_tool_use": True})
    )
    assert {"tools", "tool_choice", "parallel_tool_calls"}.isdisjoint(out)


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, {"tool_choice": "auto"}),
        ({"type": "any"}, {"tool_choice": "required"}),
        ({"type": "none"}, {"tool_choice": "none"}),
        (
            {"type": "tool", "name": "f"},
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        ),
        (
            {"type": "auto", "disable_parallel_tool_use": True},
            {"tool_choice": "auto", "parallel_tool_calls": False},
        ),
        ({"type": "auto", "disable_parallel_tool_use": False}, {"tool_choice": "auto"}),
    ],
)
def test_tool_choice(choice: dict[str, Any], expected: dict[str, Any]) -> None:
    out = messages_to_chat(body(tools=[{"name": "f", "input_schema": SCHEMA}], tool_choice=choice))
    assert {k: out[k] for k in ("tool_choice", "parallel_tool_calls") if k in out} == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": {}}, "tools"),
        ({"tools": ["f"]}, "tools[0]"),
        ({"tools": [{"input_schema": SCHEMA}]}, "tools[0].name"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        (
            {"tools": [{"name": "f", "input_schema": SCHEMA, "description": 1}]},
            "tools[0].description",
        ),
        ({"tools": [{"name": "f", "input_schema": SCHEMA, "strict": "yes"}]}, "tools[0].strict"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": {"type": "tool"}}, "tool_choice.name"),
        (
            {"tool_choice": {"type": "auto", "disable_parallel_tool_use": 1}},
            "tool_choice.disable_parallel_tool_use",
        ),
    ],
)
def test_bad_tools(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


# --- turns and blocks -----------------------------------------------------------------------


def test_system_blocks_are_joined_and_cache_control_dropped() -> None:
    system = [text("a", cache_control=EPH), text("b", citations=None)]
    assert chat_messages(system=system)[0] == {"role": "system", "content": "a\n\nb"}
    assert chat_messages(system="")[0]["role"] == "user"  # an empty system prompt is no message


def test_system_turn_stays_in_place() -> None:
    out = chat_messages(user("q"), {"role": "system", "content": [text("be brief")]}, user("r"))
    assert [m["role"] for m in out] == ["user", "system", "user"]
    assert out[1]["content"] == "be brief"


def test_user_blocks_keep_their_parts() -> None:
    out = chat_messages(user([text("a", cache_control=EPH), {"type": "image", "source": PNG}]))
    assert out == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "a"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        }
    ]


def test_assistant_texts_are_concatenated_and_thinking_dropped() -> None:
    turn = assistant(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            text("The grass is "),
            text("green", citations=[{"type": "char_location", "cited_text": "green"}]),
            {"type": "redacted_thinking", "data": "abc"},
        ]
    )
    assert chat_messages(user("q"), turn)[1] == {
        "role": "assistant",
        "content": "The grass is green",
    }


def test_assistant_turn_of_only_thinking_is_left_out() -> None:
    turn = assistant([{"type": "thinking", "thinking": "hmm", "signature": "sig"}])
    assert [m["role"] for m in chat_messages(user("q"), turn, user("r"))] == ["user", "user"]


def test_tool_use_arguments_are_compact_json() -> None:
    turn = assistant([tool_use("t1", "lookup", {"city": "Zürich", "n": [1, 2]})])
    call = chat_messages(user("q"), turn)[1]["tool_calls"][0]
    assert call == {
        "id": "t1",
        "type": "function",
        "function": {"name": "lookup", "arguments": '{"city":"Zürich","n":[1,2]}'},
    }


def test_tool_results_come_before_the_rest_of_the_turn() -> None:
    turn = user(
        [
            text("first"),
            {"type": "tool_result", "tool_use_id": "t1", "content": "one"},
            {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
            {"type": "tool_result", "tool_use_id": "t2", "content": [text("a"), text("b")]},
        ]
    )
    out = chat_messages(user("q"), assistant([tool_use("t1"), tool_use("t2")]), turn)[2:]
    assert out == [
        {"role": "tool", "tool_call_id": "t1", "content": "one"},
        {"role": "tool", "tool_call_id": "t2", "content": "a\n\nb"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "first"},
                {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
            ],
        },
    ]


@pytest.mark.parametrize(
    ("content", "expected"),
    [("boom", "Error: boom"), ([text("x"), text("y")], "Error: x\n\ny"), (None, "Error")],
)
def test_tool_result_error(content: Any, expected: str) -> None:
    result: dict[str, Any] = {"type": "tool_result", "tool_use_id": "t1", "is_error": True}
    if content is not None:
        result["content"] = content
    assert chat_messages(user([result]))[0] == {
        "role": "tool",
        "tool_call_id": "t1",
        "content": expected,
    }


def test_tool_result_media_open_the_next_user_message() -> None:
    pdf = {"type": "base64", "media_type": "application/pdf", "data": "JVBE"}
    result = {
        "type": "tool_result",
        "tool_use_id": "t1",
        "content": [
            {"type": "image", "source": PNG},
            {"type": "document", "source": pdf},
            {"type": "tool_reference", "tool_name": "other"},
        ],
    }
    out = chat_messages(user([result, text("go on")]))
    assert out[0] == {"role": "tool", "tool_call_id": "t1", "content": ATTACHMENTS_ONLY}
    assert [p["type"] for p in out[1]["content"]] == ["text", "image_url", "file", "text"]
    assert "t1" in out[1]["content"][0]["text"]
    assert out[1]["content"][3] == {"type": "text", "text": "go on"}


@pytest.mark.parametrize(
    ("source", "parts"),
    [
        (
            {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
            [
                {
                    "type": "file",
                    "file": {
                        "filename": "document.pdf",
                        "file_data": "data:application/pdf;base64,JVBE",
                    },
                }
            ],
        ),
        (
            {"type": "text", "media_type": "text/plain", "data": "plain"},
            [{"type": "text", "text": "plain"}],
        ),
        ({"type": "content", "content": "inline"}, [{"type": "text", "text": "inline"}]),
    ],
)
def test_documents(source: dict[str, Any], parts: list[dict[str, Any]]) -> None:
    doc = {"type": "document", "source": source, "cache_control": EPH}
    out = chat_messages(user([doc, text("?")]))[0]["content"]
    assert out == [*parts, {"type": "text", "text": "?"}]


@pytest.mark.parametrize(
    ("block", "param"),
    [
        ({"type": "document", "source": {"type": "url", "url": "https://x/a.pdf"}}, ".source"),
        ({"type": "document", "source": {"type": "file", "file_id": "file_1"}}, ".source"),
        (
            {
                "type": "document",
                "source": {"type": "base64", "media_type": "text/csv", "data": ""},
            },
            ".source.media_type",
        ),
        ({"type": "image", "source": {"type": "file", "file_id": "file_1"}}, ".source"),
        ({"type": "image", "source": {"type": "base64", "data": "AA"}}, ".source.media_type"),
        ({"type": "image", "source": "https://x/a.png"}, ".source"),
        ({"type": "image"}, ".source"),
        ({"type": "text", "text": 5}, ".text"),
        ({"type": "search_result", "title": "t", "source": "s"}, ".content"),
        ({"type": "tool_use", "id": "t", "name": "f", "input": {}}, ".type"),
        ({"type": "thinking", "thinking": "x", "signature": "s"}, ".type"),
        ({"type": "web_search_tool_result", "tool_use_id": "s", "content": []}, ".type"),
        ({"type": "container_upload", "file_id": "file_1"}, ".type"),
        ({"type": "hologram"}, ".type"),
        ({"type": "tool_result", "tool_use_id": "t", "content": [{"type": "tool_use"}]}, "x"),
        ({"type": "tool_result", "tool_use_id": "t", "is_error": "yes"}, ".is_error"),
        ({"type": "tool_result", "content": "x"}, ".tool_use_id"),
        ("text", ""),
        ({"text": "no type"}, ""),
    ],
)
def test_bad_user_blocks(block: Any, param: str) -> None:
    err = refused(body(user([text("ok"), block])))
    if param == "x":
        assert err.param == "messages[0].content[1].content[0].type"
    else:
        assert err.param == f"messages[0].content[1]{param}"


@pytest.mark.parametrize(
    ("block", "param"),
    [
        ({"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}, ".type"),
        (
            {"type": "mcp_tool_use", "id": "m", "name": "x", "server_name": "s", "input": {}},
            ".type",
        ),
        ({"type": "image", "source": PNG}, ".type"),
        ({"type": "tool_result", "tool_use_id": "t"}, ".type"),
        ({"type": "tool_use", "id": "t", "name": "f", "input": "{}"}, ".input"),
        ({"type": "tool_use", "name": "f", "input": {}}, ".id"),
    ],
)
def test_bad_assistant_blocks(block: Any, param: str) -> None:
    err = refused(body(user("q"), assistant([block])))
    assert err.param == f"messages[1].content[0]{param}"


def test_hosted_blocks_are_named() -> None:
    block = {"type": "server_tool_use", "id": "s", "name": "web_search", "input": {}}
    assert "server_tool_use" in refused(body(user("q"), assistant([block]))).message


@pytest.mark.parametrize(
    ("message", "param"),
    [
        ("hi", "messages[0]"),
        ({"role": "tool", "content": "x"}, "messages[0].role"),
        ({"role": "user", "content": 5}, "messages[0].content"),
        ({"role": "assistant", "content": None}, "messages[0].content"),
        (
            {"role": "system", "content": [{"type": "image", "source": PNG}]},
            "messages[0].content[0]",
        ),
    ],
)
def test_bad_turns(message: Any, param: str) -> None:
    assert refused(body(message)).param == param


# --- count_tokens estimate ------------------------------------------------------------------


def test_estimate_method() -> None:
    assert ESTIMATE_METHOD == "chars/4"


def test_estimate_counts_text_tools_and_images() -> None:
    b = body(
        user([text("a" * 10), {"type": "image", "source": PNG}]),
        assistant([tool_use("t1", "fn", {"k": 1})]),
        user([{"type": "tool_result", "tool_use_id": "t1", "content": "r" * 5}]),
        system="s" * 7,
        tools=[{"name": "fn", "description": "dd", "input_schema": {"type": "object"}}],
    )
    chars = 7 + 10 + (2 + len('{"k":1}')) + 5 + (2 + 2 + len('{"type":"object"}'))
    messages = 4  # system, user, assistant, tool
    expected = math.ceil(chars / 4) + MESSAGE_OVERHEAD_TOKENS * messages + IMAGE_TOKENS
    assert estimate_input_tokens(b) == expected


def test_estimate_of_the_claude_code_request_is_plausible() -> None:
    case = json.loads((DATA / "claude_code.json").read_text())["anthropic"]
    estimate = estimate_input_tokens(case)
    chars = len(json.dumps(case))
    assert chars / 8 < estimate < chars / 3


def test_estimate_validates_like_a_call() -> None:
    with pytest.raises(InvalidParam) as info:
        estimate_input_tokens(body(tools=[{"type": "bash_20250124", "name": "bash"}]))
    assert info.value.param == "tools[0]"


# --- property: any text-only conversation ---------------------------------------------------

TEXT = st.text(max_size=40)
BLOCKS = st.lists(
    st.builds(
        lambda t, cached: text(t, cache_control=EPH) if cached else text(t), TEXT, st.booleans()
    ),
    min_size=1,
    max_size=4,
)
TURN = st.tuples(st.sampled_from(["user", "assistant", "system"]), st.one_of(TEXT, BLOCKS))


def _flat(role: str, content: Any) -> Any:
    """What a text-only turn must become, as (role, content)."""
    if isinstance(content, str):
        return role, content
    texts = [b["text"] for b in content]
    if role == "system":
        return role, "\n\n".join(texts)
    if role == "assistant":
        return role, "".join(texts)
    if len(texts) == 1:
        return role, texts[0]
    return role, [{"type": "text", "text": t} for t in texts]


@settings(max_examples=200, derandomize=True)
@given(
    turns=st.lists(TURN, min_size=1, max_size=8),
    system=st.one_of(st.none(), TEXT, BLOCKS),
)
def test_text_conversations_translate_in_order(turns: list[Any], system: Any) -> None:
    b: dict[str, Any] = {
        "model": "m",
        "max_tokens": 10,
        "messages": [{"role": r, "content": c} for r, c in turns],
    }
    if system is not None:
        b["system"] = system
    out = messages_to_chat(b)
    expected = [_flat(r, c) for r, c in turns]
    if system is not None and (flat := _flat("system", system)[1]):
        expected.insert(0, ("system", flat))
    assert [(m["role"], m["content"]) for m in out["messages"]] == expected
    assert estimate_input_tokens(b) >= MESSAGE_OVERHEAD_TOKENS * len(expected)
