"""OpenAI Responses request -> OpenAI chat body (``providers/responses_request``). No I/O.

    tests/data/responses_request/*.json   {"doc", "responses": <Responses body>,
                                           "openai": <the chat body it must become>}

Each fate in ``FIELD_FATES`` has a test here; the top-level ``dropped`` and ``refused``
fates are checked straight from the table. Plain data only: no sockets, no event loop.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.base import RUNESTONE_FIELDS
from runestone_proxy.providers.responses_items import ATTACHMENTS_ONLY, HOSTED_ITEMS
from runestone_proxy.providers.responses_request import (
    FIELD_FATES,
    input_items,
    output_to_input,
    responses_to_chat,
)

DATA = Path(__file__).parent.parent / "data" / "responses_request"
PNG = "data:image/png;base64,iVBORw0KGgo="
SCHEMA = {"type": "object", "properties": {"q": {"type": "string"}}}


def body(*items: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"model": "m", "input": list(items) if items else "hi", **fields}


def msg(role: str, content: Any, **extra: Any) -> dict[str, Any]:
    return {"type": "message", "role": role, "content": content, **extra}


def itext(t: str) -> dict[str, Any]:
    return {"type": "input_text", "text": t}


def otext(t: str) -> dict[str, Any]:
    return {"type": "output_text", "text": t, "annotations": []}


def call(call_id: str, name: str = "f", args: str = "{}") -> dict[str, Any]:
    return {"type": "function_call", "call_id": call_id, "name": name, "arguments": args}


def output(call_id: str, out: Any) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": out}


def fn_tool(name: str = "f", **extra: Any) -> dict[str, Any]:
    return {"type": "function", "name": name, "parameters": SCHEMA, **extra}


def refused(b: dict[str, Any]) -> InvalidParam:
    with pytest.raises(InvalidParam) as info:
        responses_to_chat(b)
    assert info.value.status == 400
    return info.value


def chat_messages(*items: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = responses_to_chat(body(*items, **fields))["messages"]
    return out


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DATA.glob("*.json")), ids=lambda p: p.stem)
def test_golden(path: Path) -> None:
    case = json.loads(path.read_text())
    before = copy.deepcopy(case["responses"])
    out = responses_to_chat(case["responses"])
    assert out == case["openai"]
    assert case["responses"] == before  # the input is never changed
    json.dumps(out, allow_nan=False)


def test_golden_agents_sdk_covers_the_brief() -> None:
    case = json.loads((DATA / "agents_sdk.json").read_text())["responses"]
    kinds = [item.get("type", "message") for item in case["input"]]
    assert {"function_call", "function_call_output", "reasoning", "message"} <= set(kinds)
    assert case["instructions"]
    assert case["text"]["format"]["type"] == "json_schema"
    assert case["reasoning"]["effort"]
    assert all(t["type"] == "function" for t in case["tools"])


# --- the fates table ------------------------------------------------------------------------

KINDS = ("mapped", "copied", "dropped", "refused")
TOP_LEVEL = {k: v for k, v in FIELD_FATES.items() if k.isidentifier()}
#: A realistic value for every top-level field the table drops or refuses.
SAMPLES: dict[str, Any] = {
    "stream_options": {"include_obfuscation": False},
    "max_tool_calls": 3,
    "metadata": {"session": "s-1"},
    "store": True,
    "previous_response_id": "resp_0123456789abcdef01234567",
    "include": ["reasoning.encrypted_content", "message.output_text.logprobs"],
    "truncation": "auto",
    "service_tier": "flex",
    "background": True,
    "background_options": {"completion_window": "2h"},
    "prompt": {"id": "pmpt_123", "version": "2", "variables": {"city": "Paris"}},
    "conversation": "conv_123",
    "top_logprobs": 5,
    "prompt_cache_key": "tenant-a",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit"},
    "context_management": [{"type": "compaction", "compact_threshold": 1000}],
    "moderation": {"model": "omni-moderation-latest"},
    "access_programs": {"cyber": "standard"},
    "image": {"context_compression": "auto"},
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
        assert responses_to_chat({**plain, field: SAMPLES[field]}) == responses_to_chat(plain)
    else:
        err = refused({**plain, field: SAMPLES[field]})
        assert err.param == field
        assert field in err.message
        # an empty value asks for nothing
        empties: tuple[Any, ...] = (None, False, [])
        for empty in empties:
            assert responses_to_chat({**plain, field: empty}) == responses_to_chat(plain)


def test_background_refusal_points_at_runestones_queue() -> None:
    assert "respond-async" in refused(body(background=True)).message


def test_unknown_and_runestone_fields_are_not_copied() -> None:
    plain = responses_to_chat(body())
    extra = dict.fromkeys(RUNESTONE_FIELDS, "x") | {"brand_new_field": {"a": 1}}
    assert responses_to_chat({**body(), **extra}) == plain


# --- top-level parameters -------------------------------------------------------------------


def test_parameters() -> None:
    out = responses_to_chat(
        body(instructions="be brief", max_output_tokens=64, temperature=1.5, top_p=0.5, user="u")
    )
    assert out == {
        "model": "m",
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}],
        "max_tokens": 64,
        "temperature": 1.5,
        "top_p": 0.5,
        "user": "u",
    }


def test_safety_identifier_is_the_user_and_wins() -> None:
    assert responses_to_chat(body(safety_identifier="s"))["user"] == "s"
    assert responses_to_chat(body(safety_identifier="s", user="u"))["user"] == "s"


def test_empty_instructions_are_no_message() -> None:
    assert chat_messages(instructions="") == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (True, {"stream": True, "stream_options": {"include_usage": True}}),
        (False, {"stream": False}),
    ],
)
def test_stream(stream: bool, expected: dict[str, Any]) -> None:
    out = responses_to_chat(body(stream=stream, stream_options={"include_obfuscation": True}))
    assert {k: out[k] for k in out if k.startswith("stream")} == expected


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": 3}, "model"),
        ({"input": []}, "input"),
        ({"input": None}, "input"),
        ({"input": {"role": "user"}}, "input"),
        ({"instructions": ["x"]}, "instructions"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": True}, "max_output_tokens"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": "0.5"}, "top_p"),
        ({"user": 7}, "user"),
        ({"safety_identifier": 7}, "safety_identifier"),
        ({"stream": "yes"}, "stream"),
        ({"reasoning": "high"}, "reasoning"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),
        ({"text": "json"}, "text"),
        ({"text": {"format": {"type": "xml"}}}, "text.format"),
        ({"text": {"format": "json_object"}}, "text.format"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": SCHEMA}}}, "text.format.name"),
        (
            {
                "text": {
                    "format": {"type": "json_schema", "name": "x", "schema": SCHEMA, "strict": 1}
                }
            },
            "text.format.strict",
        ),
    ],
)
def test_bad_top_level_values(fields: dict[str, Any], param: str) -> None:
    assert refused({**body(), **fields}).param == param


def test_instructions_alone_are_enough() -> None:
    b = {"model": "m", "instructions": "say hi"}
    assert responses_to_chat(b)["messages"] == [{"role": "system", "content": "say hi"}]


# --- reasoning and structured output --------------------------------------------------------


@pytest.mark.parametrize(
    ("effort", "expected"),
    [
        ("none", "none"),
        ("minimal", "minimal"),
        ("low", "low"),
        ("medium", "medium"),
        ("high", "high"),
        ("xhigh", "high"),
        ("max", "high"),
        (None, None),
    ],
)
def test_reasoning_effort(effort: str | None, expected: str | None) -> None:
    out = responses_to_chat(body(reasoning={"effort": effort, "summary": "detailed"}))
    assert out.get("reasoning_effort") == expected
    assert "reasoning" not in out  # summary and the object itself are dropped


def test_text_format_text_and_verbosity_are_nothing() -> None:
    plain = responses_to_chat(body())
    assert responses_to_chat(body(text={"format": {"type": "text"}, "verbosity": "low"})) == plain


def test_text_format_json_object() -> None:
    out = responses_to_chat(body(text={"format": {"type": "json_object"}}))
    assert out["response_format"] == {"type": "json_object"}


def test_text_format_json_schema() -> None:
    fmt = {
        "type": "json_schema",
        "name": "answer",
        "description": "The answer.",
        "schema": SCHEMA,
        "strict": True,
    }
    assert responses_to_chat(body(text={"format": fmt}))["response_format"] == {
        "type": "json_schema",
        "json_schema": {
            "name": "answer",
            "schema": SCHEMA,
            "strict": True,
            "description": "The answer.",
        },
    }


# --- tools ----------------------------------------------------------------------------------


def test_function_tool() -> None:
    tool = fn_tool("search", description="Search", strict=True)
    assert responses_to_chat(body(tools=[tool]))["tools"] == [
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
        {"type": "web_search"},
        {"type": "web_search_preview", "search_context_size": "low"},
        {"type": "file_search", "vector_store_ids": ["vs_1"]},
        {"type": "computer_use_preview", "display_width": 1024, "display_height": 768},
        {"type": "code_interpreter", "container": {"type": "auto"}},
        {"type": "image_generation"},
        {"type": "mcp", "server_label": "deepwiki", "server_url": "https://mcp.example.com"},
        {"type": "local_shell"},
        {"type": "custom", "name": "grammar_tool"},
        {"name": "untyped"},
    ],
)
def test_hosted_tools_are_refused(tool: dict[str, Any]) -> None:
    err = refused(body(tools=[fn_tool(), tool]))
    assert err.param == "tools[1]"
    assert repr(tool.get("type")) in err.message


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ("auto", {"tool_choice": "auto"}),
        ("none", {"tool_choice": "none"}),
        ("required", {"tool_choice": "required"}),
        (
            {"type": "function", "name": "f"},
            {"tool_choice": {"type": "function", "function": {"name": "f"}}},
        ),
    ],
)
def test_tool_choice(choice: Any, expected: dict[str, Any]) -> None:
    out = responses_to_chat(body(tools=[fn_tool()], tool_choice=choice))
    assert {k: out[k] for k in ("tool_choice",) if k in out} == expected


def test_allowed_tools_sends_only_those_tools() -> None:
    choice = {
        "type": "allowed_tools",
        "mode": "required",
        "tools": [{"type": "function", "name": "b"}],
    }
    out = responses_to_chat(body(tools=[fn_tool("a"), fn_tool("b")], tool_choice=choice))
    assert [t["function"]["name"] for t in out["tools"]] == ["b"]
    assert out["tool_choice"] == "required"


def test_parallel_tool_calls_copied_with_tools_only() -> None:
    with_tools = responses_to_chat(body(tools=[fn_tool()], parallel_tool_calls=False))
    assert with_tools["parallel_tool_calls"] is False
    bare = responses_to_chat(body(tool_choice="auto", parallel_tool_calls=True, tools=[]))
    assert {"tools", "tool_choice", "parallel_tool_calls"}.isdisjoint(bare)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tools": {}}, "tools"),
        ({"tools": ["f"]}, "tools[0]"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [fn_tool(parameters="{}")]}, "tools[0].parameters"),
        ({"tools": [fn_tool(description=1)]}, "tools[0].description"),
        ({"tools": [fn_tool(strict="yes")]}, "tools[0].strict"),
        ({"tool_choice": "any"}, "tool_choice"),
        ({"tool_choice": {"name": "f"}}, "tool_choice"),
        ({"tool_choice": {"type": "function"}}, "tool_choice.name"),
        ({"tool_choice": {"type": "web_search_preview"}}, "tool_choice"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tool_choice": {"type": "mcp", "server_label": "x"}}, "tool_choice"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "x", "tools": []}}, "tool_choice.mode"),
        ({"tool_choice": {"type": "allowed_tools", "mode": "auto"}}, "tool_choice.tools"),
        (
            {"tool_choice": {"type": "allowed_tools", "mode": "auto", "tools": [{"type": "mcp"}]}},
            "tool_choice.tools[0]",
        ),
        ({"tools": [fn_tool()], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ],
)
def test_bad_tools(fields: dict[str, Any], param: str) -> None:
    assert refused(body(**fields)).param == param


# --- items ----------------------------------------------------------------------------------


def test_string_input_is_one_user_message() -> None:
    assert chat_messages() == [{"role": "user", "content": "hi"}]


def test_easy_input_message_and_roles() -> None:
    out = chat_messages(
        {"role": "developer", "content": "dev"},
        {"role": "system", "content": [itext("a"), itext("b")]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "r", "phase": "final_answer"},
    )
    assert out == [
        {"role": "system", "content": "dev"},
        {"role": "system", "content": "a\n\nb"},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "r"},
    ]


def test_assistant_parts_are_concatenated_refusal_included() -> None:
    turn = msg(
        "assistant",
        [otext("The grass "), {"type": "output_text", "text": "is green", "logprobs": []}],
        id="msg_1",
        status="completed",
    )
    refusal = msg("assistant", [{"type": "refusal", "refusal": "I can't help with that."}])
    out = chat_messages(msg("user", "q"), turn, refusal)
    assert out[1:] == [
        {"role": "assistant", "content": "The grass is green"},
        {"role": "assistant", "content": "I can't help with that."},
    ]


def test_function_calls_join_the_assistant_message_before_them() -> None:
    out = chat_messages(
        msg("user", "q"),
        msg("assistant", [otext("Let me look.")]),
        {"type": "reasoning", "id": "rs_1", "summary": []},
        call("c1", "lookup", '{"city":"Zürich"}'),
        call("c2"),
        output("c1", "one"),
        output("c2", "two"),
        call("c3"),
    )
    assert out[1] == {
        "role": "assistant",
        "content": "Let me look.",
        "tool_calls": [
            {
                "id": "c1",
                "type": "function",
                "function": {"name": "lookup", "arguments": '{"city":"Zürich"}'},
            },
            {"id": "c2", "type": "function", "function": {"name": "f", "arguments": "{}"}},
        ],
    }
    assert out[2:4] == [
        {"role": "tool", "tool_call_id": "c1", "content": "one"},
        {"role": "tool", "tool_call_id": "c2", "content": "two"},
    ]
    assert out[4] == {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c3", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        ],
    }


def test_reasoning_items_are_dropped() -> None:
    reasoning = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "thinking"}],
        "encrypted_content": "gAAA",
    }
    assert chat_messages(msg("user", "q"), reasoning) == [{"role": "user", "content": "q"}]


def test_function_call_output_parts() -> None:
    out = chat_messages(
        call("c1"),
        output("c1", [itext("a"), {"type": "input_image", "image_url": PNG}]),
        call("c2"),
        output("c2", []),
    )
    assert out[1] == {"role": "tool", "tool_call_id": "c1", "content": "a"}
    assert out[2]["role"] == "user"
    assert out[2]["content"][0]["text"] == "Attachments returned by tool call c1:"
    assert out[2]["content"][1] == {"type": "image_url", "image_url": {"url": PNG}}
    assert out[3]["tool_calls"][0]["id"] == "c2"
    assert out[4] == {"role": "tool", "tool_call_id": "c2", "content": ""}


def test_tool_media_wait_for_the_run_of_tool_messages() -> None:
    pdf = {"type": "input_file", "file_data": "data:application/pdf;base64,JVBE"}
    out = chat_messages(call("c1"), call("c2"), output("c1", [pdf]), output("c2", "ok"))
    assert [m["role"] for m in out] == ["assistant", "tool", "tool", "user"]
    assert out[1]["content"] == ATTACHMENTS_ONLY
    assert out[3]["content"][1] == {
        "type": "file",
        "file": {"filename": "document.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }


def test_user_parts() -> None:
    out = chat_messages(
        msg(
            "user",
            [
                itext("look"),
                {"type": "input_image", "image_url": "https://x/a.png", "detail": "low"},
                {"type": "input_image", "image_url": PNG, "detail": "original"},
                {"type": "input_file", "filename": "a.pdf", "file_data": "data:x;base64,AA"},
            ],
        )
    )
    assert out[0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": PNG}},
        {"type": "file", "file": {"filename": "a.pdf", "file_data": "data:x;base64,AA"}},
    ]


def test_a_lone_text_part_is_string_content() -> None:
    assert chat_messages(msg("user", [itext("q")])) == [{"role": "user", "content": "q"}]


@pytest.mark.parametrize("kind", sorted(HOSTED_ITEMS | {"future_tool_call", "mcp_future"}))
def test_hosted_tool_items_are_refused_by_name(kind: str) -> None:
    err = refused(body(msg("user", "q"), {"type": kind, "id": "x_1"}))
    assert err.param == "input[1].type"
    assert kind in err.message


def test_item_reference_is_refused() -> None:
    err = refused(body(msg("user", "q"), {"type": "item_reference", "id": "msg_1"}))
    assert err.param == "input[1].type"
    assert "previous_response_id" in err.message


@pytest.mark.parametrize(
    ("item", "param"),
    [
        ("hi", "input[1]"),
        ({"id": "msg_1"}, "input[1]"),
        ({"type": 3}, "input[1]"),
        ({"type": "hologram"}, "input[1].type"),
        (msg("tool", "x"), "input[1].role"),
        (msg("user", 5), "input[1].content"),
        (msg("user", ["x"]), "input[1].content[0]"),
        (msg("user", [otext("x")]), "input[1].content[0].type"),
        (msg("user", [{"type": "input_audio"}]), "input[1].content[0].type"),
        (msg("user", [{"type": "input_text", "text": 1}]), "input[1].content[0].text"),
        (
            msg("user", [{"type": "input_image", "file_id": "file_1"}]),
            "input[1].content[0].file_id",
        ),
        (msg("user", [{"type": "input_image"}]), "input[1].content[0].image_url"),
        (
            msg("user", [{"type": "input_image", "image_url": PNG, "detail": 1}]),
            "input[1].content[0].detail",
        ),
        (
            msg("user", [{"type": "input_file", "file_id": "file_1"}]),
            "input[1].content[0].file_id",
        ),
        (
            msg("user", [{"type": "input_file", "file_url": "https://x/a.pdf"}]),
            "input[1].content[0].file_url",
        ),
        (
            msg("user", [{"type": "input_file", "file_data": "AA", "filename": 1}]),
            "input[1].content[0].filename",
        ),
        (msg("system", [{"type": "input_image", "image_url": PNG}]), "input[1].content[0].type"),
        (msg("assistant", [{"type": "input_image", "image_url": PNG}]), "input[1].content[0].type"),
        (msg("assistant", [{"type": "refusal"}]), "input[1].content[0].refusal"),
        (msg("assistant", None), "input[1].content"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[1].call_id"),
        ({"type": "function_call", "call_id": "c", "arguments": "{}"}, "input[1].name"),
        (
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": {}},
            "input[1].arguments",
        ),
        ({"type": "function_call_output", "output": "x"}, "input[1].call_id"),
        (output("c", None), "input[1].output"),
        (output("c", [otext("x")]), "input[1].output[0].type"),
    ],
)
def test_bad_items(item: Any, param: str) -> None:
    assert refused(body(msg("user", "q"), item)).param == param


# --- conversation state helpers -------------------------------------------------------------


def test_input_items_of_a_string() -> None:
    assert input_items({"input": "hello"}) == [
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hello"}]}
    ]


def test_input_items_of_a_list_are_copies() -> None:
    items = [{"type": "message", "role": "user", "content": "q"}, call("c1")]
    out = input_items({"input": items})
    assert out == items
    out[0]["content"] = "changed"
    assert items[0]["content"] == "q"


@pytest.mark.parametrize(
    ("role", "part"),
    [("user", "input_text"), ("system", "input_text"), ("assistant", "output_text")],
)
def test_input_items_list_a_short_form_message_as_a_message_item(role: str, part: str) -> None:
    """As OpenAI lists it: ``type`` message, the text as one part of the role's kind."""
    out = input_items({"input": [{"role": role, "content": "q"}]})
    assert out == [{"type": "message", "role": role, "content": [{"type": part, "text": "q"}]}]


def test_input_items_absent_is_empty() -> None:
    assert input_items({"model": "m"}) == []


@pytest.mark.parametrize(
    ("raw", "param"), [(5, "input"), ({"role": "user"}, "input"), ([{"content": "x"}], "input[0]")]
)
def test_input_items_validates(raw: Any, param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        input_items({"input": raw})
    assert info.value.param == param


def test_output_to_input_round_trip() -> None:
    stored_output: list[dict[str, Any]] = [
        {"type": "reasoning", "id": "rs_1", "summary": []},
        {
            "type": "message",
            "id": "msg_1",
            "status": "completed",
            "role": "assistant",
            "content": [otext("Checking.")],
        },
        {**call("c1"), "id": "fc_1", "status": "completed"},
    ]
    items = output_to_input(stored_output)
    assert items == stored_output
    assert items[1] is not stored_output[1]
    # the next turn, as the gateway builds it: stored input + stored output + new input
    expanded = [msg("user", [itext("q")]), *items, output("c1", "done")]
    out = responses_to_chat({"model": "m", "input": expanded})
    assert out["messages"] == [
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": "Checking.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ]


def test_output_to_input_gives_a_message_its_role() -> None:
    stored: list[dict[str, Any]] = [{"type": "message", "content": []}]
    assert output_to_input(stored)[0]["role"] == "assistant"


# --- property: any text-only list of message items ------------------------------------------

TEXT = st.text(max_size=40)
ROLE = st.sampled_from(["user", "assistant", "system", "developer"])


@st.composite
def text_items(draw: st.DrawFn) -> tuple[dict[str, Any], tuple[str, Any]]:
    """A text-only message item and the (role, content) it must become."""
    role = draw(ROLE)
    texts = draw(st.lists(TEXT, min_size=1, max_size=4))
    shape = draw(st.sampled_from(["string", "parts", "easy"]))
    part = "output_text" if role == "assistant" else "input_text"
    content: Any = texts[0] if shape == "string" else [{"type": part, "text": t} for t in texts]
    item: dict[str, Any] = {"role": role, "content": content}
    if shape != "easy":
        item["type"] = "message"
    chat_role = "system" if role == "developer" else role
    if shape == "string":
        return item, (chat_role, texts[0])
    if chat_role == "system":
        return item, (chat_role, "\n\n".join(texts))
    if chat_role == "assistant":
        return item, (chat_role, "".join(texts))
    if len(texts) == 1:
        return item, (chat_role, texts[0])
    return item, (chat_role, [{"type": "text", "text": t} for t in texts])


@settings(max_examples=200, derandomize=True)
@given(cases=st.lists(text_items(), min_size=1, max_size=8), instructions=st.none() | TEXT)
def test_text_items_translate_in_order(cases: list[Any], instructions: str | None) -> None:
    b: dict[str, Any] = {"model": "m", "input": [item for item, _ in cases]}
    expected = [want for _, want in cases]
    if instructions is not None:
        b["instructions"] = instructions
        if instructions:
            expected.insert(0, ("system", instructions))
    out = responses_to_chat(b)
    assert [(m["role"], m["content"]) for m in out["messages"]] == expected
    assert all(set(m) == {"role", "content"} for m in out["messages"])
