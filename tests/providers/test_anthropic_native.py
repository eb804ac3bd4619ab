"""The Messages dialect passed through on an Anthropic provider. No I/O.

    tests/data/anthropic_native/stream.sse         a recorded-style Anthropic stream (ping,
                                                   thinking with signature_delta, text,
                                                   tool_use with input_json_delta, usage)
    tests/data/anthropic_native/stream.usage.json  its usage in OpenAI's shape

A native stream leaves as it came: the frames, joined, are the recorded bytes.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.errors import InvalidParam, ProviderError, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent, SSEParser
from runestone_proxy.providers import anthropic_native
from runestone_proxy.providers.anthropic import AnthropicTranslator
from runestone_proxy.providers.anthropic_native import AnthropicPassthrough, Phase
from runestone_proxy.providers.base import ENDING_KINDS, ProviderCall, StreamTranslator

DATA = Path(__file__).parent.parent / "data" / "anthropic_native"
MODEL = "claude-sonnet-4-5-20250929"
BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 1024,
    "messages": [{"role": "user", "content": "Hello, Claude"}],
}
RAW = json.dumps(BODY).encode()


def translator() -> AnthropicTranslator:
    return AnthropicTranslator("anthropic", clock=lambda: 1)


def call(
    body: dict[str, Any] | None = None,
    *,
    raw: bytes | None = RAW,
    endpoint: str = "messages",
    model: str = MODEL,
    stream: bool = False,
    headers: tuple[tuple[bytes, bytes], ...] = (),
) -> ProviderCall:
    return ProviderCall(
        endpoint=endpoint,  # type: ignore[arg-type]
        body=BODY if body is None else body,
        model=model,
        stream=stream,
        raw=raw,
        headers=headers,
    )


def events(data: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    out = parser.feed(data)
    parser.close()
    return out


def ev(obj: dict[str, Any]) -> SSEEvent:
    return SSEEvent(json.dumps(obj).encode(), event=obj["type"])


# --- request ---------------------------------------------------------------------------------


def test_raw_bytes_are_forwarded_untouched() -> None:
    up = translator().build_request(call(), "sk-ant-test")
    assert up.body is RAW
    assert up.method == "POST"
    assert up.path == "/messages"
    assert up.headers == (
        (b"x-api-key", b"sk-ant-test"),
        (b"anthropic-version", b"2023-06-01"),
        (b"content-type", b"application/json"),
    )


def test_stream_raw_forwarded_when_its_flag_matches() -> None:
    body = {**BODY, "stream": True}
    raw = json.dumps(body).encode()
    up = translator().build_request(call(body, raw=raw, stream=True), None)
    assert up.body is raw
    assert up.headers[-1] == (b"accept", b"text/event-stream")
    assert up.headers[0][0] == b"anthropic-version"  # no key: no x-api-key header


def test_client_headers_forwarded_and_its_version_wins() -> None:
    sent = (
        (b"anthropic-version", b"2023-01-01"),
        (b"anthropic-beta", b"interleaved-thinking-2025-05-14,context-1m-2025-08-07"),
        (b"x-app", b"cli"),
        (b"x-claude-code-session-id", b"5f0c"),
    )
    up = translator().build_request(call(headers=sent), "k")
    assert up.headers == (
        (b"x-api-key", b"k"),
        (b"anthropic-version", b"2023-01-01"),
        *sent[1:],
        (b"content-type", b"application/json"),
    )


def test_client_copies_of_our_own_headers_are_not_forwarded() -> None:
    sent = ((b"x-api-key", b"client"), (b"content-type", b"text/plain"), (b"anthropic-beta", b"b"))
    up = translator().build_request(call(headers=sent), "k")
    assert [h for h in up.headers if h[0] in {b"x-api-key", b"content-type"}] == [
        (b"x-api-key", b"k"),
        (b"content-type", b"application/json"),
    ]
    assert (b"anthropic-beta", b"b") in up.headers


def test_model_rewrite_re_encodes() -> None:
    up = translator().build_request(call(model="claude-opus-4-1"), None)
    assert up.body is not RAW
    assert json.loads(up.body) == {**BODY, "model": "claude-opus-4-1"}
    assert list(json.loads(up.body)) == list(BODY)  # key order kept


@pytest.mark.parametrize(
    ("extra", "stream", "expect"),
    [
        ({"tenant_id": "t1", "provider": "anthropic"}, False, {}),
        ({"stream": True}, False, {}),
        ({}, True, {"stream": True}),
        ({"stream": 1}, True, {"stream": True}),
    ],
)
def test_rewrites(extra: dict[str, Any], stream: bool, expect: dict[str, Any]) -> None:
    body = {**BODY, **extra}
    up = translator().build_request(call(body, raw=json.dumps(body).encode(), stream=stream), None)
    assert json.loads(up.body) == {**BODY, **expect}


def test_no_raw_is_encoded() -> None:
    up = translator().build_request(call(raw=None), None)
    assert json.loads(up.body) == BODY


def test_count_tokens_request() -> None:
    body = {k: v for k, v in BODY.items() if k != "max_tokens"}
    raw = json.dumps(body).encode()
    up = translator().build_request(call(body, raw=raw, endpoint="count_tokens"), "k")
    assert up.path == "/messages/count_tokens"
    assert up.body is raw
    with_stream = {**body, "stream": False}
    up = translator().build_request(
        call(with_stream, raw=json.dumps(with_stream).encode(), endpoint="count_tokens"), "k"
    )
    assert json.loads(up.body) == body  # count_tokens bodies carry no stream


# --- whole answers ---------------------------------------------------------------------------


def test_whole_answer_returned_unchanged() -> None:
    body = json.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": MODEL,
            "content": [{"type": "text", "text": "Hi ☀️"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 10, "output_tokens": 3},
        },
        ensure_ascii=False,
    ).encode()
    assert translator().parse_response(call(), body) is body


def test_count_tokens_answer_unchanged() -> None:
    body = b'{"input_tokens": 14}'
    assert translator().parse_response(call(endpoint="count_tokens"), body) is body


@pytest.mark.parametrize("body", [b"[]", b"not json", b'"x"', b"\xff"])
def test_whole_answer_must_be_an_object(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        translator().parse_response(call(), body)


def test_in_band_error_raises() -> None:
    body = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    with pytest.raises(ProviderError) as info:
        translator().parse_response(call(), body)
    assert info.value.provider_type == "overloaded_error"
    assert info.value.message == "Overloaded"


def test_count_tokens_does_not_stream() -> None:
    with pytest.raises(InvalidParam):
        translator().stream(call(endpoint="count_tokens", stream=True))


# --- the stream ------------------------------------------------------------------------------


def test_golden_stream_frames_equal_the_input() -> None:
    recorded = (DATA / "stream.sse").read_bytes()
    st = translator().stream(call(stream=True))
    assert isinstance(st, AnthropicPassthrough)
    frames = [frame for event in events(recorded) for frame in st.feed(event)]
    assert st.done
    assert st.finish() == []
    assert b"".join(frames) == recorded
    assert len(frames) == recorded.count(b"\n\n")
    assert st.usage == json.loads((DATA / "stream.usage.json").read_text())


def test_golden_stream_in_any_chunking() -> None:
    recorded = (DATA / "stream.sse").read_bytes()
    for size in (1, 7, 64):
        parser, st = SSEParser(), AnthropicPassthrough("anthropic")
        frames = []
        for at in range(0, len(recorded), size):
            for event in parser.feed(recorded[at : at + size]):
                frames.extend(st.feed(event))
        assert b"".join(frames) == recorded


def test_is_a_stream_translator() -> None:
    st: StreamTranslator = AnthropicPassthrough("anthropic")
    assert st.usage is None
    assert not st.done


def test_text_deltas_are_not_parsed() -> None:
    """Only events that carry usage or errors are decoded: a broken text delta passes."""
    st = AnthropicPassthrough("anthropic")
    junk = SSEEvent(b"{not json", event="content_block_delta")
    assert st.feed(junk) == [b"event: content_block_delta\ndata: {not json\n\n"]


def test_unknown_events_and_pings_pass() -> None:
    st = AnthropicPassthrough("anthropic")
    assert st.feed(SSEEvent(b'{"type":"ping"}', event="ping")) == [
        b'event: ping\ndata: {"type":"ping"}\n\n'
    ]
    assert st.feed(SSEEvent(b'{"type":"future_event"}', event="future_event")) == [
        b'event: future_event\ndata: {"type":"future_event"}\n\n'
    ]


def test_event_without_name_takes_its_type() -> None:
    st = AnthropicPassthrough("anthropic")
    assert st.feed(SSEEvent(b'{"type":"ping"}')) == [b'event: ping\ndata: {"type":"ping"}\n\n']


def test_multi_line_data_stays_one_field_per_line() -> None:
    st = AnthropicPassthrough("anthropic")
    frame = st.feed(SSEEvent(b'{"type":\n"ping"}', event="ping"))[0]
    assert frame == b'event: ping\ndata: {"type":\ndata: "ping"}\n\n'
    assert events(frame) == [SSEEvent(b'{"type":\n"ping"}', event="ping")]


_NAMES = st.sampled_from(["content_block_delta", "ping", "content_block_start"]) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12
).filter(lambda name: name not in {"message", "message_start", "message_delta", "error"})


@settings(derandomize=True, max_examples=200, deadline=None)
@given(name=_NAMES, data=st.binary(min_size=1).filter(lambda data: b"\r" not in data))
def test_any_passed_event_parses_back_to_itself(name: str, data: bytes) -> None:
    """Whatever the parser can hand over (its data has no CR: lines were split there), the
    frame reads back as the same event."""
    (frame,) = AnthropicPassthrough("anthropic").feed(SSEEvent(data, event=name))
    assert events(frame) == [SSEEvent(data, event=name)]


def test_usage_keeps_start_counts_a_delta_leaves_out() -> None:
    st = AnthropicPassthrough("anthropic")
    usage = {"input_tokens": 25, "cache_creation_input_tokens": 5, "output_tokens": 1}
    st.feed(ev({"type": "message_start", "message": {"usage": usage}}))
    assert st.usage == {
        "prompt_tokens": 30,
        "completion_tokens": 1,
        "total_tokens": 31,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    st.feed(
        ev(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 15, "input_tokens": None},
            }
        )
    )
    assert st.usage is not None
    assert (st.usage["prompt_tokens"], st.usage["completion_tokens"]) == (30, 15)


def test_error_event_raises_the_mapped_error() -> None:
    st = AnthropicPassthrough("anthropic")
    st.feed(ev({"type": "message_start", "message": {"usage": {"input_tokens": 1}}}))
    error = {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    with pytest.raises(ProviderError) as info:
        st.feed(ev(error))
    assert info.value.provider_type == "overloaded_error"
    assert info.value.retryable


@pytest.mark.parametrize("name", ["message_start", "message_delta", "error"])
def test_read_events_must_be_json_objects(name: str) -> None:
    st = AnthropicPassthrough("anthropic")
    for data in (b"{cut", b"[1]"):
        with pytest.raises(UpstreamProtocolError):
            st.feed(SSEEvent(data, event=name))


# --- endings: one test per row of ENDINGS ------------------------------------------------------

_START = ev({"type": "message_start", "message": {"usage": {"input_tokens": 3}}})
_BLOCK = [
    ev({"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
    ev({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "x"}}),
]
_NO_STOP = ev({"type": "message_delta", "delta": {}, "usage": {"output_tokens": 1}})
_STOP = ev({"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": {}})
SETUP: dict[Phase, list[SSEEvent]] = {
    Phase.START: [ev({"type": "ping"})],
    Phase.OPEN: [_START, *_BLOCK, _NO_STOP],
    Phase.STOPPED: [_START, *_BLOCK, _STOP],
    Phase.DONE: [_START, *_BLOCK, _STOP, ev({"type": "message_stop"})],
}


def test_endings_table_is_complete() -> None:
    assert set(anthropic_native.ENDINGS) == set(itertools.product(Phase, ENDING_KINDS))


@pytest.mark.parametrize(("row", "outcome"), list(anthropic_native.ENDINGS.items()), ids=str)
def test_ending_row(row: tuple[Phase, str], outcome: str) -> None:
    phase, ending = row
    st = AnthropicPassthrough("anthropic")
    for event in SETUP[phase]:
        st.feed(event)
    assert st.phase is phase
    if outcome == "error":
        with pytest.raises(UpstreamProtocolError, match="before message_stop"):
            st.finish(ending)  # type: ignore[arg-type]
        assert not st.done
        return
    out = st.finish(ending)  # type: ignore[arg-type]
    assert st.done
    if phase is Phase.DONE:
        assert out == []
    else:  # the missing message_stop, as Anthropic frames it
        assert out == [b'event: message_stop\ndata: {"type":"message_stop"}\n\n']
        (stop,) = events(out[0])
        assert (stop.event, json.loads(stop.data)) == ("message_stop", {"type": "message_stop"})


def test_message_delta_after_stop_keeps_done() -> None:
    st = AnthropicPassthrough("anthropic")
    for event in SETUP[Phase.DONE]:
        st.feed(event)
    st.feed(_STOP)
    assert st.done
