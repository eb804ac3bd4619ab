"""The one error tree: every failure the gateway can answer with, and how it answers.

Each class knows its HTTP status and the ``type``/``code`` of OpenAI's error envelope
(``{"error": {"message", "type", "param", "code"}}``), and whether a router may retry the
request elsewhere. Foreign exceptions (sockets, TLS, SQLite, provider bodies) are mapped to
these once, at the edge that meets them; everything above that edge speaks only this tree.

    GatewayError                    500 server_error
    ├── BadRequest                  400 invalid_request_error
    │   ├── InvalidJSON             400 (code invalid_json)
    │   ├── InvalidParam            400 (code invalid_value, names ``param``)
    │   └── NoCandidate             400 (code no_candidate: routing constraints excluded all)
    ├── AuthenticationFailed        401 (code invalid_api_key)
    ├── PermissionDenied            403
    ├── NotFound                    404 (code not_found)
    │   └── ModelNotFound           404 (code model_not_found)
    ├── MethodNotAllowed            405 (carries ``Allow``)
    ├── RequestTimeout              408
    ├── PayloadTooLarge             413
    ├── URITooLong                  414
    ├── HeaderFieldsTooLarge        431
    ├── RateLimited                 429 (code rate_limit_exceeded, carries ``retry-after``)
    │   └── BudgetExceeded          429 insufficient_quota (a budget is spent; not retryable)
    ├── ServiceUnavailable          503 (draining, overloaded; retryable)
    └── UpstreamError               502 (retryable)
        ├── UpstreamConnectError    502 (refused, reset, TLS failure)
        ├── UpstreamTimeout         504
        ├── UpstreamProtocolError   502 (a provider broke its own wire format)
        └── ProviderError           the provider's own status and meaning, passed through
"""

from __future__ import annotations

import json
from typing import ClassVar


def _with_retry_after(
    headers: tuple[tuple[bytes, bytes], ...], retry_after_s: float | None
) -> tuple[tuple[bytes, bytes], ...]:
    """Prepend ``retry-after``: RFC 9110 §10.2.3 delay-seconds, a non-negative integer,
    rounded up so a client never retries early."""
    if retry_after_s is None:
        return headers
    seconds = max(0, int(-(-retry_after_s // 1)))
    return ((b"retry-after", str(seconds).encode()), *headers)


class GatewayError(Exception):
    """Base of the tree. Subclasses set the class attributes; instances carry the message
    (and :class:`ProviderError` instances their own ``status``/``error_type``/``retryable``)."""

    status: int = 500
    error_type: str = "server_error"
    default_code: ClassVar[str | None] = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers = headers

    @property
    def http_status(self) -> int:
        return self.status

    @property
    def is_retryable(self) -> bool:
        return self.retryable

    def envelope(self) -> dict[str, object]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def body(self) -> bytes:
        return json.dumps(self.envelope(), separators=(",", ":")).encode()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, status={self.http_status})"


class BadRequest(GatewayError):
    status = 400
    error_type = "invalid_request_error"


class InvalidJSON(BadRequest):
    default_code = "invalid_json"


class InvalidParam(BadRequest):
    default_code = "invalid_value"


class NoCandidate(BadRequest):
    default_code = "no_candidate"


class AuthenticationFailed(GatewayError):
    status = 401
    error_type = "invalid_request_error"
    default_code = "invalid_api_key"


class PermissionDenied(GatewayError):
    status = 403
    error_type = "invalid_request_error"
    default_code = "permission_denied"


class NotFound(GatewayError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class ModelNotFound(NotFound):
    default_code = "model_not_found"


class MethodNotAllowed(GatewayError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"

    def __init__(self, message: str, *, allow: tuple[str, ...]) -> None:
        super().__init__(message, headers=((b"allow", ", ".join(allow).encode()),))
        self.allow = allow


class RequestTimeout(GatewayError):
    status = 408
    error_type = "invalid_request_error"
    default_code = "request_timeout"


class PayloadTooLarge(GatewayError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class URITooLong(GatewayError):
    status = 414
    error_type = "invalid_request_error"
    default_code = "uri_too_long"


class HeaderFieldsTooLarge(GatewayError):
    status = 431
    error_type = "invalid_request_error"
    default_code = "headers_too_large"


class RateLimited(GatewayError):
    status = 429
    error_type = "requests"
    default_code = "rate_limit_exceeded"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        code: str | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(message, code=code, headers=_with_retry_after(headers, retry_after_s))
        self.retry_after_s = retry_after_s


class BudgetExceeded(RateLimited):
    """429 ``insufficient_quota``: a key's or tenant's budget is spent (OpenAI's type and code
    for an account whose quota is used up). Retrying before the budget resets cannot
    succeed: not retryable (a queued job fails rather than waits), ``retry-after`` is the
    time to the reset, and ``x-should-retry: false`` tells the OpenAI and Anthropic SDKs,
    which retry every 429 by default, not to."""

    error_type = "insufficient_quota"
    default_code = "insufficient_quota"
    retryable = False

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> None:
        super().__init__(
            message, retry_after_s=retry_after_s, headers=((b"x-should-retry", b"false"), *headers)
        )


class ServiceUnavailable(GatewayError):
    status = 503
    error_type = "server_error"
    default_code = "service_unavailable"
    retryable = True


class UpstreamError(GatewayError):
    status = 502
    error_type = "server_error"
    default_code: ClassVar[str | None] = "bad_gateway"
    retryable = True


class UpstreamConnectError(UpstreamError):
    default_code = "upstream_connect_error"


class UpstreamTimeout(UpstreamError):
    status = 504
    default_code = "upstream_timeout"


class UpstreamProtocolError(UpstreamError):
    default_code = "upstream_protocol_error"


class ProviderError(UpstreamError):
    """A provider answered with an error: keep its status, meaning and retryability.

    ``code`` stays null when the provider sent none, as OpenAI itself does.
    ``provider_type`` is the provider's own name for the error (Anthropic's
    ``overloaded_error``), so that an answer in the provider's own dialect can say it exactly."""

    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        status: int,
        error_type: str,
        retryable: bool,
        param: str | None = None,
        code: str | None = None,
        retry_after_s: float | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        provider_type: str | None = None,
    ) -> None:
        super().__init__(
            message, param=param, code=code, headers=_with_retry_after(headers, retry_after_s)
        )
        self.status = status
        self.error_type = error_type
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.provider_type = provider_type
