"""The ``openai`` translator: request bytes, pass-through bodies and streams, quirks, errors.

Plain data only: golden payloads from tests/data/openai/ go in, bytes and errors come out.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent, SSEParser
from runestone_proxy.providers.base import RUNESTONE_FIELDS, Endpoint, ProviderCall, Translator
from runestone_proxy.providers.openai import OpenAITranslator
from runestone_proxy.providers.openai_errors import error_from_response, retry_after_s
from runestone_proxy.providers.openai_stream import OpenAIStream

DATA = Path(__file__).parent.parent / "data" / "openai"


def golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


def events_of(stream: bytes) -> list[SSEEvent]:
    parser = SSEParser()
    return parser.feed(stream) + parser.close()


def run_stream(st: OpenAIStream, stream: bytes) -> list[bytes]:
    out = [payload for event in events_of(stream) for payload in st.feed(event)]
    return out + st.finish()


def call(
    body: dict[str, Any],
    *,
    endpoint: Endpoint = "chat",
    model: str | None = None,
    stream: bool = False,
    include_usage: bool = False,
    raw: bytes | None = None,
) -> ProviderCall:
    return ProviderCall(
        endpoint=endpoint,
        body=body,
        model=model if model is not None else body.get("model", "gpt-4o-mini"),
        stream=stream,
        include_usage=include_usage,
        raw=raw,
    )


def test_is_a_translator() -> None:
    translator: Translator = OpenAITranslator("openai", "openai")
    assert translator is not None


# -- build_request --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "path"),
    [("chat", "/chat/completions"), ("completions", "/completions"), ("embeddings", "/embeddings")],
)
def test_path_by_endpoint(endpoint: Endpoint, path: str) -> None:
    up = OpenAITranslator("openai").build_request(call({"model": "m"}, endpoint=endpoint), "k")
    assert (up.method, up.path) == ("POST", path)


@pytest.mark.parametrize(
    ("key", "stream", "headers"),
    [
        (
            "sk-test",
            True,
            [
                (b"authorization", b"Bearer sk-test"),
                (b"content-type", b"application/json"),
                (b"accept", b"text/event-stream"),
            ],
        ),
        (None, False, [(b"content-type", b"application/json"), (b"accept", b"application/json")]),
    ],
)
def test_headers(key: str | None, stream: bool, headers: list[tuple[bytes, bytes]]) -> None:
    body = {"model": "m", "stream": stream}
    up = OpenAITranslator("openai").build_request(call(body, stream=stream), key)
    assert list(up.headers) == headers


def test_raw_bytes_forwarded_untouched() -> None:
    raw = golden("chat_request.json")
    body = json.loads(raw)
    c = call(body, stream=True, include_usage=True, raw=raw)
    up = OpenAITranslator("openai").build_request(c, "k")
    assert up.body is raw


@pytest.mark.parametrize(
    ("body", "kwargs", "sent"),
    [
        # alias resolved to another model id
        (
            {"model": "fast", "messages": []},
            {"model": "gpt-4o"},
            {"model": "gpt-4o", "messages": []},
        ),
        # Runestone extras never go upstream; unknown OpenAI fields do
        (
            {"model": "m", "provider": "openai", "tenant_id": "t", "webhook_url": "u", "x_new": 1},
            {},
            {"model": "m", "x_new": 1},
        ),
        # the gateway streams although the body did not ask (legacy /v1/chat/stream)
        ({"model": "m"}, {"stream": True}, {"model": "m", "stream": True}),
        # include_usage added without losing the client's other stream options
        (
            {"model": "m", "stream": True, "stream_options": {"x": 1}},
            {"stream": True, "include_usage": True},
            {"model": "m", "stream": True, "stream_options": {"x": 1, "include_usage": True}},
        ),
        # a non-stream call (e.g. an overflow job) drops stream and stream_options
        (
            {"model": "m", "stream": True, "stream_options": {"include_usage": True}},
            {"stream": False},
            {"model": "m"},
        ),
    ],
)
def test_rewrites(body: dict[str, Any], kwargs: dict[str, Any], sent: dict[str, Any]) -> None:
    raw = json.dumps(body).encode()
    up = OpenAITranslator("openai").build_request(call(body, raw=raw, **kwargs), "k")
    assert json.loads(up.body) == sent


def test_every_runestone_field_is_left_out_of_a_rewritten_body() -> None:
    """The one list (providers/base.py) that the API layer and request checks also use."""
    assert {"provider", "model_family", "capabilities", "tenant_id", "webhook_url"} < (
        RUNESTONE_FIELDS
    )
    body = {"model": "m", **dict.fromkeys(RUNESTONE_FIELDS, "x"), "x_new": 1}
    up = OpenAITranslator("openai").build_request(call(body, raw=json.dumps(body).encode()), "k")
    assert json.loads(up.body) == {"model": "m", "x_new": 1}


def test_embeddings_body_is_not_given_stream_fields() -> None:
    body = {"model": "e", "input": "hi", "provider": "openai"}
    up = OpenAITranslator("openai").build_request(call(body, endpoint="embeddings"), None)
    assert json.loads(up.body) == {"model": "e", "input": "hi"}


# -- parse_response -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["chat_response.json", "completion_response.json"])
def test_fine_bodies_pass_through_untouched(name: str) -> None:
    body = golden(name)
    assert OpenAITranslator("openai").parse_response(call({}), body) is body


def test_word_error_in_content_is_not_an_error() -> None:
    body = json.dumps(
        {"choices": [{"message": {"content": 'the "error" field'}}], "error": None}
    ).encode()
    assert OpenAITranslator("openrouter", "openrouter").parse_response(call({}), body) is body


def test_openrouter_error_with_status_200() -> None:
    with pytest.raises(ProviderError) as info:
        OpenAITranslator("openrouter", "openrouter").parse_response(
            call({}), golden("openrouter_error_200.json")
        )
    err = info.value
    assert (err.http_status, err.code, err.is_retryable) == (429, "429", True)
    assert err.message == "Provider returned error"


def test_groq_x_groq_usage_lifted_in_whole_body() -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    body = json.dumps({"id": "c", "choices": [], "x_groq": {"id": "req", "usage": usage}})
    out = OpenAITranslator("groq", "groq").parse_response(call({}), body.encode())
    assert json.loads(out)["usage"] == usage


@pytest.mark.parametrize("body", [b"", b"<html>oops</html>", b"[1]"])
def test_non_object_2xx_is_a_protocol_error(body: bytes) -> None:
    with pytest.raises(UpstreamProtocolError):
        OpenAITranslator("openai").parse_response(call({}), body)


# -- streams --------------------------------------------------------------------------------


def test_openai_stream_passes_payloads_through() -> None:
    stream = golden("stream_tools.sse")
    st = OpenAITranslator("openai").stream(call({}, stream=True, include_usage=True))
    out = run_stream(st, stream)
    assert out == [e.data for e in events_of(stream)][:-1]  # everything but [DONE]
    assert st.done
    assert st.usage is not None
    assert st.usage["total_tokens"] == 106
    tool_args = "".join(
        json.loads(p)["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for p in out[:-2]
    )
    assert json.loads(tool_args) == {"location": "Paris, Île-de-France", "unit": "celsius"}


def test_stream_without_usage() -> None:
    st = OpenAITranslator("openai").stream(call({}, stream=True))
    out = run_stream(st, golden("stream_text.sse"))
    assert len(out) == 11
    assert st.usage is None


def test_finished_stream_without_done_ends() -> None:
    stream = golden("stream_text.sse")
    whole = run_stream(OpenAITranslator("openai").stream(call({}, stream=True)), stream)
    st = OpenAITranslator("openai").stream(call({}, stream=True))
    assert run_stream(st, stream.removesuffix(b"data: [DONE]\n\n")) == whole


@pytest.mark.parametrize("cut", [b"\n\ndata: [DONE]\n\n", b"data: [DONE]\n\n"])
def test_stream_cut_before_the_finish_fails(cut: bytes) -> None:
    # The first cut leaves the finishing event without its blank line: never dispatched.
    stream = golden("stream_text.sse").removesuffix(cut)
    if cut == b"data: [DONE]\n\n":
        stream = stream[: stream.rindex(b"data: ")]
    st = OpenAITranslator("openai").stream(call({}, stream=True))
    with pytest.raises(UpstreamProtocolError, match=r"finish_reason, without \[DONE\]"):
        run_stream(st, stream)


def test_nothing_after_done_is_forwarded() -> None:
    st = OpenAITranslator("openai").stream(call({}, stream=True))
    assert st.feed(SSEEvent(b"[DONE]")) == []
    assert st.feed(SSEEvent(b'{"choices":[]}')) == []
    assert st.finish() == []


def test_openrouter_mid_stream_error() -> None:
    st = OpenAITranslator("openrouter", "openrouter").stream(call({}, stream=True))
    events = events_of(golden("openrouter_stream_error.sse"))
    assert st.feed(events[0]) == [events[0].data]
    assert st.feed(events[1]) == [events[1].data]
    with pytest.raises(ProviderError) as info:
        st.feed(events[2])
    assert info.value.message == "Provider disconnected unexpectedly"
    assert (info.value.http_status, info.value.is_retryable) == (502, True)


@pytest.mark.parametrize(
    ("event", "status", "code"),
    [
        # code null stays null, as OpenAI sends it
        (
            SSEEvent(b'{"error":{"message":"boom","type":"server_error","code":null}}'),
            502,
            None,
        ),
        (
            SSEEvent(b'{"object":"error","message":"bad","type":"BadRequestError","code":400}'),
            400,
            "400",
        ),
        (SSEEvent(b'{"message":"overloaded"}', event="error"), 502, None),
    ],
)
def test_in_band_error_shapes(event: SSEEvent, status: int, code: str | None) -> None:
    st = OpenAITranslator("vllm", "generic").stream(call({}, stream=True))
    with pytest.raises(ProviderError) as info:
        st.feed(event)
    assert (info.value.http_status, info.value.code) == (status, code)


def test_non_json_event_is_a_protocol_error() -> None:
    st = OpenAITranslator("x", "generic").stream(call({}, stream=True))
    with pytest.raises(UpstreamProtocolError):
        st.feed(SSEEvent(b"hello"))


def test_groq_usage_on_the_chunk_without_include_usage() -> None:
    # Recorded for accounting; the client did not ask, so Groq's bytes pass untouched.
    st = OpenAITranslator("groq", "groq").stream(call({}, stream=True))
    out = [json.loads(p) for p in run_stream(st, golden("groq_stream.sse"))]
    assert len(out) == 5
    assert out[-1]["choices"][0]["finish_reason"] == "stop"
    assert out[-1]["x_groq"]["usage"]["total_tokens"] == 42
    assert all("usage" not in chunk for chunk in out)
    assert st.usage is not None
    assert st.usage["prompt_tokens"] == 38


def test_groq_final_usage_chunk_with_include_usage() -> None:
    st = OpenAITranslator("groq", "groq").stream(call({}, stream=True, include_usage=True))
    out = [json.loads(p) for p in run_stream(st, golden("groq_stream.sse"))]
    assert len(out) == 6
    assert out[-2]["choices"][0]["finish_reason"] == "stop"
    assert out[-2].get("usage") is None  # counted once, in the usage chunk
    final = out[-1]
    assert final["choices"] == []
    assert final["usage"]["total_tokens"] == 42
    assert final["id"] == out[0]["id"]
    assert final["object"] == "chat.completion.chunk"


def test_groq_native_usage_chunk_is_not_duplicated() -> None:
    usage = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    st = OpenAITranslator("groq", "groq").stream(call({}, stream=True, include_usage=True))
    chunks = [
        {
            "id": "c",
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
            "x_groq": {"id": "r", "usage": usage},
        },
        {"id": "c", "choices": [], "usage": usage, "x_groq": {"id": "r", "usage": usage}},
    ]
    out = [p for c in chunks for p in st.feed(SSEEvent(json.dumps(c).encode()))]
    out += st.feed(SSEEvent(b"[DONE]")) + st.finish()
    assert [json.loads(p)["choices"] == [] for p in out] == [False, True]


# -- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "status", "error_type", "code", "param", "retryable"),
    [
        ("error_401.json", 401, "invalid_request_error", "invalid_api_key", None, False),
        ("error_429.json", 429, "requests", "rate_limit_exceeded", None, True),
        (
            "error_400_param.json",
            400,
            "invalid_request_error",
            "invalid_value",
            "temperature",
            False,
        ),
    ],
)
def test_openai_error_bodies(
    name: str, status: int, error_type: str, code: str, param: str | None, retryable: bool
) -> None:
    body = golden(name)
    err = OpenAITranslator("openai").parse_error(status, [], body)
    assert (err.http_status, err.code, err.param, err.is_retryable) == (
        status,
        code,
        param,
        retryable,
    )
    # The client sees the provider's own envelope.
    assert err.envelope() == json.loads(body)
    assert err.envelope()["error"]["type"] == error_type  # type: ignore[index]


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (408, True),
        (409, True),
        (422, False),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (529, True),
    ],
)
def test_retryable_by_status(status: int, retryable: bool) -> None:
    assert error_from_response(status, [], b"").is_retryable is retryable


@pytest.mark.parametrize(
    ("body", "message", "error_type"),
    [
        (
            b"<html><body>502 Bad Gateway</body></html>",
            "upstream returned HTTP 502: <html>",
            "server_error",
        ),
        (b"", "upstream returned HTTP 502", "server_error"),
        (b'{"detail":"Not Found"}', "Not Found", "server_error"),
        (b'{"error":"model is loading"}', "model is loading", "server_error"),
        (b'[{"error":{"message":"quota","type":"x","code":1}}]', "quota", "x"),
        (
            b'{"object":"error","message":"bad input","type":"BadRequestError"}',
            "bad input",
            "BadRequestError",
        ),
    ],
)
def test_other_error_shapes(body: bytes, message: str, error_type: str) -> None:
    err = error_from_response(502, [], body)
    assert err.message.startswith(message)
    assert err.envelope()["error"]["type"] == error_type  # type: ignore[index]


def test_long_error_bodies_are_cut() -> None:
    assert len(error_from_response(500, [], b"x" * 10_000).message) <= 1000


def test_non_error_status_becomes_bad_gateway() -> None:
    err = error_from_response(302, [], b"")
    assert err.http_status == 502
    assert err.is_retryable


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ([(b"retry-after", b"7")], 7.0),
        ([(b"Retry-After", b"0")], 0.0),
        ([(b"retry-after-ms", b"1500")], 1.5),
        ([(b"retry-after", b"7"), (b"retry-after-ms", b"250")], 0.25),  # ms is preferred
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:28:30 GMT")], 30.0),
        ([(b"retry-after", b"Wed, 21 Oct 2015 07:27:00 GMT")], 0.0),  # in the past
        ([(b"retry-after", b"soon")], None),
        ([(b"retry-after", b"-3")], None),
        ([], None),
    ],
)
def test_retry_after(headers: list[tuple[bytes, bytes]], seconds: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert retry_after_s(headers, now=now) == seconds


def test_retry_after_reaches_the_client() -> None:
    err = OpenAITranslator("openai").parse_error(
        429, [(b"retry-after-ms", b"1200")], golden("error_429.json")
    )
    assert err.retry_after_s == 1.2
    assert (b"retry-after", b"2") in err.headers  # rounded up to whole seconds


def _chunk(content: str | None, finish: str | None = None, **extra: Any) -> bytes:
    choice = {"index": 0, "delta": {} if content is None else {"content": content}}
    body = {"id": "c", "object": "chat.completion.chunk", "choices": [choice], **extra}
    choice["finish_reason"] = finish
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


@pytest.mark.parametrize("include_usage", [False, True])
def test_usage_null_on_every_chunk_and_a_content_of_usage(include_usage: bool) -> None:
    """OpenAI puts ``"usage":null`` on every chunk of a stream that asked for usage; the
    per-chunk check passes those through untouched, and a content string of exactly
    ``"usage"`` beside a real usage object does not hide it."""
    usage = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
    chunks = [
        _chunk("usage", usage=None),
        _chunk("usage", usage=usage),  # the content comes first, the object after it
        _chunk(None, "stop", usage=None),
    ]
    final = json.dumps({"id": "c", "choices": [], "usage": usage}, separators=(",", ":"))
    stream = b"".join(chunks) + b"data: " + final.encode() + b"\n\ndata: [DONE]\n\n"
    st = OpenAIStream("openai", include_usage=include_usage)
    first, second = events_of(chunks[0] + chunks[1])
    assert st.feed(first) == [chunks[0][6:-2]]
    assert st.usage is None
    assert st.feed(second) == [chunks[1][6:-2]]
    assert st.usage == usage
    st = OpenAIStream("openai", include_usage=include_usage)
    out = run_stream(st, stream)
    assert out[:3] == [c[6:-2] for c in chunks]  # bytes as they came
    assert out[3:] == ([final.encode()] if include_usage else [])
    assert st.usage == usage
