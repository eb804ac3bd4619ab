"""OpenAI-format errors -> :class:`ProviderError`, for the ``openai`` provider kind. No I/O.

Owns reading an error in every shape an OpenAI-compatible upstream sends one: a non-2xx
answer (:func:`error_from_response`), an error object found in an HTTP 200 body or a stream
event (:func:`error_from_payload`, :func:`is_error`), a stream ``event: error``
(:func:`error_from_event`), and the ``retry-after-ms`` / ``retry-after`` headers
(:func:`retry_after_s`).

Errors follow OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
(https://platform.openai.com/docs/guides/error-codes); the readers here also take the
shapes compatible servers use instead (vLLM's ``{"object": "error", ...}``, FastAPI's
``{"detail": ...}``, a bare ``{"error": "text"}``, non-JSON bodies). OpenRouter's in-band
errors (https://openrouter.ai/docs/api-reference/errors) carry their status as a numeric
``error.code``.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import Mapping
from typing import Any

from runestone_proxy.errors import ProviderError
from runestone_proxy.providers.base import HeaderPairs
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.provider_errors import default_type, in_band_status

__all__ = [
    "error_from_event",
    "error_from_payload",
    "error_from_response",
    "is_error",
    "retry_after_s",
]

_MAX_MESSAGE_CHARS = 1000


def error_from_event(data: bytes) -> ProviderError:
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        payload = {"message": data.decode("utf-8", "replace")}
    return error_from_payload(payload)


def is_error(obj: Mapping[str, Any]) -> bool:
    """A top-level ``error`` (OpenAI, OpenRouter) or vLLM's ``{"object": "error", ...}``."""
    return bool(obj.get("error")) or obj.get("object") == "error"


def retry_after_s(headers: HeaderPairs, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI's, preferred) or ``retry-after``
    (RFC 9110 §10.2.3: delay-seconds or an HTTP-date); None if absent or unreadable."""
    seconds: float | None = None
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        value = raw_value.decode("latin-1").strip()
        if name == b"retry-after-ms":
            try:
                ms = float(value)
            except ValueError:
                continue
            if ms >= 0:
                return ms / 1000.0
        elif name == b"retry-after" and seconds is None:
            seconds = _parse_retry_after(value, now)
    return seconds


def _parse_retry_after(value: str, now: float | None) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 HTTP-dates are GMT; a zone-less date is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def error_from_response(
    status: int, headers: HeaderPairs, body: bytes, *, now: float | None = None
) -> ProviderError:
    """A non-2xx answer in OpenAI's (or a compatible server's) format -> ProviderError."""
    if not 400 <= status <= 599:
        # A redirect or other non-error status where an answer was due: a gateway failure.
        message = f"upstream answered with unexpected HTTP status {status}"
        return ProviderError(message, status=502, error_type="server_error", retryable=True)
    payload: object = None
    if body.lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            payload = None
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # some compatible servers wrap the envelope in a list
    if isinstance(payload, dict):
        return error_from_payload(
            payload, status=status, retry_after=retry_after_s(headers, now=now)
        )
    text = body.decode("utf-8", "replace").strip()
    message = f"upstream returned HTTP {status}" + (f": {text}" if text else "")
    return ProviderError(
        message[:_MAX_MESSAGE_CHARS],
        status=status,
        error_type=default_type(status),
        retryable=_retryable(status),
        retry_after_s=retry_after_s(headers, now=now),
    )


def error_from_payload(
    payload: Mapping[str, Any], *, status: int | None = None, retry_after: float | None = None
) -> ProviderError:
    """An error object from a body or a stream event -> ProviderError.

    ``status`` is the HTTP status it came with; None for an in-band error (an HTTP 200 body
    or a stream event), whose status is then an OpenRouter-style numeric ``error.code`` in
    400..599 if there is one, else the status OpenAI gives its ``code`` or ``type``
    (``provider_errors.in_band_status``), else 502.
    """
    err = payload.get("error")
    if isinstance(err, Mapping):
        fields: Mapping[str, Any] = err
    elif payload.get("object") == "error":  # vLLM: the envelope's fields at top level
        fields = payload
    else:
        fields = {"message": err or payload.get("message") or payload.get("detail")}
    code = fields.get("code")
    if status is None:
        in_range = isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599
        if in_range and isinstance(code, int):
            status = code
        else:
            status = in_band_status(code, fields.get("type"))
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = dumps(message).decode() if message else f"upstream error (HTTP {status})"
    error_type = fields.get("type")
    if not isinstance(error_type, str) or not error_type:
        error_type = default_type(status)
    param = fields.get("param")
    return ProviderError(
        message[:_MAX_MESSAGE_CHARS],
        status=status,
        error_type=error_type,
        retryable=_retryable(status),
        param=param if isinstance(param, str) else None,
        code=None if code is None else str(code),
        retry_after_s=retry_after,
    )
