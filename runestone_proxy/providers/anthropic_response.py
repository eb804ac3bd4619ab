"""Anthropic Message objects and error bodies -> OpenAI shapes. No I/O.

Owns what the whole-response path and the stream path share: stop reason -> ``finish_reason``,
Anthropic ``usage`` -> OpenAI ``usage``, one Message -> one ``chat.completion``, and Anthropic's
error types -> :class:`~runestone_proxy.errors.ProviderError` in OpenAI's envelope.

Sources: the Messages API response shape (https://docs.anthropic.com/en/api/messages) and the
error list (https://docs.anthropic.com/en/api/errors): "Errors are always returned as JSON, with
a top-level error object that always includes a type and message value", e.g.
``{"type": "error", "error": {"type": "not_found_error", "message": "..."}}``. A proxy or CDN
in front of the API (Cloudflare answers oversized requests itself) may still send non-JSON
bodies; those are mapped by HTTP status.
"""

from __future__ import annotations

import datetime
import email.utils
import json
from collections.abc import Mapping, Sequence
from typing import Any, Final

import attrs

from runestone_proxy.errors import ProviderError

JSON = dict[str, Any]

#: Anthropic ``stop_reason`` -> OpenAI ``finish_reason`` (Messages API, "stop_reason").
#: ``pause_turn`` ends a server-tool turn that the client may continue; to an OpenAI client
#: that is a normal stop.
FINISH_REASONS: Final[Mapping[str, str]] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
    "pause_turn": "stop",
}


def finish_reason(stop_reason: str) -> str:
    return FINISH_REASONS.get(stop_reason, "stop")


def usage_to_openai(usage: Mapping[str, Any]) -> JSON:
    """Anthropic counts cached prompt tokens apart from ``input_tokens``; OpenAI includes them
    in ``prompt_tokens`` and reports the cache hits as ``prompt_tokens_details.cached_tokens``
    (https://docs.anthropic.com/en/docs/build-with-claude/prompt-caching)."""
    created = _count(usage, "cache_creation_input_tokens")
    read = _count(usage, "cache_read_input_tokens")
    prompt = _count(usage, "input_tokens") + created + read
    completion = _count(usage, "output_tokens")
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": read},
    }


def _count(usage: Mapping[str, Any], key: str) -> int:
    value = usage.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def tool_arguments(tool_input: Any) -> str:
    """A ``tool_use`` block's ``input`` object as OpenAI's ``arguments`` JSON string."""
    return json.dumps(tool_input if tool_input is not None else {}, **_COMPACT)


_COMPACT: Final[Mapping[str, Any]] = {"separators": (",", ":"), "ensure_ascii": False}


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; a lone surrogate (a client's escape) is written back as ``\\u``
    escapes, as ``providers.openai.dumps`` does."""
    text = json.dumps(obj, **_COMPACT)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def chat_completion(message: Mapping[str, Any], *, model: str, created: int) -> JSON:
    """One Anthropic Message -> one OpenAI ``chat.completion`` object.

    Text blocks are joined into ``content`` (null when the turn is only tool use); thinking is
    surfaced as ``reasoning_content`` plus the signed ``thinking_blocks`` a client must send
    back on its next turn (extended-thinking docs, "Preserving thinking blocks"). Block types
    with no OpenAI counterpart (server tool use and its results) are left out.
    """
    texts: list[str] = []
    reasoning: list[str] = []
    thinking: list[JSON] = []
    calls: list[JSON] = []
    for block in message.get("content") or ():
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "thinking":
            reasoning.append(str(block.get("thinking", "")))
            thinking.append(
                {
                    "type": "thinking",
                    "thinking": block.get("thinking", ""),
                    "signature": block.get("signature", ""),
                }
            )
        elif kind == "redacted_thinking":
            thinking.append({"type": "redacted_thinking", "data": block.get("data", "")})
        elif kind == "tool_use":
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {
                        "name": block.get("name"),
                        "arguments": tool_arguments(block.get("input")),
                    },
                }
            )
    out: JSON = {
        "role": "assistant",
        "content": "".join(texts) if texts or not calls else None,
    }
    if calls:
        out["tool_calls"] = calls
    if thinking:
        out["reasoning_content"] = "".join(reasoning)
        out["thinking_blocks"] = thinking
    stop = message.get("stop_reason")
    return {
        "id": completion_id(message.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": out,
                "finish_reason": finish_reason(stop) if isinstance(stop, str) else "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_to_openai(message.get("usage") or {}),
    }


def completion_id(message_id: Any) -> str:
    return f"chatcmpl-{message_id}" if isinstance(message_id, str) and message_id else "chatcmpl-"


# --- errors ----------------------------------------------------------------------------------


@attrs.frozen
class ErrorKind:
    """How one Anthropic error type answers an OpenAI client."""

    status: int
    openai_type: str
    code: str | None
    retryable: bool


#: Anthropic error ``type`` -> the OpenAI answer (https://docs.anthropic.com/en/api/errors).
#: Where OpenAI has no code of its own, Anthropic's type is the code (a ``ProviderError``
#: cannot carry a null code: None falls back to ``bad_gateway``).
#: 529 ``overloaded_error`` is not a registered HTTP status; it leaves as 503 so that
#: OpenAI's SDKs raise ``InternalServerError`` and retry as they do for any status >= 500.
ERROR_KINDS: Final[Mapping[str, ErrorKind]] = {
    "invalid_request_error": ErrorKind(
        400, "invalid_request_error", "invalid_request_error", False
    ),
    "authentication_error": ErrorKind(401, "invalid_request_error", "invalid_api_key", False),
    "permission_error": ErrorKind(403, "invalid_request_error", "permission_denied", False),
    "not_found_error": ErrorKind(404, "invalid_request_error", "not_found", False),
    "request_too_large": ErrorKind(413, "invalid_request_error", "request_too_large", False),
    "rate_limit_error": ErrorKind(429, "requests", "rate_limit_exceeded", True),
    "api_error": ErrorKind(500, "server_error", "api_error", True),
    "timeout_error": ErrorKind(504, "server_error", "upstream_timeout", True),
    "overloaded_error": ErrorKind(503, "server_error", "service_unavailable", True),
}

#: HTTP status -> Anthropic error type, for bodies that are not Anthropic's JSON.
_STATUS_TYPES: Final[Mapping[int, str]] = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def provider_error(
    error_type: str, message: str, *, http_status: int, retry_after_s: float | None = None
) -> ProviderError:
    """An Anthropic error ``type`` and ``message`` -> the error the client sees."""
    kind = ERROR_KINDS.get(error_type)
    if kind is None:
        # "type values will grow over time": fall back on the HTTP status class.
        status = 503 if http_status == 529 else http_status
        if not 400 <= status < 600:
            status = 502
        kind = ErrorKind(
            status,
            "invalid_request_error" if status < 500 else "server_error",
            error_type or None,  # None: UpstreamError's "bad_gateway"
            status == 429 or status >= 500,
        )
    status = kind.status
    if error_type == "invalid_request_error" and 400 <= http_status < 500:
        status = http_status  # "We may also use this error type for other 4XX status codes"
    code = kind.code
    lowered = message.lower()
    if error_type == "not_found_error" and "model" in lowered:
        code = "model_not_found"
    elif error_type == "invalid_request_error" and "prompt is too long" in lowered:
        code = "context_length_exceeded"
    return ProviderError(
        message,
        status=status,
        error_type=kind.openai_type,
        retryable=kind.retryable,
        code=code,
        retry_after_s=retry_after_s if kind.retryable else None,
    )


def error_from_body(
    status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, *, now: int
) -> ProviderError:
    """A non-2xx Anthropic answer (JSON or not) -> :class:`ProviderError`."""
    retry_after = _retry_after(headers, now)
    error_type, message = error_fields(_loads(body))
    if error_type is None:
        error_type = _STATUS_TYPES.get(status, "")
        text = body.decode("utf-8", "replace").strip()
        message = f"Anthropic answered HTTP {status}" + (f": {text[:200]}" if text else ".")
    return provider_error(error_type, message, http_status=status, retry_after_s=retry_after)


def error_fields(obj: Any) -> tuple[str | None, str]:
    """``(type, message)`` from ``{"type": "error", "error": {...}}``, or ``(None, "")``."""
    error = obj.get("error") if isinstance(obj, Mapping) else None
    if not isinstance(error, Mapping) or not isinstance(error.get("type"), str):
        return None, ""
    message = error.get("message")
    return error["type"], message if isinstance(message, str) else error["type"]


def _loads(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _retry_after(headers: Sequence[tuple[bytes, bytes]], now: int) -> float | None:
    """``retry-after`` as seconds: delay-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    for name, value in headers:
        if name.lower() != b"retry-after":
            continue
        text = value.decode("latin-1").strip()
        try:
            return max(0.0, float(text))
        except ValueError:
            pass
        try:
            when = email.utils.parsedate_to_datetime(text)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:  # "-0000" in RFC 5322 means UTC with no zone information
            when = when.replace(tzinfo=datetime.UTC)
        return max(0.0, when.timestamp() - now)
    return None
