"""OpenAI chunk streams -> Anthropic Messages SSE frames (``MessagesEncoder``). No I/O.

Golden files in ``tests/data/messages_response/streams/*.json``: ``{"chunks": [<OpenAI
chat.completion.chunk>, ...], "events": [<the data of each Anthropic frame>, ...],
"message": <what the official anthropic SDK accumulates from them>}``. The accumulation is
the SDK's own (``anthropic.lib.streaming._messages.accumulate_event``), fed plain dicts, no
socket. Plus: one test row per row of ``TRANSITIONS``, and a property test over arbitrary
sequences of text, reasoning and (interleaved) tool call deltas.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from anthropic.lib.streaming._messages import accumulate_event
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_stream import TRANSITIONS, MessagesEncoder, State

DATA = Path(__file__).parent.parent / "data" / "messages_response" / "streams"
MODEL = "claude-sonnet-4-5"
NAMES = sorted(p.stem for p in DATA.glob("*.json"))


def load(name: str) -> Any:
    return json.loads((DATA / f"{name}.json").read_text())


def encode(chunks: Iterable[dict[str, Any]]) -> tuple[MessagesEncoder, list[bytes]]:
    enc = MessagesEncoder(MODEL)
    frames: list[bytes] = []
    for chunk in chunks:
        frames += enc.feed(dumps(chunk))
    frames += enc.finish()
    return enc, frames


def parse(frames: list[bytes]) -> list[dict[str, Any]]:
    """Each frame is exactly ``event: <type>\\ndata: <compact json>\\n\\n``."""
    events = []
    for raw in frames:
        assert raw.startswith(b"event: ")
        assert raw.endswith(b"\n\n")
        head, data, tail = raw.split(b"\n", 2)
        assert tail == b"\n"
        assert data.startswith(b"data: ")
        event = json.loads(data[6:])
        assert head == b"event: " + event["type"].encode()
        assert data[6:] == dumps(event)  # compact JSON, nothing else
        events.append(event)
    return events


def accumulate(events: list[dict[str, Any]]) -> dict[str, Any]:
    snapshot = None
    json_bufs: dict[int, bytes] = {}
    for event in events:
        snapshot = accumulate_event(event=event, current_snapshot=snapshot, json_bufs=json_bufs)
    assert snapshot is not None
    return snapshot.to_dict(mode="json")


def chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **top: Any) -> bytes:
    choice = {"index": 0, "delta": delta or {}, "finish_reason": finish}
    return dumps(
        {"id": "chatcmpl-1", "object": "chat.completion.chunk", "choices": [choice], **top}
    )


USAGE = dumps(
    {"id": "chatcmpl-1", "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 2}}
)


# --- golden streams ----------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_golden(name: str) -> None:
    doc = load(name)
    enc, frames = encode(doc["chunks"])
    events = parse(frames)
    assert events == doc["events"]
    message = accumulate(events)
    assert {key: message[key] for key in doc["message"]} == doc["message"]
    assert enc.state is State.DONE
    assert enc.finish() == []  # idempotent
    usage = [c["usage"] for c in doc["chunks"] if c.get("usage")]
    assert enc.usage == (usage[-1] if usage else None)


def test_golden_covers_the_brief() -> None:
    wanted = {"text", "tools_interleaved", "reasoning_text_tool", "refusal", "length"}
    assert wanted <= set(NAMES)


# --- the transition table, row by row ----------------------------------------------------

#: How to bring a fresh encoder into each state.
REACH: dict[State, list[bytes]] = {
    State.START: [],
    State.IDLE: [chunk({"role": "assistant", "content": ""})],
    State.THINKING: [chunk({"reasoning_content": "hm"})],
    State.TEXT: [chunk({"content": "hi"})],
    State.TOOL: [chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]})],
    State.DONE: [chunk({"content": "hi"}), b"finish"],
}
#: One payload per input (``end`` is ``finish()``).
INPUTS: dict[str, bytes] = {
    "empty": USAGE,
    "reasoning": chunk({"reasoning_content": "think"}),
    "text": chunk({"content": "say"}),
    "tool": chunk({"tool_calls": [{"index": 7, "id": "call_b", "function": {"name": "g"}}]}),
    "stop": chunk({}, "stop"),
    "end": b"finish",
}
START = ("message_start",)
OPEN = ("content_block_start",)
DELTA = ("content_block_delta",)
STOP = ("content_block_stop",)
SIGNED_STOP = ("content_block_delta", "content_block_stop")  # signature_delta, then stop
END = ("message_delta", "message_stop")
#: (state, input) -> the frame types it emits; one row per row of TRANSITIONS.
EXPECTED: dict[tuple[State, str], tuple[str, ...]] = {
    (State.START, "empty"): START,
    (State.START, "reasoning"): START + OPEN + DELTA,
    (State.START, "text"): START + OPEN + DELTA,
    (State.START, "tool"): START + OPEN,
    (State.START, "stop"): START,
    (State.START, "end"): START + END,
    (State.IDLE, "empty"): (),
    (State.IDLE, "reasoning"): OPEN + DELTA,
    (State.IDLE, "text"): OPEN + DELTA,
    (State.IDLE, "tool"): OPEN,
    (State.IDLE, "stop"): (),
    (State.IDLE, "end"): END,
    (State.THINKING, "empty"): (),
    (State.THINKING, "reasoning"): DELTA,
    (State.THINKING, "text"): SIGNED_STOP + OPEN + DELTA,
    (State.THINKING, "tool"): SIGNED_STOP + OPEN,
    (State.THINKING, "stop"): SIGNED_STOP,
    (State.THINKING, "end"): SIGNED_STOP + END,
    (State.TEXT, "empty"): (),
    (State.TEXT, "reasoning"): STOP + OPEN + DELTA,
    (State.TEXT, "text"): DELTA,
    (State.TEXT, "tool"): STOP + OPEN,
    (State.TEXT, "stop"): STOP,
    (State.TEXT, "end"): STOP + END,
    (State.TOOL, "empty"): (),
    (State.TOOL, "reasoning"): STOP + OPEN + STOP + OPEN + DELTA,  # the held call, whole
    (State.TOOL, "text"): STOP + OPEN + STOP + OPEN + DELTA,
    (State.TOOL, "tool"): (),  # a second call while one is open: held
    (State.TOOL, "stop"): STOP + OPEN + STOP,
    (State.TOOL, "end"): STOP + OPEN + STOP + END,
    (State.DONE, "empty"): (),
    (State.DONE, "reasoning"): (),
    (State.DONE, "text"): (),
    (State.DONE, "tool"): (),
    (State.DONE, "stop"): (),
    (State.DONE, "end"): (),
}


def _run(enc: MessagesEncoder, payload: bytes) -> list[bytes]:
    return enc.finish() if payload == b"finish" else enc.feed(payload)


def test_every_row_is_tested() -> None:
    assert set(EXPECTED) == set(TRANSITIONS)


@pytest.mark.parametrize(("state", "kind"), sorted(EXPECTED, key=lambda k: (k[0].value, k[1])))
def test_transition(state: State, kind: str) -> None:
    enc = MessagesEncoder(MODEL)
    for payload in REACH[state]:
        _run(enc, payload)
    assert enc.state is state
    if state is State.TOOL and kind != "tool":
        # Row (TOOL, *) with a call held, so that closing shows the held call sent whole.
        assert _run(enc, INPUTS["tool"]) == []
    out = parse(_run(enc, INPUTS[kind]))
    assert tuple(e["type"] for e in out) == EXPECTED[state, kind]
    assert enc.state is TRANSITIONS[state, kind][1]


# --- edges -------------------------------------------------------------------------------


def test_empty_stream_is_still_a_message() -> None:
    events = parse(MessagesEncoder(MODEL).finish())
    assert [e["type"] for e in events] == ["message_start", "message_delta", "message_stop"]
    assert events[1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_message_start_says_usage_comes_later() -> None:
    (start,) = parse(MessagesEncoder(MODEL).feed(chunk({"role": "assistant"})))
    message = start["message"]
    assert message["content"] == []
    assert message["stop_reason"] is None
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert message["model"] == MODEL
    assert message["id"] == "msg_chatcmpl-1"


def test_usage_after_finish_reason_reaches_message_delta() -> None:
    enc = MessagesEncoder(MODEL)
    enc.feed(chunk({"content": "x"}))
    assert [e["type"] for e in parse(enc.feed(chunk({}, "stop")))] == ["content_block_stop"]
    assert enc.feed(USAGE) == []
    assert enc.usage == {"prompt_tokens": 5, "completion_tokens": 2}
    delta = parse(enc.finish())[0]
    assert delta["usage"]["input_tokens"] == 5
    assert delta["usage"]["output_tokens"] == 2


def test_first_finish_reason_wins() -> None:
    enc = MessagesEncoder(MODEL)
    enc.feed(chunk({"content": "x"}, "length"))
    enc.feed(chunk({}, "stop"))
    assert parse(enc.finish())[0]["delta"]["stop_reason"] == "max_tokens"


def test_choice_zero_only_text() -> None:
    other = {"index": 1, "delta": {"content": "other"}, "finish_reason": None}
    chunks = [
        {"id": "c", "choices": [other]},
        {"id": "c", "choices": [{"index": 0, "delta": {"content": "mine"}}]},
        {"id": "c", "choices": [other, {"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ]
    _, frames = encode(chunks)
    assert accumulate(parse(frames))["content"] == [{"type": "text", "text": "mine"}]


def test_error_chunk_raises() -> None:
    enc = MessagesEncoder(MODEL)
    enc.feed(chunk({"content": "x"}))
    error = {"error": {"message": "Provider disconnected", "code": 502}}
    with pytest.raises(ProviderError) as info:
        enc.feed(dumps(error))
    assert info.value.status == 502


def test_text_that_mentions_error_is_text() -> None:
    _, frames = encode([{"id": "c", "choices": [{"index": 0, "delta": {"content": '"error"'}}]}])
    assert accumulate(parse(frames))["content"][0]["text"] == '"error"'


@pytest.mark.parametrize(
    "payload", [b"not json", b"[1]", b'"x"', b"", b"\xff", b'{"id":"c"}x', b'{"a":1}{"b":2}']
)
def test_not_a_chunk(payload: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        MessagesEncoder(MODEL).feed(payload)


def test_tool_call_continued_after_its_block_closed() -> None:
    enc = MessagesEncoder(MODEL)
    enc.feed(chunk({"tool_calls": [{"index": 0, "id": "call_a", "function": {"name": "f"}}]}))
    enc.feed(chunk({"content": "between"}))
    with pytest.raises(UpstreamProtocolError):
        enc.feed(chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}))


def test_tool_calls_without_index_or_id() -> None:
    chunks = [
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"id": "call_a", "function": {"name": "f", "arguments": '{"a":'}},
        ]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"function": {"arguments": "1}"}},
        ]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
            {"function": {"name": "g", "arguments": "{}"}},
        ]}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"function_call": {"name": "h"}}}]},
        {"id": "c", "choices": [{"index": 0, "delta": {"function_call": {"arguments": "{}"}}}]},
    ]  # fmt: skip
    _, frames = encode(chunks)
    message = accumulate(parse(frames))
    assert [(b["id"], b["name"], b["input"]) for b in message["content"]] == [
        ("call_a", "f", {"a": 1}),
        ("toolu_c_1", "h", {}),  # the legacy function_call, held while call_a was open
    ]
    assert message["stop_reason"] == "tool_use"


def test_whitespace_around_a_chunk() -> None:
    frames = MessagesEncoder(MODEL).feed(b' {"id":"c","choices":[]} \n')
    assert [e["type"] for e in parse(frames)] == ["message_start"]


def test_lone_surrogate_in_a_delta() -> None:
    enc = MessagesEncoder(MODEL)
    frames = enc.feed(b'{"id":"c","choices":[{"index":0,"delta":{"content":"a\\ud800"}}]}')
    assert parse(frames)[-1]["delta"]["text"] == "a\ud800"


# --- property: any sequence of deltas is a well-formed Anthropic stream ------------------

_text = st.text(min_size=1, max_size=8)
_input = st.dictionaries(
    st.text(max_size=5), st.one_of(st.integers(), st.text(max_size=5)), max_size=3
)


@st.composite
def _streams(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[tuple[str, Any]]]:
    """Chunks, and what they say: ("text" | "reasoning", piece) or ("tool", (id, input)).

    Segments of text/reasoning pieces alternate with groups of tool calls whose pieces
    interleave freely (OpenAI never continues a call after text: that raises, tested above).
    """
    deltas: list[dict[str, Any]] = []
    said: list[tuple[str, Any]] = []
    tools = 0
    inputs: dict[str, Any] = {}
    for _ in range(draw(st.integers(0, 5))):
        if draw(st.booleans()):
            for kind in draw(st.lists(st.sampled_from(["text", "reasoning"]), max_size=4)):
                piece = draw(_text)
                key = "content" if kind == "text" else "reasoning_content"
                deltas.append({key: piece})
                said.append((kind, piece))
            continue
        calls = []
        for _ in range(draw(st.integers(1, 3))):
            arguments = json.dumps(draw(_input))
            cuts = sorted(draw(st.sets(st.integers(1, max(1, len(arguments) - 1)), max_size=4)))
            pieces = [
                arguments[a:b] for a, b in zip([0, *cuts], [*cuts, len(arguments)], strict=True)
            ]
            call_id = f"call_{tools}"
            inputs[call_id] = json.loads(arguments)
            calls.append((tools, call_id, [p for p in pieces if p]))
            tools += 1
        # Each call's own pieces stay in order (its first piece names it); the calls'
        # pieces interleave in any order.
        queues = [
            [(n, cid, True, ps[0] if ps else "")] + [(n, cid, False, p) for p in ps[1:]]
            for n, cid, ps in calls
        ]
        order = draw(st.permutations([i for i, q in enumerate(queues) for _ in q]))
        for i in order:
            n, cid, first, piece = queues[i].pop(0)
            call: dict[str, Any] = {"index": n, "function": {"arguments": piece}}
            if first:  # calls become blocks in the order they first appear
                said.append(("tool", (cid, inputs[cid])))
                call.update(id=cid, type="function")
                call["function"]["name"] = f"tool_{n}"
            deltas.append({"tool_calls": [call]})
    chunks = [
        {
            "id": "chatcmpl-p",
            "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
        }
    ]
    chunks += [{"id": "chatcmpl-p", "choices": [{"index": 0, "delta": d}]} for d in deltas]
    finish = draw(st.sampled_from([None, "stop", "length", "tool_calls"]))
    chunks.append(
        {"id": "chatcmpl-p", "choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}
    )
    if draw(st.booleans()):
        chunks.append(
            {
                "id": "chatcmpl-p",
                "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": 4},
            }
        )
    return chunks, said


def check_well_formed(events: list[dict[str, Any]]) -> None:
    types = [e["type"] for e in events]
    assert types[0] == "message_start"
    assert types[-2:] == ["message_delta", "message_stop"]
    assert "message_start" not in types[1:]
    assert "message_stop" not in types[:-1]
    open_index: int | None = None
    next_index = 0
    for event in events[1:-2]:
        kind = event["type"]
        if kind == "content_block_start":
            assert open_index is None
            assert event["index"] == next_index
            open_index = event["index"]
            next_index += 1
        elif kind == "content_block_delta":
            assert event["index"] == open_index
        else:
            assert kind == "content_block_stop"
            assert event["index"] == open_index
            open_index = None
    assert open_index is None


@settings(max_examples=300, derandomize=True, deadline=None)
@given(_streams())
def test_any_delta_sequence_is_well_formed(stream: tuple[list[dict[str, Any]], list[Any]]) -> None:
    chunks, said = stream
    _, frames = encode(chunks)
    events = parse(frames)
    check_well_formed(events)
    message = accumulate(events)
    blocks = message["content"]
    text = "".join(b["text"] for b in blocks if b["type"] == "text")
    thinking = "".join(b["thinking"] for b in blocks if b["type"] == "thinking")
    assert text == "".join(piece for kind, piece in said if kind == "text")
    assert thinking == "".join(piece for kind, piece in said if kind == "reasoning")
    calls = [(b["id"], b["input"]) for b in blocks if b["type"] == "tool_use"]
    assert calls == [value for kind, value in said if kind == "tool"]
    if calls:
        assert message["stop_reason"] in ("tool_use", "max_tokens")


# --- the plain-text fast path ---------------------------------------------------------------


def _text_chunk(text: str, ascii_only: bool, **delta_extra: object) -> bytes:
    chunk = {
        "id": "chatcmpl-fast",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": text, **delta_extra}, "finish_reason": None}],
    }
    return json.dumps(chunk, ensure_ascii=ascii_only, separators=(",", ":")).encode()


@settings(max_examples=300, deadline=None, derandomize=True)
@given(text=st.text(min_size=1), ascii_only=st.booleans())
def test_plain_text_chunks_forward_the_literal_and_mean_the_same(
    text: str, ascii_only: bool
) -> None:
    """A plain text chunk in an open text block leaves as a text_delta whose text is
    exactly the chunk's, whether its literal is forwarded as bytes or re-encoded."""
    encoder = MessagesEncoder("m")
    encoder.feed(_text_chunk("a", ascii_only=True))  # opens the text block
    (frame,) = encoder.feed(_text_chunk(text, ascii_only))
    event, data = frame.decode("utf-8", "surrogatepass").split("\n")[:2]
    assert event == "event: content_block_delta"
    delta = json.loads(data.removeprefix("data: "))
    assert delta == {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


@pytest.mark.parametrize(
    "payload",
    [
        b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":"stop"}]}',
        b'{"choices":[{"index":0,"delta":{"content":"x","reasoning_content":null}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"x"}},{"index":1,"delta":{"content":"y"}}]}',
        b'{"choices":[{"index":0,"delta":{"content":"x"}}],"usage":{"prompt_tokens":1}}',
        b'{"choices":[{"index":0,"delta":{"content":"bad \\q escape"}}]}',
    ],
)
def test_plain_text_fast_path_leaves_anything_else_to_the_parse(payload: bytes) -> None:
    from runestone_proxy.providers.chunks import plain_text as _plain_text

    assert _plain_text(payload) is None
