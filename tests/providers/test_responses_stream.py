"""OpenAI chat chunk streams -> Responses API SSE frames (``ResponsesEncoder``). No I/O.

Golden files in ``tests/data/responses_response/streams/*.json``: ``{"request": <the
Responses request>, "chunks": [<chat.completion.chunk>, ...], "events": [<the data of each
frame>, ...]}``. Every event is read with the ``openai`` SDK's ``ResponseStreamEvent`` type
and fed to its own accumulator (``ResponseStreamState``); the frames are also served to a
real ``openai.OpenAI`` client through an ``httpx.MockTransport`` (no socket) and read with
``client.responses.stream(...)``. The final Response must be what ``chat_to_response`` makes
of the same answer whole. Plus: one test per row of ``TRANSITIONS``, and a property test over
arbitrary sequences of text, reasoning, refusal and interleaved tool call deltas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai._types import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from runestone_proxy.errors import ProviderError, RateLimited, UpstreamProtocolError
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.responses_response import chat_to_response
from runestone_proxy.providers.responses_stream import (
    TRANSITIONS,
    ResponsesEncoder,
    State,
    error_frame,
)

DATA = Path(__file__).parent.parent / "data" / "responses_response" / "streams"
NAMES = sorted(p.stem for p in DATA.glob("*.json"))
RID = "resp_0123456789abcdef01234567"
CREATED = 1738960001
REQUEST = {"model": "gpt-4o-mini", "input": "hi"}
EVENT: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)


def load(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def encoder(request: dict[str, Any] | None = None) -> ResponsesEncoder:
    return ResponsesEncoder(request=request or REQUEST, response_id=RID, created=CREATED)


def encode(
    chunks: Iterable[dict[str, Any]], request: dict[str, Any] | None = None
) -> tuple[ResponsesEncoder, list[bytes]]:
    enc = encoder(request)
    frames: list[bytes] = []
    for chunk in chunks:
        frames += enc.feed(dumps(chunk))
    frames += enc.finish()
    return enc, frames


def parse(frames: list[bytes]) -> list[dict[str, Any]]:
    """Each frame is exactly ``event: <type>\\ndata: <compact json>\\n\\n``, and an event
    the SDK's ``ResponseStreamEvent`` reads."""
    events = []
    for raw in frames:
        head, data, tail = raw.split(b"\n", 2)
        assert tail == b"\n"
        assert data.startswith(b"data: ")
        event = json.loads(data[6:])
        assert head == b"event: " + event["type"].encode()
        assert data[6:] == dumps(event)  # compact JSON, nothing else
        EVENT.validate_python(event)
        events.append(event)
    return events


def accumulate(events: list[dict[str, Any]]) -> Response:
    """The SDK's own accumulator over the events; returns the Response it completes."""
    state: ResponseStreamState[Any] = ResponseStreamState(input_tools=omit, text_format=omit)
    for event in events:
        state.handle_event(EVENT.validate_python(event))
    final = events[-1]
    assert final["type"] in ("response.completed", "response.incomplete")
    return Response.model_validate(final["response"])


def aggregate(chunks: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat.completion a server would have sent whole for these chunks."""
    message: dict[str, Any] = {"role": "assistant"}
    calls: dict[Any, dict[str, Any]] = {}
    finish = model = usage = None
    for chunk in chunks:
        model = model or chunk.get("model")
        usage = chunk.get("usage") or usage
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            for key in ("content", "refusal", "reasoning_content", "reasoning"):
                if isinstance(delta.get(key), str):
                    message[key] = message.get(key, "") + delta[key]
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(
                    piece.get("index"), {"id": None, "function": {"name": "", "arguments": ""}}
                )
                call["id"] = call["id"] or piece.get("id")
                function = piece.get("function") or {}
                call["function"]["name"] += function.get("name") or ""
                call["function"]["arguments"] += function.get("arguments") or ""
            if finish is None:
                finish = choice.get("finish_reason")
    if calls:
        message["tool_calls"] = list(calls.values())
    choice = {"index": 0, "message": message, "finish_reason": finish}
    return {
        "id": "c",
        "object": "chat.completion",
        "model": model,
        "choices": [choice],
        "usage": usage,
    }


def check_agrees_with_whole(enc: ResponsesEncoder, chunks: list[dict[str, Any]]) -> None:
    whole = chat_to_response(
        dumps(aggregate(chunks)), request=enc.request, response_id=RID, created=CREATED
    )
    assert enc.final == whole


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return dumps({"id": "chatcmpl-1", "model": "up", "choices": [choice], **top})


USAGE = dumps(
    {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
)


# --- golden streams ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_golden(name: str) -> None:
    doc = load(name)
    enc, frames = encode(doc["chunks"], doc["request"])
    events = parse(frames)
    assert events == doc["events"]
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert enc.sequence == len(events)
    assert enc.state is State.DONE
    assert enc.finish() == []  # idempotent
    assert enc.final == dumps(events[-1]["response"])
    response = accumulate(events)
    assert response == Response.model_validate_json(enc.final)
    check_agrees_with_whole(enc, doc["chunks"])
    usage = [c["usage"] for c in doc["chunks"] if c.get("usage")]
    assert enc.usage == (usage[-1] if usage else None)


def test_golden_covers_the_brief() -> None:
    wanted = {"text", "tools_interleaved", "reasoning_text_tool", "refusal", "length"}
    assert wanted <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_openai_sdk_reads_the_stream(name: str) -> None:
    """``client.responses.stream`` over the frames, served by an in-memory transport."""
    doc = load(name)
    enc, frames = encode(doc["chunks"], doc["request"])

    def serve(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/responses"
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=b"".join(frames)
        )

    http = httpx.Client(transport=httpx.MockTransport(serve))
    client = openai.OpenAI(api_key="sk-test", base_url="http://127.0.0.1/v1", http_client=http)
    with client.responses.stream(model="gpt-4o-mini", input="hi") as stream:
        seen = [event.type for event in stream]
        if seen[-1] == "response.completed":
            final = stream.get_final_response()
            assert final.id == RID
            text = "".join(
                part.text
                for item in final.output
                if item.type == "message"
                for part in item.content
                if part.type == "output_text"
            )
            assert final.output_text == text
    assert seen == [e["type"] for e in doc["events"]]
    assert enc.final is not None


# --- the transition table, row by row ----------------------------------------------------

#: How to bring a fresh encoder into each state.
REACH: dict[State, list[bytes]] = {
    State.START: [],
    State.IDLE: [chunk({"role": "assistant", "content": ""})],
    State.REASONING: [chunk({"reasoning_content": "hm"})],
    State.TEXT: [chunk({"content": "hi"})],
    State.REFUSAL: [chunk({"refusal": "no"})],
    State.CALLS: [chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]})],
    State.DONE: [chunk({"content": "hi"}), b"finish"],
}
#: One payload per input (``end`` is ``finish()``).
INPUTS: dict[str, bytes] = {
    "empty": USAGE,
    "reasoning": chunk({"reasoning_content": "think"}),
    "text": chunk({"content": "say"}),
    "refusal": chunk({"refusal": "won't"}),
    "tool": chunk({"tool_calls": [{"index": 7, "id": "call_b", "function": {"name": "g"}}]}),
    "stop": chunk({}, "stop"),
    "end": b"finish",
}
_P = "response."
START = (_P + "created", _P + "in_progress")
ADD, DONE = (_P + "output_item.added",), (_P + "output_item.done",)
R_OPEN = (*ADD, _P + "reasoning_summary_part.added", _P + "reasoning_summary_text.delta")
R_CLOSE = (_P + "reasoning_summary_text.done", _P + "reasoning_summary_part.done", *DONE)
T_PART = (_P + "content_part.added", _P + "output_text.delta")
F_PART = (_P + "content_part.added", _P + "refusal.delta")
T_DONE = (_P + "output_text.done", _P + "content_part.done")
F_DONE = (_P + "refusal.done", _P + "content_part.done")
T_OPEN, F_OPEN = (*ADD, *T_PART), (*ADD, *F_PART)
T_CLOSE, F_CLOSE = (*T_DONE, *DONE), (*F_DONE, *DONE)
C_CLOSE = (_P + "function_call_arguments.done", *DONE)
END = (_P + "completed",)
#: (state, input) -> the event types it emits; one row per row of TRANSITIONS. In CALLS two
#: calls are open (the table test adds one), so closing them is C_CLOSE twice.
EXPECTED: dict[tuple[State, str], tuple[str, ...]] = {
    (State.START, "empty"): START,
    (State.START, "reasoning"): START + R_OPEN,
    (State.START, "text"): START + T_OPEN,
    (State.START, "refusal"): START + F_OPEN,
    (State.START, "tool"): START + ADD,
    (State.START, "stop"): START,
    (State.START, "end"): START + END,
    (State.IDLE, "empty"): (),
    (State.IDLE, "reasoning"): R_OPEN,
    (State.IDLE, "text"): T_OPEN,
    (State.IDLE, "refusal"): F_OPEN,
    (State.IDLE, "tool"): ADD,
    (State.IDLE, "stop"): (),
    (State.IDLE, "end"): END,
    (State.REASONING, "empty"): (),
    (State.REASONING, "reasoning"): (_P + "reasoning_summary_text.delta",),
    (State.REASONING, "text"): R_CLOSE + T_OPEN,
    (State.REASONING, "refusal"): R_CLOSE + F_OPEN,
    (State.REASONING, "tool"): R_CLOSE + ADD,
    (State.REASONING, "stop"): R_CLOSE,
    (State.REASONING, "end"): R_CLOSE + END,
    (State.TEXT, "empty"): (),
    (State.TEXT, "reasoning"): T_CLOSE + R_OPEN,
    (State.TEXT, "text"): (_P + "output_text.delta",),
    (State.TEXT, "refusal"): T_DONE + F_PART,
    (State.TEXT, "tool"): T_CLOSE + ADD,
    (State.TEXT, "stop"): T_CLOSE,
    (State.TEXT, "end"): T_CLOSE + END,
    (State.REFUSAL, "empty"): (),
    (State.REFUSAL, "reasoning"): F_CLOSE + R_OPEN,
    (State.REFUSAL, "text"): F_DONE + T_PART,
    (State.REFUSAL, "refusal"): (_P + "refusal.delta",),
    (State.REFUSAL, "tool"): F_CLOSE + ADD,
    (State.REFUSAL, "stop"): F_CLOSE,
    (State.REFUSAL, "end"): F_CLOSE + END,
    (State.CALLS, "empty"): (),
    (State.CALLS, "reasoning"): C_CLOSE * 2 + R_OPEN,
    (State.CALLS, "text"): C_CLOSE * 2 + T_OPEN,
    (State.CALLS, "refusal"): C_CLOSE * 2 + F_OPEN,
    (State.CALLS, "tool"): (_P + "function_call_arguments.delta",),  # call_b continues
    (State.CALLS, "stop"): C_CLOSE * 2,
    (State.CALLS, "end"): C_CLOSE * 2 + END,
    (State.DONE, "empty"): (),
    (State.DONE, "reasoning"): (),
    (State.DONE, "text"): (),
    (State.DONE, "refusal"): (),
    (State.DONE, "tool"): (),
    (State.DONE, "stop"): (),
    (State.DONE, "end"): (),
}
CONTINUE_B = chunk({"tool_calls": [{"index": 7, "function": {"arguments": "{}"}}]})


def _run(enc: ResponsesEncoder, payload: bytes) -> list[bytes]:
    return enc.finish() if payload == b"finish" else enc.feed(payload)


def test_every_row_is_tested() -> None:
    assert set(EXPECTED) == set(TRANSITIONS)


@pytest.mark.parametrize(("state", "kind"), sorted(EXPECTED, key=lambda k: (k[0].value, k[1])))
def test_transition(state: State, kind: str) -> None:
    enc = encoder()
    for payload in REACH[state]:
        _run(enc, payload)
    assert enc.state is state
    payload = INPUTS[kind]
    if state is State.CALLS:  # a second call, open beside the first
        assert [e["type"] for e in parse(enc.feed(INPUTS["tool"]))] == list(ADD)
        payload = CONTINUE_B if kind == "tool" else payload
    before = enc.sequence
    out = parse(_run(enc, payload))
    assert tuple(e["type"] for e in out) == EXPECTED[state, kind]
    assert [e["sequence_number"] for e in out] == list(range(before, enc.sequence))
    assert enc.state is TRANSITIONS[state, kind][1]


# --- edges -------------------------------------------------------------------------------


def test_empty_stream_is_still_a_response() -> None:
    enc = encoder()
    events = parse(enc.finish())
    assert [e["type"] for e in events] == [*START, *END]
    response = accumulate(events)
    assert response.output == []
    assert response.model == "gpt-4o-mini"  # no chunk named one: the request's
    assert response.usage is None


def test_created_is_in_progress_and_empty() -> None:
    enc = encoder({"model": "asked", "instructions": "be brief", "temperature": 0.5})
    created, in_progress = parse(enc.feed(chunk({"role": "assistant"})))
    assert created["response"] == in_progress["response"]
    response = created["response"]
    assert (response["status"], response["output"], response["usage"]) == ("in_progress", [], None)
    assert (response["model"], response["instructions"], response["temperature"]) == (
        "up",
        "be brief",
        0.5,
    )
    assert enc.final is None


def test_usage_after_finish_reason_reaches_the_final_response() -> None:
    enc = encoder()
    enc.feed(chunk({"content": "x"}))
    enc.feed(chunk({}, "stop"))
    assert enc.feed(USAGE) == []
    assert enc.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    (completed,) = parse(enc.finish())
    assert completed["response"]["usage"]["input_tokens"] == 5
    assert completed["response"]["usage"]["total_tokens"] == 7


def test_first_finish_reason_wins() -> None:
    enc = encoder()
    enc.feed(chunk({"content": "x"}, "length"))
    enc.feed(chunk({}, "stop"))
    (incomplete,) = parse(enc.finish())
    assert incomplete["type"] == "response.incomplete"
    assert incomplete["response"]["incomplete_details"] == {"reason": "max_output_tokens"}


def test_text_then_refusal_is_one_message() -> None:
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "Sure, "}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"refusal": "actually no."}}]},
    ]
    enc, frames = encode(chunks)
    (message,) = accumulate(parse(frames)).output
    assert message.type == "message"
    assert [part.type for part in message.content] == ["output_text", "refusal"]
    check_agrees_with_whole(enc, chunks)


def test_choice_zero_only() -> None:
    other = {"index": 1, "delta": {"content": "other"}, "finish_reason": None}
    chunks = [
        {"id": "c", "choices": [other]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "mine"}}]},
        {"id": "c", "choices": [other, {"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    _, frames = encode(chunks)
    assert accumulate(parse(frames)).output_text == "mine"


def test_error_chunk_raises() -> None:
    enc = encoder()
    enc.feed(chunk({"content": "x"}))
    with pytest.raises(ProviderError) as info:
        enc.feed(dumps({"error": {"message": "Provider disconnected", "code": 502}}))
    assert info.value.status == 502


@pytest.mark.parametrize(
    "payload", [b"not json", b"[1]", b'"x"', b"", b"\xff", b'{"id":"c"}x', b'{"a":1}{"b":2}']
)
def test_not_a_chunk(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        encoder().feed(payload)


def test_tool_call_continued_after_its_item_was_done() -> None:
    enc = encoder()
    enc.feed(chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]}))
    enc.feed(chunk({"content": "between"}))
    with pytest.raises(UpstreamProtocolError):
        enc.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))


def test_tool_calls_without_index_and_legacy_function_call() -> None:
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"id": "call_a", "function": {"name": "f", "arguments": '{"a":'}},
        ]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"function": {"arguments": "1}"}},
        ]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"function_call": {"name": "h"}}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"function_call": {"arguments": "{}"}}}]},
    ]  # fmt: skip
    _, frames = encode(chunks)
    output = accumulate(parse(frames)).output
    assert [
        (i.type, i.call_id, i.name, i.arguments) for i in output if i.type == "function_call"
    ] == [
        ("function_call", "call_a", "f", '{"a":1}'),
        ("function_call", f"call_{RID[5:]}_1", "h", "{}"),
    ]


def test_whitespace_around_a_chunk_and_a_lone_surrogate() -> None:
    enc = encoder()
    assert len(enc.feed(b' {"id":"c","choices":[]} \n')) == 2
    frames = enc.feed(b'{"id":"c","choices":[{"index":0,"delta":{"content":"a\\ud800"}}]}')
    assert parse(frames)[-1]["delta"] == "a\ud800"


def test_error_frame() -> None:
    exc = RateLimited("slow down")
    raw = error_frame(exc, 12)
    (event,) = parse([raw])
    assert event == {
        "type": "error",
        "sequence_number": 12,
        "code": "rate_limit_exceeded",
        "message": "slow down",
        "param": None,
    }
    bare = ProviderError("boom", status=500, error_type="server_error", retryable=True)
    assert json.loads(error_frame(bare, 0).split(b"data: ")[1])["code"] == "server_error"


# --- property: any sequence of deltas is a well-formed Responses stream ------------------

_text = st.text(min_size=1, max_size=8)
_input = st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3
)


@st.composite
def _streams(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Chunks: segments of text / reasoning / refusal pieces alternate with groups of tool
    calls whose pieces interleave freely (a call never continues after another kind: that
    raises, tested above)."""
    deltas: list[dict[str, Any]] = []
    tools = 0
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            keys = st.sampled_from(["content", "reasoning_content", "refusal", "content"])
            for key in draw(st.lists(keys, max_size=4)):
                deltas.append({key: draw(_text)})
            continue
        queues = []
        for _ in range(draw(st.integers(1, 3))):
            arguments = json.dumps(draw(_input))
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(arguments) - 1)), max_size=4)))
            bounds = zip([0, *cuts], [*cuts, len(arguments)], strict=True)
            pieces = [arguments[a:b] for a, b in bounds if arguments[a:b]]
            first = {"index": tools, "id": f"call_{tools}", "type": "function"}
            first["function"] = {"name": f"tool_{tools}", "arguments": pieces[0]}
            rest = [{"index": tools, "function": {"arguments": p}} for p in pieces[1:]]
            queues.append([first, *rest])
            tools += 1
        for i in draw(st.permutations([i for i, q in enumerate(queues) for _ in q])):
            deltas.append({"tool_calls": [queues[i].pop(0)]})
    chunks = [{"id": "p", "model": "up", "choices": [{"index": 0, "delta": {"role": "assistant"}}]}]
    chunks += [{"id": "p", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    finish = draw(st.sampled_from([None, "stop", "length", "tool_calls", "content_filter"]))
    chunks.append({"id": "p", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]})
    if draw(st.booleans()):
        usage = {"prompt_tokens": 3, "completion_tokens": 4}
        chunks.append({"id": "p", "choices": [], "usage": usage})
    return chunks


def check_well_formed(events: list[dict[str, Any]]) -> None:
    """Lifecycle first and last; each item added once with the next output_index, its
    events only while it is open, done once; parts open and close inside their item."""
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    types = [e["type"] for e in events]
    assert types[:2] == list(START)
    assert types[-1] in ("response.completed", "response.incomplete")
    open_items: dict[int, str] = {}
    done: set[int] = set()
    part_open: dict[int, bool] = {}
    for event in events[2:-1]:
        kind, index = event["type"], event.get("output_index")
        assert isinstance(index, int)
        if kind == "response.output_item.added":
            assert index == len(open_items) + len(done)
            open_items[index] = event["item"]["id"]
            part_open[index] = False
        elif kind == "response.output_item.done":
            assert open_items.pop(index) == event["item"]["id"]
            assert not part_open[index]
            done.add(index)
        else:
            assert event["item_id"] == open_items[index]
            if kind.endswith("part.added"):
                assert not part_open[index]
                part_open[index] = True
            elif kind.endswith("part.done"):
                assert part_open[index]
                part_open[index] = False
            elif "function_call" not in kind:
                assert part_open[index]
    assert not open_items


@settings(max_examples=300, derandomize=True, deadline=None)
@given(_streams())
def test_any_delta_sequence_is_well_formed(chunks: list[dict[str, Any]]) -> None:
    enc, frames = encode(chunks)
    events = parse(frames)
    check_well_formed(events)
    response = accumulate(events)
    assert enc.final == dumps(events[-1]["response"])
    if _in_whole_order(chunks):
        check_agrees_with_whole(enc, chunks)
    said = aggregate(chunks)["choices"][0]["message"]
    texts = [
        part.text
        for item in response.output
        if item.type == "message"
        for part in item.content
        if part.type == "output_text"
    ]
    assert "".join(texts) == said.get("content", "")
    calls = [
        (i.call_id, json.loads(i.arguments)) for i in response.output if i.type == "function_call"
    ]
    assert calls == [
        (c["id"], json.loads(c["function"]["arguments"])) for c in said.get("tool_calls", [])
    ]


def _in_whole_order(chunks: list[dict[str, Any]]) -> bool:
    """The stream's items come out as the whole answer's would (reasoning, then a message
    with text before refusal, then the calls, each kind in one run): only then must the
    final Response equal ``chat_to_response`` of the same answer."""
    runs: list[str] = []
    for c in chunks:
        for choice in c["choices"]:
            for key, value in choice["delta"].items():
                kind = "~calls" if key == "tool_calls" else key
                if key != "role" and value and (not runs or runs[-1] != kind):
                    runs.append(kind)
    order = ["reasoning_content", "content", "refusal", "~calls"]
    return len(runs) == len(set(runs)) and runs == sorted(runs, key=order.index)


# --- the plain-text fast path ---------------------------------------------------------------


def _text_chunk(text: str, ascii_only: bool) -> bytes:
    chunk = {
        "id": "chatcmpl-fast",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return json.dumps(chunk, ensure_ascii=ascii_only, separators=(",", ":")).encode()


@settings(max_examples=200, deadline=None, derandomize=True)
@given(pieces=st.lists(st.text(min_size=1), min_size=1, max_size=5), ascii_only=st.booleans())
def test_plain_text_chunks_forward_their_literal_and_keep_the_text(
    pieces: list[str], ascii_only: bool
) -> None:
    """Text chunks in an open text part leave as output_text deltas whose text is the
    chunk's, and the final Response holds their concatenation, whether each literal is
    forwarded as bytes or re-encoded."""
    enc = encoder()
    frames = enc.feed(_text_chunk("a", ascii_only=True))  # opens the message
    for piece in pieces:
        frames += enc.feed(_text_chunk(piece, ascii_only))
    frames += enc.finish()
    deltas = [
        json.loads(f.decode().split("\ndata: ", 1)[1])
        for f in frames
        if f.startswith(b"event: response.output_text.delta\n")
    ]
    assert [d["delta"] for d in deltas] == ["a", *pieces]
    final = json.loads(enc.final or b"null")
    assert final["output"][0]["content"][0]["text"] == "a" + "".join(pieces)
