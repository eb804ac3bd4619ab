"""Gateway errors in Anthropic's envelope, for clients of the Messages dialect. No I/O.

Owns the one rule that turns any :class:`~runestone_proxy.errors.GatewayError` into what an
Anthropic client (Claude Code, the ``anthropic`` SDKs) expects: a status, Anthropic's error
body ``{"type": "error", "error": {"type", "message"}, "request_id"}`` and, once a stream has
started, the same object as an ``event: error`` frame.

The rule (the Messages dialect contract, issue 12):

1. The error ``type`` is the provider's own (``ProviderError.provider_type``) when it is one of
   Anthropic's types: on the native path the client sees exactly what Anthropic said.
2. Else ``exc.code`` when it is one of Anthropic's types (``PayloadTooLarge`` is
   ``request_too_large``; an OpenAI-shaped ``ProviderError`` from an Anthropic error carries the
   Anthropic name as its code for most types).
3. Else the type the HTTP status has at Anthropic (:data:`STATUS_TYPES`); any other 4xx is
   ``invalid_request_error`` ("We may also use this error type for other 4XX status codes"),
   any other status ``api_error``.

The status sent is Anthropic's for that type (:data:`TYPE_STATUS`: ``overloaded_error`` is
529, ``api_error`` 500 even when the gateway's own status was 502), except that
``invalid_request_error`` keeps the 4xx it came with (405, 408, 414, 431, 422, ...).
Headers of the exception (``retry-after``, ``allow``) are kept.

Sources: https://docs.anthropic.com/en/api/errors ("Errors are always returned as JSON, with a
top-level error object that always includes a type and message value. The response also
includes a request_id field"; the status of each type; "When receiving a streaming response
via SSE, it's possible that an error can occur after returning a 200 response") and
https://docs.anthropic.com/en/api/messages-streaming ("event: error"). The ``anthropic`` SDK
picks its exception class from the status alone (``_make_status_error``: 400 BadRequest, 401
Authentication, 402 PaymentRequired, 403 PermissionDenied, 404 NotFound, 409 Conflict, 413
ContentTooLarge, 429 RateLimit, 529 Overloaded, other >= 500 InternalServer) and lists
``conflict_error`` (409) among its error types, so it is kept here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from runestone_proxy.errors import GatewayError
from runestone_proxy.providers.json_codec import dumps

__all__ = [
    "STATUS_TYPES",
    "TYPE_STATUS",
    "anthropic_error_body",
    "anthropic_error_frame",
    "anthropic_error_response",
    "anthropic_error_type",
]

#: Anthropic error type -> the status Anthropic answers it with.
TYPE_STATUS: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "conflict_error": 409,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}

#: The gateway's status -> the Anthropic type, for an error that names none of Anthropic's.
STATUS_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    409: "conflict_error",
    413: "request_too_large",
    414: "invalid_request_error",
    429: "rate_limit_error",
    431: "invalid_request_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}

_ERROR_EVENT: Final = b"event: error\ndata: "


def anthropic_error_type(exc: GatewayError) -> str:
    """The Anthropic error ``type`` for ``exc`` (rules 1-3 of the module docstring)."""
    provider_type = getattr(exc, "provider_type", None)
    if provider_type in TYPE_STATUS:
        return str(provider_type)
    if exc.code in TYPE_STATUS:
        return str(exc.code)
    status = exc.http_status
    named = STATUS_TYPES.get(status)
    if named is not None:
        return named
    return "invalid_request_error" if 400 <= status < 500 else "api_error"


def _status(error_type: str, status: int) -> int:
    if error_type == "invalid_request_error" and 400 <= status < 500:
        return status
    return TYPE_STATUS[error_type]


def _error_object(exc: GatewayError, error_type: str, request_id: str | None) -> bytes:
    obj: dict[str, object] = {
        "type": "error",
        "error": {"type": error_type, "message": exc.message},
    }
    if request_id:
        obj["request_id"] = request_id
    return dumps(obj)


def anthropic_error_response(
    exc: GatewayError, request_id: str | None = None
) -> tuple[int, tuple[tuple[bytes, bytes], ...], bytes]:
    """``(status, headers, body)``: the whole answer; ``headers`` are the exception's own."""
    error_type = anthropic_error_type(exc)
    body = _error_object(exc, error_type, request_id)
    return _status(error_type, exc.http_status), exc.headers, body


def anthropic_error_body(exc: GatewayError, request_id: str | None = None) -> tuple[int, bytes]:
    """``(status, body)`` in Anthropic's envelope."""
    status, _, body = anthropic_error_response(exc, request_id)
    return status, body


def anthropic_error_frame(exc: GatewayError, request_id: str | None = None) -> bytes:
    """The ``event: error`` SSE frame a started stream ends with."""
    return _ERROR_EVENT + _error_object(exc, anthropic_error_type(exc), request_id) + b"\n\n"
