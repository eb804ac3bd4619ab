"""Provider errors -> what an OpenAI client gets: status, ``type`` and ``code``. No I/O.

The one mapping table from the errors a provider names to OpenAI's envelope
``{"error": {"message", "type", "param", "code"}}`` and the HTTP status, so that an OpenAI
client (the official SDKs pick their exception class from the status) sees the provider's
meaning in the words it already knows.

How a provider's error is relayed
---------------------------------
* ``message`` is always the provider's own.
* ``type`` is OpenAI's word for the class of failure, the one OpenAI clients switch on:
  ``invalid_request_error``, ``requests``/``tokens`` for rate limits, ``insufficient_quota``
  for billing and spend caps, ``server_error``.
* ``code`` carries the provider's meaning: OpenAI's own code where OpenAI has one that means
  exactly that (``invalid_api_key``, ``rate_limit_exceeded``, ``model_not_found``,
  ``context_length_exceeded``), otherwise the provider's own error name, verbatim
  (``overloaded_error``, ``api_error``, ``permission_error``, ...). Never a word Runestone
  made up.
* The status is the provider's, except where OpenAI clients know no such status: Anthropic's
  529 ``overloaded_error`` leaves as 503, the status OpenAI itself answers when its engine is
  overloaded. The openai SDKs raise ``InternalServerError`` for it and retry it with backoff
  as they do any status >= 500 (the Anthropic SDKs retry 529 the same way), and the gateway's
  failover moves on to another candidate first.
* ``retry-after`` is relayed as the provider sent it (for Anthropic, with the retryable
  errors: 429 and 5xx).

OpenAI-compatible providers already answer in OpenAI's envelope: their status, ``type`` and
``code`` pass through unchanged (``providers/openai_errors.py``); :func:`default_type` only fills a
``type`` that a body does not name, and :func:`in_band_status` gives an error that came in an
HTTP 200 body or a stream event (no status of its own) the status its code or type has at
OpenAI, so that one sent before any chunk still reaches the client as, say, a 429.

Sources: https://docs.anthropic.com/en/api/errors (types and statuses; "We may also use this
error type for other 4XX status codes" for ``invalid_request_error``; 529 ``overloaded_error``
also arrives as a stream ``event: error``) and https://platform.openai.com/docs/guides/error-codes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import attrs

from runestone_proxy.errors import ProviderError

__all__ = [
    "ANTHROPIC_DETAIL_TYPES",
    "ANTHROPIC_ERRORS",
    "ANTHROPIC_STATUS_TYPES",
    "OPENAI_CODE_STATUS",
    "OPENAI_TYPE_STATUS",
    "ErrorKind",
    "anthropic_error",
    "default_type",
    "in_band_status",
]


@attrs.frozen
class ErrorKind:
    """How one provider error answers an OpenAI client."""

    status: int
    openai_type: str
    code: str | None
    #: Whether the gateway may try another candidate (and relays ``retry-after``).
    retryable: bool


#: Anthropic error ``type`` -> the OpenAI answer. Every type in the Anthropic errors page.
ANTHROPIC_ERRORS: Final[Mapping[str, ErrorKind]] = {
    "invalid_request_error": ErrorKind(
        400, "invalid_request_error", "invalid_request_error", False
    ),
    "authentication_error": ErrorKind(401, "invalid_request_error", "invalid_api_key", False),
    "billing_error": ErrorKind(402, "insufficient_quota", "billing_error", False),
    "permission_error": ErrorKind(403, "invalid_request_error", "permission_error", False),
    "not_found_error": ErrorKind(404, "invalid_request_error", "not_found_error", False),
    "conflict_error": ErrorKind(409, "invalid_request_error", "conflict_error", False),
    "request_too_large": ErrorKind(413, "invalid_request_error", "request_too_large", False),
    "rate_limit_error": ErrorKind(429, "requests", "rate_limit_exceeded", True),
    "api_error": ErrorKind(500, "server_error", "api_error", True),
    "timeout_error": ErrorKind(504, "server_error", "timeout_error", True),
    "overloaded_error": ErrorKind(503, "server_error", "overloaded_error", True),
}

#: Anthropic ``error.details.error_code`` -> OpenAI ``type``: a 429 ``rate_limit_error`` that
#: is a spend cap, which waiting does not lift (no ``retry-after``), is OpenAI's
#: ``insufficient_quota``; the detail code itself is the ``code``.
ANTHROPIC_DETAIL_TYPES: Final[Mapping[str, str]] = {
    "enforced_spend_limit_reached": "insufficient_quota",
    "contract_spend_limit_reached": "insufficient_quota",
}

#: HTTP status -> Anthropic error type, for answers whose body is not Anthropic's JSON (a
#: proxy or CDN in front of the API: Cloudflare answers oversized requests itself).
ANTHROPIC_STATUS_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

#: An OpenAI-envelope error that arrives with no HTTP status of its own (an HTTP 200 body, a
#: stream event) and no numeric ``code``: the status its ``code``, else its ``type``, has at
#: OpenAI. Anything else is 502: the provider failed in the middle of an answer.
OPENAI_CODE_STATUS: Final[Mapping[str, int]] = {
    "invalid_api_key": 401,
    "model_not_found": 404,
    "context_length_exceeded": 400,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}
OPENAI_TYPE_STATUS: Final[Mapping[str, int]] = {
    "invalid_request_error": 400,
    "request_forbidden": 403,
    "requests": 429,
    "tokens": 429,
    "insufficient_quota": 429,
}

#: Statuses OpenAI clients do not know, and the one they get instead.
_STATUS_FOR_CLIENTS: Final[Mapping[int, int]] = {529: 503}


def default_type(status: int) -> str:
    """OpenAI's ``type`` for an error body that names none (what OpenAI itself uses)."""
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


def in_band_status(code: object, error_type: object) -> int:
    """The status for an OpenAI-envelope error that came without one (see above)."""
    status = OPENAI_CODE_STATUS.get(code) if isinstance(code, str) else None
    if status is None and isinstance(error_type, str):
        status = OPENAI_TYPE_STATUS.get(error_type)
    return 502 if status is None else status


def anthropic_error(
    error_type: str,
    message: str,
    *,
    http_status: int,
    retry_after_s: float | None = None,
    detail_code: str | None = None,
) -> ProviderError:
    """An Anthropic error ``type`` and ``message`` -> the error the client sees.

    ``http_status`` is the status it came with (200 for a stream ``error`` event or an
    in-band error body, whose status then comes from the type alone); ``detail_code`` is
    ``error.details.error_code`` when the body has one. The Anthropic type itself stays on
    the error as ``provider_type``, for an answer in Anthropic's own envelope
    (``providers/messages_errors.py``)."""
    kind = ANTHROPIC_ERRORS.get(error_type)
    if kind is None:
        # "type values will grow over time": fall back on the HTTP status class.
        status = _STATUS_FOR_CLIENTS.get(http_status, http_status)
        if not 400 <= status < 600:
            status = 502
        retryable = status == 429 or status >= 500
        kind = ErrorKind(status, default_type(status), error_type or None, retryable)
    status = kind.status
    if error_type == "invalid_request_error" and 400 <= http_status < 500:
        status = http_status  # "We may also use this error type for other 4XX status codes"
    openai_type, code = kind.openai_type, kind.code
    lowered = message.lower()
    if error_type == "not_found_error" and "model" in lowered:
        code = "model_not_found"
    elif error_type == "invalid_request_error" and "prompt is too long" in lowered:
        code = "context_length_exceeded"
    elif error_type == "rate_limit_error" and detail_code in ANTHROPIC_DETAIL_TYPES:
        openai_type, code = ANTHROPIC_DETAIL_TYPES.get(detail_code or "", openai_type), detail_code
    elif error_type == "rate_limit_error" and "token" in lowered:
        openai_type = "tokens"  # OpenAI's type for a tokens-per-minute limit
    return ProviderError(
        message,
        status=status,
        error_type=openai_type,
        retryable=kind.retryable,
        code=code,
        retry_after_s=retry_after_s if kind.retryable else None,
        provider_type=error_type or None,
    )
