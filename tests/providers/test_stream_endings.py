"""The stream ending tables: one test per row of each translator's ``ENDINGS``.

Each row is (phase or state, how the upstream ended without its terminator) -> outcome.
A test drives a fresh translator into the row's phase with real events, calls
``finish(ending)`` and checks the outcome: ``end`` returns the trailing payloads (the usage
chunk when the client asked), ``error`` raises and never makes up a ``finish_reason``.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers import anthropic_stream, openai_stream
from runestone_proxy.providers.anthropic_stream import AnthropicStream, State
from runestone_proxy.providers.base import ENDING_KINDS
from runestone_proxy.providers.openai_stream import OpenAIStream, Phase

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}


def oa(choices: list[dict[str, Any]], **extra: Any) -> SSEEvent:
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return SSEEvent(json.dumps({**chunk, "choices": choices, **extra}).encode())


def choice(index: int = 0, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": {"content": "x"}, "finish_reason": finish}


_FINISHED = [oa([choice()]), oa([choice(finish="stop")]), oa([], usage=USAGE)]
OPENAI_SETUP: dict[Phase, list[SSEEvent]] = {
    Phase.OPEN: [oa([choice()])],
    Phase.FINISHED: _FINISHED,
    Phase.DONE: [*_FINISHED, SSEEvent(b"[DONE]")],
}


def test_openai_table_is_complete() -> None:
    assert set(openai_stream.ENDINGS) == set(itertools.product(Phase, ENDING_KINDS))


@pytest.mark.parametrize(("row", "outcome"), list(openai_stream.ENDINGS.items()), ids=str)
def test_openai_ending_row(row: tuple[Phase, str], outcome: str) -> None:
    phase, ending = row
    st = OpenAIStream("up", include_usage=True)
    for event in OPENAI_SETUP[phase]:
        st.feed(event)
    assert st.phase is phase
    if outcome == "error":
        with pytest.raises(UpstreamProtocolError, match="without \\[DONE\\]"):
            st.finish(ending)  # type: ignore[arg-type]
    else:
        assert st.finish(ending) == []  # type: ignore[arg-type]
        assert st.done
        assert st.usage == USAGE


def test_openai_every_choice_that_appeared_must_finish() -> None:
    st = OpenAIStream("up", n=2)
    st.feed(oa([choice(0), choice(1)]))
    st.feed(oa([choice(0, "stop")]))
    assert st.phase is Phase.OPEN
    with pytest.raises(UpstreamProtocolError):
        st.finish("eof")
    st.feed(oa([choice(1, "length")]))
    assert st.phase is Phase.FINISHED
    assert st.finish("eof") == []


@pytest.mark.parametrize(
    ("chunk", "finished"),
    [
        (b'{"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}', True),
        (b'{"choices":[{"index":0,"delta":{},"finish_reason":"length"}]}', True),
        (b'{"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": null}]}', False),
        (b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}', False),
        (b'{"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":  null}]}', False),
        (b'{"choices":[{"index":0,"delta":{"content":"x"}}]}', False),
        # The key quoted inside content is escaped, so it is not the chunk's own.
        (b'{"choices":[{"delta":{"content":"\\"finish_reason\\":\\"stop"},"index":0}]}', False),
    ],
)
def test_openai_finish_reason_is_read_from_the_bytes(chunk: bytes, finished: bool) -> None:
    st = OpenAIStream("up")
    st.feed(SSEEvent(chunk))
    assert st.phase is (Phase.FINISHED if finished else Phase.OPEN)


def test_openai_groq_usage_comes_at_an_ending_without_done() -> None:
    st = OpenAIStream("groq", include_usage=True)
    st.feed(oa([choice()]))
    st.feed(oa([choice(finish="stop")], x_groq={"id": "r", "usage": USAGE}))
    [trailer] = st.finish("eof")
    assert json.loads(trailer)["choices"] == []
    assert json.loads(trailer)["usage"] == USAGE


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_usage_chunk_only_when_asked(include_usage: bool) -> None:
    st = OpenAIStream("up", include_usage=include_usage)
    usage_chunk = oa([], usage=USAGE)
    assert st.feed(usage_chunk) == ([usage_chunk.data] if include_usage else [])
    assert st.usage == USAGE  # recorded for accounting either way


@pytest.mark.parametrize("include_usage", [True, False])
def test_openai_groq_usage_chunk_only_when_asked(include_usage: bool) -> None:
    st = OpenAIStream("groq", include_usage=include_usage)
    event = oa([], x_groq={"id": "r", "usage": USAGE})
    assert st.feed(event) == ([event.data] if include_usage else [])
    assert st.usage == USAGE


# --- Anthropic -------------------------------------------------------------------------------


def an(data: dict[str, Any]) -> SSEEvent:
    return SSEEvent(json.dumps(data).encode(), event=str(data["type"]))


START = an({"type": "message_start", "message": {"id": "msg_1", "model": "claude", "usage": {}}})
TEXT_START = an(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
TEXT_DELTA = an(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
)
BLOCK_STOP = an({"type": "content_block_stop", "index": 0})
DELTA = an(
    {
        "type": "message_delta",
        "delta": {"stop_reason": "end_turn"},
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }
)
STOP = an({"type": "message_stop"})

ANTHROPIC_SETUP: dict[State, list[SSEEvent]] = {
    State.START: [],
    State.MESSAGE: [START],
    State.BLOCK: [START, TEXT_START, TEXT_DELTA],
    State.ENDING: [START, TEXT_START, TEXT_DELTA, BLOCK_STOP, DELTA],
    State.DONE: [START, TEXT_START, TEXT_DELTA, BLOCK_STOP, DELTA, STOP],
}


def anthropic(include_usage: bool = True) -> AnthropicStream:
    return AnthropicStream("anthropic", "claude", 1, include_usage=include_usage)


def test_anthropic_table_is_complete() -> None:
    assert set(anthropic_stream.ENDINGS) == set(itertools.product(State, ENDING_KINDS))


@pytest.mark.parametrize(("row", "outcome"), list(anthropic_stream.ENDINGS.items()), ids=str)
def test_anthropic_ending_row(row: tuple[State, str], outcome: str) -> None:
    state, ending = row
    st = anthropic()
    for event in ANTHROPIC_SETUP[state]:
        st.feed(event)
    assert st.state is state
    if outcome == "error":
        with pytest.raises(UpstreamProtocolError, match="before message_stop"):
            st.finish(ending)  # type: ignore[arg-type]
        return
    out = st.finish(ending)  # type: ignore[arg-type]
    assert st.done
    if state is State.ENDING:  # ended as message_stop would: the usage chunk the client asked
        [usage_chunk] = out
        assert json.loads(usage_chunk)["choices"] == []
        assert json.loads(usage_chunk)["usage"]["total_tokens"] == 5
    else:
        assert out == []
    assert st.usage is not None
    assert st.usage["total_tokens"] == 5


def test_anthropic_message_delta_without_stop_reason_is_no_finish() -> None:
    st = anthropic()
    for event in [START, TEXT_START, TEXT_DELTA, BLOCK_STOP]:
        st.feed(event)
    st.feed(an({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 2}}))
    assert st.state is State.ENDING
    with pytest.raises(UpstreamProtocolError):
        st.finish("eof")


def test_anthropic_message_delta_closes_an_open_tool_block() -> None:
    # max_tokens cut the tool's input: no content_block_stop before message_delta.
    st = anthropic(include_usage=False)
    st.feed(START)
    tool = {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}
    st.feed(an({"type": "content_block_start", "index": 0, "content_block": tool}))
    piece = {"type": "input_json_delta", "partial_json": '{"ci'}
    st.feed(an({"type": "content_block_delta", "index": 0, "delta": piece}))
    cut = an({"type": "message_delta", "delta": {"stop_reason": "max_tokens"}, "usage": {}})
    [chunk] = st.feed(cut)
    assert json.loads(chunk)["choices"][0]["finish_reason"] == "length"
    assert st.feed(STOP) == []
    assert st.done


def test_anthropic_message_delta_closes_an_open_thinking_block() -> None:
    st = anthropic(include_usage=False)
    st.feed(START)
    block = {"type": "thinking", "thinking": ""}
    st.feed(an({"type": "content_block_start", "index": 0, "content_block": block}))
    piece = {"type": "thinking_delta", "thinking": "hmm"}
    st.feed(an({"type": "content_block_delta", "index": 0, "delta": piece}))
    signed, finishing = st.feed(DELTA)
    assert json.loads(signed)["choices"][0]["delta"]["thinking_blocks"][0]["thinking"] == "hmm"
    assert json.loads(finishing)["choices"][0]["finish_reason"] == "stop"


def test_anthropic_usage_chunk_only_when_asked() -> None:
    st = anthropic(include_usage=False)
    for event in ANTHROPIC_SETUP[State.DONE]:
        for payload in st.feed(event):
            assert json.loads(payload)["choices"] != []
    assert st.usage is not None
    assert st.usage["total_tokens"] == 5
