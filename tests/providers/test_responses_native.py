"""The Responses dialect passed through on an OpenAI provider. No I/O.

    tests/data/responses_native/stream.sse         a recorded-style OpenAI Responses stream
                                                   (reasoning summary, text, a function
                                                   call, response.completed with usage)
    tests/data/responses_native/stream.usage.json  its usage in OpenAI's chat shape
    tests/data/responses_native/stream.final.json  its final Response object

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

from runestone_proxy.config import ConfigError
from runestone_proxy.config.load import structure
from runestone_proxy.config.tree import ProviderConfig
from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent, SSEParser
from runestone_proxy.providers.base import ENDING_KINDS, ProviderCall, StreamTranslator
from runestone_proxy.providers.openai import OpenAITranslator
from runestone_proxy.providers.responses_native import (
    ENDINGS,
    Phase,
    ResponsesPassthrough,
    usage_from_response,
    usage_to_chat,
)

DATA = Path(__file__).parent.parent / "data" / "responses_native"
STREAM = (DATA / "stream.sse").read_bytes()
MODEL = "gpt-4.1-mini"
BODY: dict[str, Any] = {"model": MODEL, "input": "Weather in Paris?", "store": True}
RAW = json.dumps(BODY).encode()


def call(
    body: dict[str, Any] | None = None,
    *,
    raw: bytes | None = RAW,
    model: str = MODEL,
    stream: bool = False,
) -> ProviderCall:
    return ProviderCall(
        endpoint="responses",
        body=BODY if body is None else body,
        model=model,
        stream=stream,
        raw=raw,
    )


def events(data: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    out = parser.feed(data)
    parser.close()
    return out


def ev(obj: dict[str, Any]) -> SSEEvent:
    return SSEEvent(json.dumps(obj).encode(), event=obj["type"])


def relay(stream: ResponsesPassthrough, data: bytes) -> bytes:
    return b"".join(b"".join(stream.feed(event)) for event in events(data))


TRANSLATOR = OpenAITranslator("openai")


# --- request ---------------------------------------------------------------------------------


def test_raw_bytes_are_forwarded_untouched() -> None:
    up = TRANSLATOR.build_request(call(), "sk-test")
    assert up.body is RAW
    assert (up.method, up.path) == ("POST", "/responses")
    assert (b"authorization", b"Bearer sk-test") in up.headers
    assert (b"accept", b"application/json") in up.headers


def test_a_stream_is_forwarded_untouched_and_asks_for_sse() -> None:
    body = {**BODY, "stream": True}
    raw = json.dumps(body).encode()
    up = TRANSLATOR.build_request(call(body, raw=raw, stream=True), None)
    assert up.body is raw
    assert (b"accept", b"text/event-stream") in up.headers
    assert not any(name == b"authorization" for name, _ in up.headers)


def test_another_model_is_re_encoded_with_the_rest_as_sent() -> None:
    up = TRANSLATOR.build_request(call(model="gpt-4.1"), None)
    assert up.body is not RAW
    assert json.loads(up.body) == {**BODY, "model": "gpt-4.1"}


@pytest.mark.parametrize(
    ("body", "stream", "sent"),
    [
        pytest.param({**BODY, "tenant_id": "t1"}, False, BODY, id="runestone-field"),
        pytest.param(BODY, True, {**BODY, "stream": True}, id="stream-set"),
        pytest.param(
            {**BODY, "stream": True, "stream_options": {"include_obfuscation": False}},
            False,
            BODY,
            id="stream-removed",
        ),
    ],
)
def test_a_body_that_needs_a_rewrite_is_re_encoded(
    body: dict[str, Any], stream: bool, sent: dict[str, Any]
) -> None:
    up = TRANSLATOR.build_request(call(body, raw=json.dumps(body).encode(), stream=stream), None)
    assert json.loads(up.body) == sent


def test_without_raw_bytes_the_body_is_encoded() -> None:
    up = TRANSLATOR.build_request(call(raw=None), None)
    assert json.loads(up.body) == BODY


# --- whole answers ----------------------------------------------------------------------------


def test_a_response_object_comes_back_as_it_is() -> None:
    final = (DATA / "stream.final.json").read_bytes()
    assert TRANSLATOR.parse_response(call(), final) is final
    compact = json.dumps(json.loads(final), separators=(",", ":")).encode()
    assert TRANSLATOR.parse_response(call(), compact) is compact


def test_a_failed_response_object_is_an_answer_not_an_envelope() -> None:
    failed = {
        "id": "resp_1",
        "object": "response",
        "status": "failed",
        "error": {"code": "server_error", "message": "boom"},
        "output": [],
    }
    body = json.dumps(failed).encode()
    assert TRANSLATOR.parse_response(call(), body) is body


def test_an_error_envelope_in_a_200_is_an_error() -> None:
    body = b'{"error": {"message": "No allowed providers", "code": 404}}'
    with pytest.raises(ProviderError) as info:
        TRANSLATOR.parse_response(call(), body)
    assert info.value.status == 404


def test_a_body_that_is_not_an_object_is_a_protocol_error() -> None:
    with pytest.raises(UpstreamProtocolError):
        TRANSLATOR.parse_response(call(), b"[]")


def test_an_http_error_reads_openais_envelope() -> None:
    body = json.dumps(
        {
            "error": {
                "message": "Unsupported parameter: 'temperature'.",
                "type": "invalid_request_error",
                "param": "temperature",
                "code": "unsupported_parameter",
            }
        }
    ).encode()
    exc = TRANSLATOR.parse_error(400, (), body)
    assert (exc.status, exc.param, exc.code) == (400, "temperature", "unsupported_parameter")


def test_usage_from_a_whole_response() -> None:
    final = (DATA / "stream.final.json").read_bytes()
    assert usage_from_response(final) == json.loads((DATA / "stream.usage.json").read_bytes())
    assert usage_from_response(b'{"object": "response", "usage": null}') is None
    assert usage_from_response(b"not json") is None
    assert usage_from_response(b"[1]") is None


def test_usage_without_total_or_details() -> None:
    usage = usage_to_chat({"input_tokens": 3, "output_tokens": 4})
    assert usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


# --- the stream -------------------------------------------------------------------------------


def test_the_translator_streams_a_responses_call_through() -> None:
    stream = TRANSLATOR.stream(call(stream=True))
    assert isinstance(stream, ResponsesPassthrough)
    typed: StreamTranslator = stream
    assert not typed.done


def test_golden_stream_leaves_as_it_came() -> None:
    stream = ResponsesPassthrough("openai")
    assert relay(stream, STREAM) == STREAM
    assert stream.done
    assert stream.phase is Phase.DONE
    assert stream.usage == json.loads((DATA / "stream.usage.json").read_bytes())
    assert stream.final is not None
    assert json.loads(stream.final) == json.loads((DATA / "stream.final.json").read_bytes())
    assert stream.finish("eof") == []


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=30))
def test_golden_stream_cut_anywhere_leaves_as_it_came(cuts: list[int]) -> None:
    stream = ResponsesPassthrough("openai")
    parser = SSEParser()
    out = []
    bounds = [0, *sorted(cuts), len(STREAM)]
    for start, end in itertools.pairwise(bounds):
        for event in parser.feed(STREAM[start:end]):
            out.extend(stream.feed(event))
    parser.close()
    assert b"".join(out) == STREAM
    assert stream.done


def test_events_without_an_event_line_are_named_by_their_type() -> None:
    stream = ResponsesPassthrough("openai")
    data = b'{"type":"response.output_text.delta","sequence_number":3,"delta":"Hi"}'
    assert stream.feed(SSEEvent(data)) == [
        b"event: response.output_text.delta\ndata: " + data + b"\n\n"
    ]


def test_nothing_is_relayed_after_the_terminal_event() -> None:
    stream = ResponsesPassthrough("openai")
    relay(stream, STREAM)
    assert stream.feed(ev({"type": "response.output_text.delta", "delta": "late"})) == []


def test_an_incomplete_response_ends_the_stream() -> None:
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "incomplete",
        "incomplete_details": {"reason": "max_output_tokens"},
        "usage": {"input_tokens": 5, "output_tokens": 16, "total_tokens": 21},
    }
    stream = ResponsesPassthrough("openai")
    event = {"type": "response.incomplete", "sequence_number": 9, "response": response}
    assert len(stream.feed(ev(event))) == 1
    assert stream.done
    assert stream.usage == {"prompt_tokens": 5, "completion_tokens": 16, "total_tokens": 21}
    assert stream.final is not None
    assert json.loads(stream.final) == response


def test_a_failed_response_records_final_then_raises() -> None:
    response = {
        "id": "resp_1",
        "object": "response",
        "status": "failed",
        "error": {"code": "rate_limit_exceeded", "message": "Slow down."},
        "usage": None,
    }
    stream = ResponsesPassthrough("openai")
    stream.feed(ev({"type": "response.created", "sequence_number": 0, "response": {}}))
    with pytest.raises(ProviderError) as info:
        stream.feed(ev({"type": "response.failed", "sequence_number": 1, "response": response}))
    assert (info.value.status, info.value.code, info.value.message) == (
        429,
        "rate_limit_exceeded",
        "Slow down.",
    )
    assert stream.final is not None
    assert json.loads(stream.final) == response
    assert stream.usage is None
    assert stream.done


def test_a_failed_response_without_an_error_still_raises() -> None:
    stream = ResponsesPassthrough("openai")
    failed = {"type": "response.failed", "response": {"status": "failed", "error": None}}
    with pytest.raises(ProviderError) as info:
        stream.feed(ev(failed))
    assert info.value.status == 502


def test_an_error_event_raises_with_its_code_and_message() -> None:
    stream = ResponsesPassthrough("openai")
    error = {
        "type": "error",
        "code": "invalid_prompt",
        "message": "Invalid prompt.",
        "param": "input",
        "sequence_number": 1,
    }
    with pytest.raises(ProviderError) as info:
        stream.feed(ev(error))
    exc = info.value
    assert (exc.code, exc.message, exc.param, exc.status) == (
        "invalid_prompt",
        "Invalid prompt.",
        "input",
        502,
    )
    assert not stream.done


@pytest.mark.parametrize(
    "data",
    [b"{not json", b"[1, 2]", b'{"type": "response.completed", "response": null}'],
)
def test_an_unreadable_terminal_event_is_a_protocol_error(data: bytes) -> None:
    stream = ResponsesPassthrough("openai")
    with pytest.raises(UpstreamProtocolError):
        stream.feed(SSEEvent(data, event="response.completed"))


def test_deltas_are_not_parsed() -> None:
    stream = ResponsesPassthrough("openai")
    data = b"not json at all"
    assert stream.feed(SSEEvent(data, event="response.output_text.delta")) == [
        b"event: response.output_text.delta\ndata: not json at all\n\n"
    ]


# --- endings ----------------------------------------------------------------------------------


def test_the_endings_table_is_total() -> None:
    assert set(ENDINGS) == set(itertools.product(Phase, ENDING_KINDS))


def in_phase(phase: Phase) -> ResponsesPassthrough:
    stream = ResponsesPassthrough("openai")
    if phase is Phase.START:
        return stream
    stream_events = events(STREAM)
    upto = stream_events if phase is Phase.DONE else stream_events[:10]
    for event in upto:
        stream.feed(event)
    assert stream.phase is phase
    return stream


@pytest.mark.parametrize(("phase", "ending"), sorted(ENDINGS, key=str))
def test_every_ending(phase: Phase, ending: Any) -> None:
    stream = in_phase(phase)
    if ENDINGS[phase, ending] == "end":
        assert stream.finish(ending) == []
    else:
        with pytest.raises(UpstreamProtocolError, match="terminal event"):
            stream.finish(ending)


# --- config -----------------------------------------------------------------------------------


def provider(**fields: Any) -> ProviderConfig:
    base = {"kind": "openai", "base_url": "https://api.example.com/v1"}
    return ProviderConfig(**{**base, **fields})


@pytest.mark.parametrize(
    ("fields", "speaks"),
    [
        pytest.param({"name": "openai"}, True, id="openai-by-name"),
        pytest.param({"name": "azure", "flavor": "openai"}, True, id="openai-flavor"),
        pytest.param({"name": "groq"}, False, id="groq"),
        pytest.param({"name": "openrouter"}, False, id="openrouter"),
        pytest.param({"name": "local"}, False, id="generic"),
        pytest.param({"name": "local", "responses_api": True}, True, id="generic-on"),
        pytest.param({"name": "openai", "responses_api": False}, False, id="openai-off"),
        pytest.param({"name": "mock", "kind": "mock", "base_url": None}, False, id="mock"),
        pytest.param(
            {"name": "openai", "kind": "anthropic", "responses_api": False}, False, id="anthropic"
        ),
    ],
)
def test_speaks_responses(fields: dict[str, Any], speaks: bool) -> None:
    assert provider(**fields).speaks_responses is speaks


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        pytest.param(
            {"kind": "anthropic", "base_url": "https://api.anthropic.com", "responses_api": True},
            'only kind "openai" speaks the Responses API',
            id="wrong-kind",
        ),
        pytest.param(
            {"kind": "openai", "base_url": "http://127.0.0.1:8000/v1", "responses_api": "yes"},
            "expected a boolean",
            id="not-a-boolean",
        ),
    ],
)
def test_responses_api_is_validated(entry: dict[str, Any], message: str) -> None:
    raw = {"providers": [{"name": "p", **entry}]}
    with pytest.raises(ConfigError) as info:
        structure(raw, "test.toml")
    assert len(info.value.messages) == 1
    assert message in info.value.messages[0]
    assert "responses_api" in info.value.messages[0]
