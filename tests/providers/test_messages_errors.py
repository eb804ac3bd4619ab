"""Gateway errors in Anthropic's envelope (``providers/messages_errors.py``). No I/O.

    tests/data/anthropic_native/errors.json   Anthropic error answers (status, headers, body)
                                              and the status, type and headers an Anthropic
                                              client must get back on the native path

Every row of both tables, every class of the error tree, and the answers read back with the
``anthropic`` SDK's own status -> exception rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runestone_proxy import errors
from runestone_proxy.errors import GatewayError, ProviderError
from runestone_proxy.protocol.sse import SSEParser
from runestone_proxy.providers.anthropic import AnthropicTranslator
from runestone_proxy.providers.messages_errors import (
    STATUS_TYPES,
    TYPE_STATUS,
    anthropic_error_body,
    anthropic_error_frame,
    anthropic_error_response,
    anthropic_error_type,
)

DATA = Path(__file__).parent.parent / "data" / "anthropic_native"
CASES: list[dict[str, Any]] = json.loads((DATA / "errors.json").read_text())


def provider_error(status: int, **kw: Any) -> ProviderError:
    return ProviderError("boom", status=status, error_type="server_error", retryable=False, **kw)


def envelope(body: bytes) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads(body)
    assert obj["type"] == "error"
    assert set(obj["error"]) == {"type", "message"}
    return obj


@pytest.mark.parametrize(("error_type", "status"), list(TYPE_STATUS.items()))
def test_every_anthropic_type_by_provider_type(error_type: str, status: int) -> None:
    exc = provider_error(503, provider_type=error_type, code="something_else")
    got_status, body = anthropic_error_body(exc)
    assert got_status == status  # Anthropic's status for the type, not the 503 it came with
    assert envelope(body)["error"] == {"type": error_type, "message": "boom"}


@pytest.mark.parametrize(("error_type", "status"), list(TYPE_STATUS.items()))
def test_every_anthropic_type_by_code(error_type: str, status: int) -> None:
    exc = GatewayError("nope", code=error_type)  # status 500: the code decides
    got_status, body = anthropic_error_body(exc)
    assert got_status == status
    assert envelope(body)["error"]["type"] == error_type


@pytest.mark.parametrize(("status", "error_type"), list(STATUS_TYPES.items()))
def test_every_status(status: int, error_type: str) -> None:
    got_status, body = anthropic_error_body(provider_error(status))
    assert envelope(body)["error"]["type"] == error_type
    if error_type == "invalid_request_error":
        assert got_status == status  # "other 4XX status codes" keep theirs
    else:
        assert got_status == TYPE_STATUS[error_type]


@pytest.mark.parametrize(
    ("status", "error_type", "sent"),
    [
        (502, "api_error", 500),
        (503, "overloaded_error", 529),
        (422, "invalid_request_error", 422),
        (418, "invalid_request_error", 418),
        (501, "api_error", 500),
    ],
)
def test_status_fallbacks(status: int, error_type: str, sent: int) -> None:
    got_status, body = anthropic_error_body(provider_error(status))
    assert (got_status, envelope(body)["error"]["type"]) == (sent, error_type)


def test_provider_type_that_is_not_anthropic_s_falls_to_code_then_status() -> None:
    exc = provider_error(429, provider_type="some_openai_type", code="overloaded_error")
    assert anthropic_error_type(exc) == "overloaded_error"
    assert anthropic_error_type(provider_error(429, provider_type="x", code="y")) == (
        "rate_limit_error"
    )


LEAVES = [
    (errors.GatewayError("m"), 500, "api_error"),
    (errors.BadRequest("m"), 400, "invalid_request_error"),
    (errors.InvalidJSON("m"), 400, "invalid_request_error"),
    (errors.InvalidParam("m", param="x"), 400, "invalid_request_error"),
    (errors.NoCandidate("m"), 400, "invalid_request_error"),
    (errors.AuthenticationFailed("m"), 401, "authentication_error"),
    (errors.PermissionDenied("m"), 403, "permission_error"),
    (errors.NotFound("m"), 404, "not_found_error"),
    (errors.ModelNotFound("m"), 404, "not_found_error"),
    (errors.MethodNotAllowed("m", allow=("POST",)), 405, "invalid_request_error"),
    (errors.RequestTimeout("m"), 408, "invalid_request_error"),
    (errors.PayloadTooLarge("m"), 413, "request_too_large"),
    (errors.URITooLong("m"), 414, "invalid_request_error"),
    (errors.HeaderFieldsTooLarge("m"), 431, "invalid_request_error"),
    (errors.RateLimited("m", retry_after_s=2.5), 429, "rate_limit_error"),
    (errors.ServiceUnavailable("m"), 529, "overloaded_error"),
    (errors.UpstreamError("m"), 500, "api_error"),
    (errors.UpstreamConnectError("m"), 500, "api_error"),
    (errors.UpstreamTimeout("m"), 504, "timeout_error"),
    (errors.UpstreamProtocolError("m"), 500, "api_error"),
]


@pytest.mark.parametrize(("exc", "status", "error_type"), LEAVES, ids=lambda v: repr(v))
def test_every_class_of_the_tree(exc: GatewayError, status: int, error_type: str) -> None:
    got_status, headers, body = anthropic_error_response(exc)
    assert got_status == status
    assert envelope(body) == {"type": "error", "error": {"type": error_type, "message": "m"}}
    assert headers == exc.headers  # retry-after, allow kept


def test_retry_after_and_allow_are_kept() -> None:
    _, headers, _ = anthropic_error_response(errors.RateLimited("m", retry_after_s=2.5))
    assert headers == ((b"retry-after", b"3"),)
    _, headers, _ = anthropic_error_response(errors.MethodNotAllowed("m", allow=("POST",)))
    assert headers == ((b"allow", b"POST"),)


def test_request_id_at_top_level() -> None:
    _, body = anthropic_error_body(errors.NotFound("gone"), request_id="req_1")
    assert json.loads(body) == {
        "type": "error",
        "error": {"type": "not_found_error", "message": "gone"},
        "request_id": "req_1",
    }


def test_error_frame() -> None:
    exc = provider_error(503, provider_type="overloaded_error")
    frame = anthropic_error_frame(exc)
    assert frame.startswith(b"event: error\ndata: {")
    assert frame.endswith(b"}\n\n")
    parser = SSEParser()
    (event,) = parser.feed(frame)
    assert event.event == "error"
    assert json.loads(event.data) == {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "boom"},
    }
    assert b"request_id" in anthropic_error_frame(exc, request_id="req_2")


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['status']}-{c['expect']['type']}")
def test_anthropic_error_bodies_round_trip(case: dict[str, Any]) -> None:
    """An Anthropic error answer -> ProviderError -> Anthropic's envelope again, on the
    native path: the same type, Anthropic's status for it, retry-after kept."""
    headers = [(k.encode(), v.encode()) for k, v in case["headers"]]
    exc = AnthropicTranslator("anthropic", clock=lambda: 0).parse_error(
        case["status"], headers, case["body"].encode()
    )
    status, out_headers, body = anthropic_error_response(exc)
    expect = case["expect"]
    assert status == expect["status"]
    assert [[k.decode(), v.decode()] for k, v in out_headers] == expect["headers"]
    obj = envelope(body)
    assert obj["error"]["type"] == expect["type"]
    sent = json.loads(case["body"]) if case["body"].startswith("{") else None
    if sent is not None:
        assert obj["error"]["message"] == sent["error"]["message"]


def test_sdk_picks_the_exception_from_the_status() -> None:
    """The ``anthropic`` SDK's own rule reads each answer as the class for its type."""
    anthropic = pytest.importorskip("anthropic")
    httpx = pytest.importorskip("httpx")
    client = anthropic.Anthropic(api_key="k", base_url="http://127.0.0.1:9")
    newer = anthropic.APIStatusError  # classes older SDKs lack: any status error will do
    classes = {
        "invalid_request_error": anthropic.BadRequestError,
        "authentication_error": anthropic.AuthenticationError,
        "billing_error": getattr(anthropic, "PaymentRequiredError", newer),
        "permission_error": anthropic.PermissionDeniedError,
        "not_found_error": anthropic.NotFoundError,
        "conflict_error": anthropic.ConflictError,
        "request_too_large": getattr(anthropic, "ContentTooLargeError", newer),
        "rate_limit_error": anthropic.RateLimitError,
        "api_error": anthropic.InternalServerError,
        "timeout_error": getattr(anthropic, "GatewayTimeoutError", anthropic.InternalServerError),
        "overloaded_error": getattr(anthropic, "OverloadedError", anthropic.InternalServerError),
    }
    assert set(classes) == set(TYPE_STATUS)
    for error_type, cls in classes.items():
        status, body = anthropic_error_body(provider_error(500, provider_type=error_type))
        request = httpx.Request("POST", "http://127.0.0.1:9/v1/messages")
        response = httpx.Response(status, content=body, request=request)
        err = client._make_status_error_from_response(response)
        assert isinstance(err, cls), (error_type, type(err))
        assert err.type == error_type
