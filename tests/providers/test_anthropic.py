"""The Anthropic translator against golden payloads in ``tests/data/anthropic/``. No I/O.

    requests/*.json    an OpenAI chat body ("openai") and the Messages API body it must become
    responses/*.json   an Anthropic Message and the chat.completion it must become
    streams/*.sse      recorded streams in Anthropic's documented event format; a stream named
                       like a response must reconstruct to the same message the way the OpenAI
                       SDK accumulates deltas; *.chunks.json pin the exact chunks of some
    errors.json        error answers (status, headers, body) and what the client sees

Everything is plain data: no sockets, no event loop, a fixed clock.
"""

from __future__ import annotations

import ast
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from runestone_proxy.errors import InvalidParam, ProviderError, UpstreamProtocolError
from runestone_proxy.protocol import sse
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.anthropic import AnthropicTranslator
from runestone_proxy.providers.base import ProviderCall, StreamTranslator, Translator

DATA = Path(__file__).parent.parent / "data" / "anthropic"
NOW = 1_700_000_000
MODEL = "claude-sonnet-4-5-20250929"


def translator() -> AnthropicTranslator:
    return AnthropicTranslator("anthropic", clock=lambda: NOW)


def chat(
    body: dict[str, Any], *, stream: bool = False, include_usage: bool = False
) -> ProviderCall:
    return ProviderCall(
        endpoint="chat", body=body, model=MODEL, stream=stream, include_usage=include_usage
    )


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def names(kind: str, suffix: str = ".json") -> list[str]:
    return sorted(p.name.removesuffix(suffix) for p in (DATA / kind).glob(f"*{suffix}"))


def read_sse(path: Path) -> list[SSEEvent]:
    """Just enough of text/event-stream for recorded files: blank-line separated events."""
    events = []
    for block in path.read_text().split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
        if data:
            events.append(SSEEvent(data="\n".join(data).encode(), event=name))
    return events


def run_stream(name: str, *, include_usage: bool = False) -> list[bytes]:
    st = translator().stream(chat({}, stream=True, include_usage=include_usage))
    out = []
    for event in read_sse(DATA / "streams" / f"{name}.sse"):
        out.extend(st.feed(event))
    out.extend(st.finish())
    assert st.done
    return out


def accumulate(payloads: Iterable[bytes]) -> dict[str, Any]:
    """Rebuild a chat.completion from chunks the way the OpenAI SDK's stream state does:
    strings concatenated, tool calls merged by ``index`` (id, name from the first piece)."""
    message: dict[str, Any] = {}
    calls: dict[int, dict[str, Any]] = {}
    result: dict[str, Any] = {"usage": None, "finish_reason": None}
    for payload in payloads:
        chunk = json.loads(payload)
        result.update(id=chunk["id"], model=chunk["model"], created=chunk["created"])
        if chunk.get("usage") is not None:
            result["usage"] = chunk["usage"]
        for choice in chunk["choices"]:
            delta = choice["delta"]
            for key in ("role", "content", "reasoning_content"):
                if delta.get(key) is not None:
                    message[key] = (
                        message.get(key, "") + delta[key] if key != "role" else "assistant"
                    )
            if "thinking_blocks" in delta:
                message.setdefault("thinking_blocks", []).extend(delta["thinking_blocks"])
            for piece in delta.get("tool_calls", ()):
                call = calls.setdefault(piece["index"], {"function": {"arguments": ""}})
                for key in ("id", "type"):
                    if key in piece:
                        call[key] = piece[key]
                fn = piece.get("function", {})
                if "name" in fn:
                    call["function"]["name"] = fn["name"]
                call["function"]["arguments"] += fn.get("arguments", "")
            if choice["finish_reason"] is not None:
                result["finish_reason"] = choice["finish_reason"]
    if calls:
        message["tool_calls"] = [calls[i] for i in sorted(calls)]
    result["message"] = message
    return result


# --- the protocol and the no-I/O rule -------------------------------------------------------


def test_satisfies_the_translator_protocols() -> None:
    t: Translator = translator()
    st: StreamTranslator = t.stream(chat({}, stream=True))
    assert not st.done


@pytest.mark.parametrize(
    "module",
    [
        "anthropic",
        "anthropic_messages",
        "anthropic_request",
        "anthropic_response",
        "anthropic_stream",
    ],
)
def test_provider_modules_do_no_io(module: str) -> None:
    source = Path(__file__).parents[2] / "runestone_proxy" / "providers" / f"{module}.py"
    imported: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & {"trio", "httpx", "structlog", "socket", "anyio"}


# --- requests -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", names("requests"))
def test_request_golden(name: str) -> None:
    case = load(DATA / "requests" / f"{name}.json")
    options = case["call"]
    call = ProviderCall(
        endpoint="chat",
        body=case["openai"],
        model=options["model"],
        stream=options.get("stream", False),
        include_usage=options.get("include_usage", False),
    )
    up = translator().build_request(call, "sk-ant-test")
    assert (up.method, up.path) == ("POST", "/messages")
    assert json.loads(up.body) == case["anthropic"]
    assert (
        up.body
        == json.dumps(  # compact JSON
            json.loads(up.body), separators=(",", ":"), ensure_ascii=False
        ).encode()
    )


def test_request_headers() -> None:
    body = {"messages": [{"role": "user", "content": "hi"}]}
    t = AnthropicTranslator("claude", api_version="2024-01-01", clock=lambda: NOW)
    plain = dict(t.build_request(chat(body), "sk-ant-1").headers)
    assert plain == {
        b"x-api-key": b"sk-ant-1",
        b"anthropic-version": b"2024-01-01",
        b"content-type": b"application/json",
    }
    streamed = dict(t.build_request(chat(body, stream=True), None).headers)
    assert b"x-api-key" not in streamed
    assert streamed[b"accept"] == b"text/event-stream"


def test_default_max_tokens_is_configurable() -> None:
    t = AnthropicTranslator("a", 1000, clock=lambda: NOW)
    up = t.build_request(chat({"messages": [{"role": "user", "content": "hi"}]}), "k")
    assert json.loads(up.body)["max_tokens"] == 1000


def test_completions_calls_arrive_as_chat() -> None:
    call = ProviderCall(
        endpoint="completions", body={"messages": [{"role": "user", "content": "hi"}]}, model="m"
    )
    assert json.loads(translator().build_request(call, "k").body)["messages"] == [
        {"role": "user", "content": "hi"}
    ]


def test_embeddings_are_refused() -> None:
    call = ProviderCall(endpoint="embeddings", body={"input": "hi"}, model="claude")
    with pytest.raises(InvalidParam, match="no embeddings") as info:
        translator().build_request(call, "k")
    assert info.value.http_status == 400


TOOL = {"type": "function", "function": {"name": "f"}}


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({"tool_choice": "auto"}, {"type": "auto"}),
        ({"tool_choice": "none"}, {"type": "none"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        ({"tool_choice": "none", "parallel_tool_calls": False}, {"type": "none"}),
        ({"parallel_tool_calls": True}, None),
    ],
)
def test_tool_choice(extra: dict[str, Any], expected: dict[str, Any] | None) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [TOOL], **extra}
    sent = json.loads(translator().build_request(chat(body), "k").body)
    assert sent.get("tool_choice") == expected


@pytest.mark.parametrize(
    ("effort", "max_tokens", "budget", "sent_max"),
    [
        ("low", None, 1024, 4096 + 1024),
        ("high", None, 16384, 4096 + 16384),
        ("high", 8000, 7999, 8000),  # the budget must stay below max_tokens
        ("none", None, None, 4096),
    ],
)
def test_reasoning_effort_budgets(
    effort: str, max_tokens: int | None, budget: int | None, sent_max: int
) -> None:
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]}
    body["reasoning_effort"] = effort
    if max_tokens is not None:
        body["max_completion_tokens"] = max_tokens
    sent = json.loads(translator().build_request(chat(body), "k").body)
    assert sent["max_tokens"] == sent_max
    assert sent.get("thinking") == (
        None if budget is None else {"type": "enabled", "budget_tokens": budget}
    )


USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": ["hi"]}, "messages[0]"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 7}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
            "messages[0].content[0].type",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
            "messages[0].content[0].text",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": "data:image/bmp;base64,AA"}}
                        ],
                    }
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "t1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls",
        ),
        (
            {
                "messages": [
                    USER,
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "t1",
                                "type": "function",
                                "function": {"name": "f", "arguments": "[1]"},
                            }
                        ],
                    },
                ]
            },
            "messages[1].tool_calls",
        ),
        ({"messages": [USER, {"role": "tool", "content": "x"}]}, "messages[1].tool_call_id"),
        (
            {"messages": [USER, {"role": "assistant", "content": "x", "thinking_blocks": [{}]}]},
            "messages[1].thinking_blocks",
        ),
        ({"messages": [USER], "max_tokens": 0}, "max_tokens"),
        ({"messages": [USER], "max_completion_tokens": "9"}, "max_completion_tokens"),
        ({"messages": [USER], "temperature": 2.5}, "temperature"),
        ({"messages": [USER], "temperature": True}, "temperature"),
        ({"messages": [USER], "top_p": 1.5}, "top_p"),
        ({"messages": [USER], "stop": 3}, "stop"),
        ({"messages": [USER], "user": 3}, "user"),
        ({"messages": [USER], "n": 2}, "n"),
        ({"messages": [USER], "logprobs": True}, "logprobs"),
        ({"messages": [USER], "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": [USER], "tools": {}}, "tools"),
        ({"messages": [USER], "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"messages": [USER], "tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [USER], "parallel_tool_calls": "no"}, "parallel_tool_calls"),
        ({"messages": [USER], "thinking": "on"}, "thinking"),
        ({"messages": [USER], "reasoning_effort": "max"}, "reasoning_effort"),
        (
            {"messages": [USER], "reasoning_effort": "low", "max_tokens": 500},
            "max_completion_tokens",
        ),
    ],
)
def test_bad_requests_name_the_param(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidParam) as info:
        translator().build_request(chat(body), "k")
    assert info.value.param == param
    assert info.value.error_type == "invalid_request_error"


# --- whole responses ------------------------------------------------------------------------


@pytest.mark.parametrize("name", names("responses"))
def test_response_golden(name: str) -> None:
    case = load(DATA / "responses" / f"{name}.json")
    out = translator().parse_response(chat({}), json.dumps(case["anthropic"]).encode())
    assert json.loads(out) == case["openai"]


def test_in_band_error_in_a_2xx_body() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    with pytest.raises(ProviderError) as info:
        translator().parse_response(chat({}), body)
    assert (info.value.http_status, info.value.is_retryable) == (503, True)


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"type":"message"}'])
def test_malformed_response_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        translator().parse_response(chat({}), body)


# --- streams --------------------------------------------------------------------------------


def test_text_stream_chunks_exactly() -> None:
    payloads = run_stream("text", include_usage=True)
    assert [json.loads(p) for p in payloads] == load(DATA / "streams" / "text.chunks.json")
    for p in payloads:  # compact JSON, as the relay forwards it
        assert p == json.dumps(json.loads(p), separators=(",", ":"), ensure_ascii=False).encode()


def test_tool_use_stream_chunks() -> None:
    """Tool call index counts tool calls, not Anthropic's content block index; id and name
    only in the first piece."""
    chunks = [json.loads(p) for p in run_stream("tool_use")]
    got = [
        {"delta": c["choices"][0]["delta"], "finish_reason": c["choices"][0]["finish_reason"]}
        for c in chunks
    ]
    assert got == load(DATA / "streams" / "tool_use.chunks.json")
    assert all("usage" not in c for c in chunks)  # include_usage was not asked for


@pytest.mark.parametrize("name", ["text", "tool_use", "thinking_tool", "tool_only"])
@pytest.mark.parametrize("include_usage", [False, True])
def test_stream_reconstructs_the_whole_response(name: str, include_usage: bool) -> None:
    payloads = run_stream(name, include_usage=include_usage)
    chunks = [json.loads(p) for p in payloads]
    assert all(c["object"] == "chat.completion.chunk" and c["created"] == NOW for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    with_choices = [c for c in chunks if c["choices"]]
    assert [("role" in c["choices"][0]["delta"]) for c in with_choices].count(True) == 1
    assert "role" in with_choices[0]["choices"][0]["delta"]
    assert all(c["choices"][0]["logprobs"] is None for c in with_choices)
    finishes = [c["choices"][0]["finish_reason"] for c in with_choices]
    assert finishes[:-1] == [None] * (len(finishes) - 1)

    built = accumulate(payloads)
    whole = load(DATA / "responses" / f"{name}.json")["openai"]
    expected = whole["choices"][0]["message"]
    message = built["message"]
    if message.get("content") == "" and expected["content"] is None:
        message["content"] = None  # the first chunk carries content "", as the brief asks
    for call in message.get("tool_calls", ()):
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    for call in expected.get("tool_calls", ()):
        call["function"]["arguments"] = json.loads(call["function"]["arguments"])
    assert message == expected
    assert built["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert (built["id"], built["model"]) == (whole["id"], whole["model"])
    assert built["usage"] == (whole["usage"] if include_usage else None)
    if include_usage:
        assert chunks[-1]["choices"] == []


@pytest.mark.parametrize("name", ["text", "tool_use", "thinking_tool"])
def test_through_the_real_sse_parser_in_small_pieces(name: str) -> None:
    """What the pipeline does: upstream bytes in arbitrary pieces -> SSEParser -> feed."""
    raw = (DATA / "streams" / f"{name}.sse").read_bytes()
    parser = sse.SSEParser()
    st = translator().stream(chat({}, stream=True))
    out = []
    for i in range(0, len(raw), 7):
        for event in parser.feed(raw[i : i + 7]):
            out.extend(st.feed(event))
    for event in parser.close():
        out.extend(st.feed(event))
    out.extend(st.finish())
    assert out == run_stream(name)


def test_mid_stream_overloaded_error_raises_retryable() -> None:
    st = translator().stream(chat({}, stream=True))
    events = read_sse(DATA / "streams" / "overloaded.sse")
    relayed = [p for e in events[:-1] for p in st.feed(e)]
    assert json.loads(relayed[-1])["choices"][0]["delta"] == {"content": "Once upon"}
    with pytest.raises(ProviderError) as info:
        st.feed(events[-1])
    error = info.value
    assert (error.http_status, error.is_retryable) == (503, True)
    assert error.envelope()["error"] == {
        "message": "Overloaded",
        "type": "server_error",
        "param": None,
        "code": "overloaded_error",
    }
    assert not st.done


@pytest.mark.parametrize(
    ("error_type", "status", "retryable"),
    [
        ("api_error", 500, True),
        ("rate_limit_error", 429, True),
        ("invalid_request_error", 400, False),
        ("some_future_error", 502, True),
    ],
)
def test_mid_stream_errors(error_type: str, status: int, retryable: bool) -> None:
    st = translator().stream(chat({}, stream=True))
    data = json.dumps({"type": "error", "error": {"type": error_type, "message": "m"}})
    with pytest.raises(ProviderError) as info:
        st.feed(SSEEvent(data=data.encode(), event="error"))
    assert (info.value.http_status, info.value.is_retryable) == (status, retryable)


@pytest.mark.parametrize("cut", [0, 1, 4, 7])
def test_cut_stream_never_fabricates_a_finish(cut: int) -> None:
    st = translator().stream(chat({}, stream=True))
    events = read_sse(DATA / "streams" / "text.sse")
    for event in events[:cut]:
        st.feed(event)
    with pytest.raises(UpstreamProtocolError, match="message_stop"):
        st.finish()


def ev(data: dict[str, Any]) -> SSEEvent:
    return SSEEvent(data=json.dumps(data).encode(), event=str(data["type"]))


START = ev({"type": "message_start", "message": {"id": "msg_1", "model": MODEL, "usage": {}}})


@pytest.mark.parametrize(
    "events",
    [
        [ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}})],
        [START, START],
        [START, ev({"type": "message_stop"})],
        [START, ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta"}})],
        [
            START,
            ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
            ev({"type": "content_block_stop", "index": 3}),
        ],
        [
            START,
            ev({"type": "message_delta", "delta": {"stop_reason": None}}),
            ev({"type": "message_stop"}),
        ],
        [SSEEvent(data=b"{not json", event="message_start")],
        [SSEEvent(data=b"[]", event="message_start")],
    ],
)
def test_out_of_order_or_malformed_events_are_protocol_errors(events: list[SSEEvent]) -> None:
    st = translator().stream(chat({}, stream=True))
    for event in events[:-1]:
        st.feed(event)
    with pytest.raises(UpstreamProtocolError):
        st.feed(events[-1])


def test_unknown_events_and_pings_are_ignored() -> None:
    st = translator().stream(chat({}, stream=True))
    assert st.feed(ev({"type": "ping"})) == []
    assert st.feed(ev({"type": "message_annotation", "x": 1})) == []
    assert len(st.feed(START)) == 1
    assert st.feed(ev({"type": "brand_new_event"})) == []


def test_message_delta_usage_is_cumulative_and_ignores_nulls() -> None:
    st = translator().stream(chat({}, stream=True, include_usage=True))
    start = {"id": "msg_1", "model": MODEL, "usage": {"input_tokens": 9, "output_tokens": 1}}
    st.feed(ev({"type": "message_start", "message": start}))
    usage = {"input_tokens": None, "cache_read_input_tokens": 4, "output_tokens": 5}
    st.feed(ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}))
    (last,) = st.feed(ev({"type": "message_stop"}))
    assert json.loads(last)["usage"] == {
        "prompt_tokens": 13,
        "completion_tokens": 5,
        "total_tokens": 18,
        "prompt_tokens_details": {"cached_tokens": 4},
    }


def test_redacted_thinking_streams_as_a_thinking_block() -> None:
    st = translator().stream(chat({}, stream=True))
    st.feed(START)
    block = {"type": "redacted_thinking", "data": "EmwKAhgB"}
    assert st.feed(ev({"type": "content_block_start", "index": 0, "content_block": block})) == []
    (out,) = st.feed(ev({"type": "content_block_stop", "index": 0}))
    assert json.loads(out)["choices"][0]["delta"] == {"thinking_blocks": [block]}


# --- errors ---------------------------------------------------------------------------------


ERRORS = load(DATA / "errors.json")


@pytest.mark.parametrize("case", ERRORS, ids=[f"{c['status']}-{i}" for i, c in enumerate(ERRORS)])
def test_error_golden(case: dict[str, Any]) -> None:
    headers = [(k.encode(), v.encode()) for k, v in case.get("headers", [])]
    error = translator().parse_error(case["status"], headers, case["body"].encode())
    expect = case["expect"]
    assert isinstance(error, ProviderError)
    assert error.http_status == expect["status"]
    assert error.is_retryable is expect["retryable"]
    assert error.envelope() == expect["envelope"]
    assert [[k.decode(), v.decode()] for k, v in error.headers] == expect["headers"]


def test_retry_after_as_http_date() -> None:
    headers = [(b"retry-after", b"Tue, 14 Nov 2023 22:13:27 GMT")]  # NOW + 7 s
    body = b'{"type":"error","error":{"type":"rate_limit_error","message":"slow down"}}'
    error = translator().parse_error(429, headers, body)
    assert error.retry_after_s == 7
    assert (b"retry-after", b"7") in error.headers
