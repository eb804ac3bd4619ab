"""Anthropic Message objects and error bodies -> OpenAI shapes. No I/O.

Owns what the whole-response path and the stream path share: stop reason -> ``finish_reason``,
Anthropic ``usage`` -> OpenAI ``usage``, one Message -> one ``chat.completion``, and Anthropic's
error bodies -> :class:`~runestone_proxy.errors.ProviderError` in OpenAI's envelope (the type
-> status/type/code table is in ``provider_errors.py``).

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

from runestone_proxy.errors import ProviderError
from runestone_proxy.providers.provider_errors import ANTHROPIC_STATUS_TYPES, anthropic_error

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
    escapes, as ``providers.json_codec.dumps`` does."""
    text = json.dumps(obj, **_COMPACT)
    try:
        return text.encode()
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def chat_completion(message: Mapping[str, Any], *, model: str, created: int) -> JSON:
    """One Anthropic Message -> one OpenAI ``chat.completion`` object (the assistant message
    as :func:`assistant_message` builds it, the stop reason and usage translated)."""
    stop = message.get("stop_reason")
    return {
        "id": completion_id(message.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": message.get("model") or model,
        "choices": [
            {
                "index": 0,
                "message": assistant_message(message.get("content") or ()),
                "finish_reason": finish_reason(stop) if isinstance(stop, str) else "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_to_openai(message.get("usage") or {}),
    }


def assistant_message(blocks: Sequence[Any]) -> JSON:
    """A Message's content blocks -> OpenAI's assistant ``message``.

    Text blocks are joined into ``content`` (null when the turn is only tool use); thinking is
    surfaced as ``reasoning_content`` plus the signed ``thinking_blocks`` a client must send
    back on its next turn (extended-thinking docs, "Preserving thinking blocks"). Block types
    with no OpenAI counterpart (server tool use and its results) are left out.
    """
    texts: list[str] = []
    reasoning: list[str] = []
    thinking: list[JSON] = []
    calls: list[JSON] = []
    for block in blocks:
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
    return out


def completion_id(message_id: Any) -> str:
    return f"chatcmpl-{message_id}" if isinstance(message_id, str) and message_id else "chatcmpl-"


# --- errors ----------------------------------------------------------------------------------


def error_from_body(
    status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes, *, now: int
) -> ProviderError:
    """A non-2xx Anthropic answer (JSON or not) -> :class:`ProviderError`."""
    retry_after = _retry_after(headers, now)
    obj = _loads(body)
    error_type, message = error_fields(obj)
    if error_type is None:
        error_type = ANTHROPIC_STATUS_TYPES.get(status, "")
        text = body.decode("utf-8", "replace").strip()
        message = f"Anthropic answered HTTP {status}" + (f": {text[:200]}" if text else ".")
    return anthropic_error(
        error_type,
        message,
        http_status=status,
        retry_after_s=retry_after,
        detail_code=detail_code(obj),
    )


def detail_code(obj: Any) -> str | None:
    """``error.details.error_code`` (e.g. ``enforced_spend_limit_reached``), or None."""
    error = obj.get("error") if isinstance(obj, Mapping) else None
    details = error.get("details") if isinstance(error, Mapping) else None
    code = details.get("error_code") if isinstance(details, Mapping) else None
    return code if isinstance(code, str) else None


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
