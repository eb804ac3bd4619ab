"""The provider error table (``providers/provider_errors.py``), one case per documented error.

Each Anthropic error type (https://docs.anthropic.com/en/api/errors) must reach an OpenAI
client with a status its SDK knows, OpenAI's ``type`` for that class of failure and a
``code`` that keeps the provider's meaning, the same way whether it came as an HTTP error, an
in-band error body or a stream ``error`` event. No I/O.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.errors import ProviderError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.anthropic import AnthropicTranslator
from runestone_proxy.providers.base import ProviderCall
from runestone_proxy.providers.openai_errors import error_from_payload, error_from_response
from runestone_proxy.providers.provider_errors import ANTHROPIC_ERRORS, anthropic_error

#: (Anthropic type, its documented status) -> (client status, type, code, retryable).
ANTHROPIC_ROWS = [
    ("invalid_request_error", 400, 400, "invalid_request_error", "invalid_request_error", False),
    ("authentication_error", 401, 401, "invalid_request_error", "invalid_api_key", False),
    ("billing_error", 402, 402, "insufficient_quota", "billing_error", False),
    ("permission_error", 403, 403, "invalid_request_error", "permission_error", False),
    ("not_found_error", 404, 404, "invalid_request_error", "not_found_error", False),
    ("conflict_error", 409, 409, "invalid_request_error", "conflict_error", False),
    ("request_too_large", 413, 413, "invalid_request_error", "request_too_large", False),
    ("rate_limit_error", 429, 429, "requests", "rate_limit_exceeded", True),
    ("api_error", 500, 500, "server_error", "api_error", True),
    ("timeout_error", 504, 504, "server_error", "timeout_error", True),
    ("overloaded_error", 529, 503, "server_error", "overloaded_error", True),
]

#: Codes OpenAI itself sends, which an Anthropic error may borrow when it means the same.
OPENAI_CODES = {"invalid_api_key", "rate_limit_exceeded", "model_not_found"}
OPENAI_CODES |= {"context_length_exceeded"}

MESSAGE = "what the provider said"


def translator() -> AnthropicTranslator:
    return AnthropicTranslator("anthropic", clock=lambda: 1_700_000_000)


def call(stream: bool) -> ProviderCall:
    return ProviderCall(endpoint="chat", body={}, model="claude", stream=stream)


def anthropic_body(error_type: str) -> bytes:
    error = {"type": error_type, "message": MESSAGE}
    return json.dumps({"type": "error", "error": error, "request_id": "req_1"}).encode()


def test_the_table_covers_every_documented_type() -> None:
    assert set(ANTHROPIC_ERRORS) == {row[0] for row in ANTHROPIC_ROWS}


@pytest.mark.parametrize(
    ("error_type", "upstream", "status", "openai_type", "code", "retryable"), ANTHROPIC_ROWS
)
def test_anthropic_error(
    error_type: str, upstream: int, status: int, openai_type: str, code: str, retryable: bool
) -> None:
    headers = [(b"retry-after", b"4")]
    as_http = translator().parse_error(upstream, headers, anthropic_body(error_type))
    with pytest.raises(ProviderError) as in_band:
        translator().parse_response(call(False), anthropic_body(error_type))
    stream = translator().stream(call(True))
    with pytest.raises(ProviderError) as in_stream:
        stream.feed(SSEEvent(data=anthropic_body(error_type), event="error"))
    expected = {"message": MESSAGE, "type": openai_type, "param": None, "code": code}
    for error in (as_http, in_band.value, in_stream.value):
        assert error.http_status == status
        assert error.is_retryable is retryable
        assert error.envelope() == {"error": expected}
    # retry-after is relayed with what may be retried, and only with that.
    assert ((b"retry-after", b"4") in as_http.headers) is retryable


@pytest.mark.parametrize(("error_type", "upstream", "status", "_t", "code", "_r"), ANTHROPIC_ROWS)
def test_non_json_bodies_map_by_status(
    error_type: str, upstream: int, status: int, _t: str, code: str, _r: bool
) -> None:
    """A proxy or CDN in front of Anthropic answers with HTML: the status says which row."""
    error = translator().parse_error(upstream, [], b"<html>busy</html>")
    assert (error.http_status, error.code) == (status, code)
    assert error.message.endswith("<html>busy</html>")


@pytest.mark.parametrize(
    ("error_type", "message", "openai_type", "code"),
    [
        ("not_found_error", "model: claude-opus-9", "invalid_request_error", "model_not_found"),
        (
            "invalid_request_error",
            "prompt is too long: 210000 tokens > 200000 maximum",
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (
            "rate_limit_error",
            "This request would exceed your organization's rate limit of 450,000 input tokens "
            "per minute.",
            "tokens",
            "rate_limit_exceeded",
        ),
    ],
)
def test_messages_that_name_an_openai_meaning(
    error_type: str, message: str, openai_type: str, code: str
) -> None:
    error = anthropic_error(error_type, message, http_status=200)
    assert (error.envelope()["error"]["type"], error.code) == (openai_type, code)  # type: ignore[index]


@pytest.mark.parametrize("detail", ["enforced_spend_limit_reached", "contract_spend_limit_reached"])
def test_a_spend_cap_429_is_insufficient_quota(detail: str) -> None:
    """A 429 ``rate_limit_error`` whose ``error.details.error_code`` names a spend cap is
    OpenAI's ``insufficient_quota``, not a rate limit that waiting lifts."""
    error = {"type": "rate_limit_error", "message": MESSAGE, "details": {"error_code": detail}}
    body = json.dumps({"type": "error", "error": error}).encode()
    as_http = translator().parse_error(429, [], body)
    with pytest.raises(ProviderError) as in_band:
        translator().parse_response(call(False), body)
    stream = translator().stream(call(True))
    with pytest.raises(ProviderError) as in_stream:
        stream.feed(SSEEvent(data=body, event="error"))
    expected = {"message": MESSAGE, "type": "insufficient_quota", "param": None, "code": detail}
    for got in (as_http, in_band.value, in_stream.value):
        assert got.http_status == 429
        assert got.envelope() == {"error": expected}


def test_invalid_request_error_keeps_its_4xx() -> None:
    """ "We may also use this error type for other 4XX status codes not listed" (docs)."""
    error = anthropic_error("invalid_request_error", "m", http_status=422)
    assert (error.http_status, error.code) == (422, "invalid_request_error")


@given(
    error_type=st.text(max_size=30),
    message=st.text(max_size=60),
    http_status=st.sampled_from([200, 400, 404, 418, 429, 500, 502, 529, 599, 302, 700]),
)
def test_any_anthropic_error_gets_a_status_and_code_a_client_knows(
    error_type: str, message: str, http_status: int
) -> None:
    error = anthropic_error(error_type, message, http_status=http_status)
    assert 400 <= error.http_status <= 599
    assert error.http_status != 529
    assert error.message == message
    # The code is OpenAI's word for the same meaning, or the provider's own word: never ours.
    assert error.code in OPENAI_CODES | {error_type, None}
    assert error.is_retryable is (error.http_status == 429 or error.http_status >= 500)


# --- OpenAI-compatible providers: their envelope passes through unchanged --------------------

#: (status, type, code, and the status it gets when it comes in-band: a 200 body or an event)
OPENAI_ROWS = [
    (400, "invalid_request_error", None, 400),
    (400, "invalid_request_error", "context_length_exceeded", 400),
    (401, "invalid_request_error", "invalid_api_key", 401),
    (403, "request_forbidden", "unsupported_country_region_territory", 403),
    (404, "invalid_request_error", "model_not_found", 404),
    (429, "requests", "rate_limit_exceeded", 429),
    (429, "tokens", "rate_limit_exceeded", 429),
    (429, "insufficient_quota", "insufficient_quota", 429),
    (500, "server_error", None, 502),
    (503, "server_error", None, 502),
]


@pytest.mark.parametrize(("status", "openai_type", "code", "in_band"), OPENAI_ROWS)
def test_openai_errors_pass_through(
    status: int, openai_type: str, code: str | None, in_band: int
) -> None:
    fields = {"message": MESSAGE, "type": openai_type, "param": None, "code": code}
    body = json.dumps({"error": fields}).encode()
    error = error_from_response(status, [], body)
    assert error.http_status == status
    assert error.envelope() == {"error": fields}
    # In-band (a stream's error event, a 200 body): type and code unchanged, and the status
    # OpenAI gives them, so that an error before the first chunk keeps its SDK class.
    error = error_from_payload({"error": fields})
    assert error.envelope() == {"error": fields}
    assert (error.http_status, error.is_retryable) == (in_band, in_band == 429 or in_band >= 500)
