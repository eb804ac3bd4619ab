"""OpenAI ``chat.completion`` -> Anthropic Message, for Messages clients on translated
targets. No I/O.

Owns :func:`chat_to_message` (a whole answer) and what the stream encoder
(``messages_stream``) shares with it: the stop-reason table :data:`STOP_REASONS`,
:func:`stop_reason`, :func:`usage_to_anthropic`, :func:`tool_input` and :func:`message_id`.

Sources: the chat completion object (https://platform.openai.com/docs/api-reference/chat/object)
and the Messages API response (https://docs.anthropic.com/en/api/messages):
``{"id", "type": "message", "role": "assistant", "model", "content": [...], "stop_reason",
"stop_sequence", "usage"}``. Only choice 0 is read (a Messages request has no ``n``).

Content blocks, in this order:

* reasoning (``message.reasoning_content``: DeepSeek, vLLM; ``message.reasoning``:
  OpenRouter, Groq) -> one ``thinking`` block with ``signature: ""``: no OpenAI-compatible
  server signs its reasoning. A client that sends it back gets it translated again by
  ``messages_request``; a native Anthropic target would refuse an unsigned block;
* ``content`` (a string, or a list of text parts as some servers send) -> one ``text``
  block, left out when empty; ``refusal`` -> a ``text`` block too, and stop reason
  ``refusal``;
* each of ``tool_calls`` (and the legacy ``function_call``) -> a ``tool_use`` block
  ``{id, name, input}``. The id is the upstream's, unchanged, so that the ``tool_result``
  the client sends back names the call the upstream made (one is made up, stable, only if
  the upstream gave none). ``input`` must be an object: ``arguments`` are parsed, and when
  they are not a JSON object (models do emit broken JSON) the raw text is kept as
  ``{"_raw_arguments": "<text>"}`` (:data:`RAW_ARGUMENTS_KEY`), not dropped: the client's
  tool validation then fails visibly with the model's own output in hand.

Usage: Anthropic counts cache reads apart from ``input_tokens``; OpenAI includes them in
``prompt_tokens`` (``prompt_tokens_details.cached_tokens``; DeepSeek's
``prompt_cache_hit_tokens``), so they are moved (prompt-caching docs:
"total_input_tokens = cache_read_input_tokens + cache_creation_input_tokens +
input_tokens"). OpenAI reports no cache writes: ``cache_creation_input_tokens`` is 0.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.providers.chunks import choice_zero
from runestone_proxy.providers.json_codec import dumps, loads_object
from runestone_proxy.providers.openai_errors import error_from_payload, is_error

__all__ = [
    "RAW_ARGUMENTS_KEY",
    "STOP_REASONS",
    "chat_to_message",
    "message_id",
    "stop_reason",
    "tool_input",
    "usage_to_anthropic",
]

JSON = dict[str, Any]

#: OpenAI ``finish_reason`` -> Anthropic ``stop_reason``. Anything else (null, a server's
#: own value) is ``end_turn``. Two refinements in :func:`stop_reason`: ``stop`` becomes
#: ``tool_use`` when the turn called tools (some servers, e.g. vLLM and Ollama, say ``stop``
#: there), and ``stop_sequence`` when the server says which stop string matched (vLLM's
#: ``choice.stop_reason``); a refusal is ``refusal`` whatever the finish_reason.
STOP_REASONS: Final[Mapping[str, str]] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}

#: Where a tool call's ``arguments`` go when they are not a JSON object.
RAW_ARGUMENTS_KEY: Final = "_raw_arguments"

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def chat_to_message(chat_json: bytes, *, model: str) -> bytes:
    """A whole OpenAI ``chat.completion`` (bytes) -> Anthropic Message JSON bytes.

    An error envelope in the body (an HTTP 200 carrying ``error``, as OpenRouter sends) raises
    the matching :class:`~runestone_proxy.errors.ProviderError`; a body that is not a chat
    completion raises :class:`~runestone_proxy.errors.UpstreamProtocolError`."""
    obj = loads_object(chat_json, "chat completion")
    if is_error(obj):
        raise error_from_payload(obj)
    choice = choice_zero(obj.get("choices"))
    message = choice.get("message")
    if not isinstance(message, Mapping):
        raise UpstreamProtocolError("chat completion: choice 0 has no message object")
    mid = message_id(obj.get("id"), chat_json)
    content: list[JSON] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = _text(message.get("content"))
    if text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    refused = isinstance(refusal, str) and bool(refusal)
    if refused:
        content.append({"type": "text", "text": refusal})
    calls = message.get("tool_calls")
    calls = [call for call in calls if isinstance(call, Mapping)] if isinstance(calls, list) else []
    for n, call in enumerate(calls):
        content.append(_tool_use(call.get("id"), call.get("function"), mid, n))
    legacy = message.get("function_call")
    if isinstance(legacy, Mapping):
        content.append(_tool_use(None, legacy, mid, len(calls)))
    tools = any(block["type"] == "tool_use" for block in content)
    matched = choice.get("stop_reason")
    stop, sequence = stop_reason(choice.get("finish_reason"), matched, tools=tools, refused=refused)
    return dumps(
        {
            "id": mid,
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop,
            "stop_sequence": sequence,
            "usage": usage_to_anthropic(obj.get("usage")),
        }
    )


def stop_reason(finish: Any, matched: Any, *, tools: bool, refused: bool) -> tuple[str, str | None]:
    """``(stop_reason, stop_sequence)`` for a ``finish_reason``; see :data:`STOP_REASONS`.

    ``matched`` is vLLM's ``choice.stop_reason``: "the stop string or token id that caused
    the completion to stop" (a string only when a stop string matched)."""
    if refused:
        return "refusal", None
    reason = STOP_REASONS.get(finish, "end_turn") if isinstance(finish, str) else "end_turn"
    if reason != "end_turn":
        return reason, None
    if tools:
        return "tool_use", None
    if finish == "stop" and isinstance(matched, str) and matched:
        return "stop_sequence", matched
    return "end_turn", None


def usage_to_anthropic(usage: Any) -> JSON:
    """OpenAI ``usage`` (or None) -> Anthropic ``usage``, cache reads moved out of input."""
    if not isinstance(usage, Mapping):
        usage = {}
    prompt = _count(usage.get("prompt_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    if not cached:
        cached = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    cached = min(cached, prompt)
    return {
        "input_tokens": prompt - cached,
        "output_tokens": _count(usage.get("completion_tokens")),
        "cache_read_input_tokens": cached,
        "cache_creation_input_tokens": 0,
    }


def tool_input(arguments: Any) -> JSON:
    """OpenAI ``function.arguments`` -> a ``tool_use`` ``input`` object (see the module
    docstring for arguments that are not a JSON object)."""
    if isinstance(arguments, Mapping):  # a few servers send the object itself
        return dict(arguments)
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        value = None
    if isinstance(value, dict):
        return value
    return {RAW_ARGUMENTS_KEY: arguments}


def message_id(openai_id: Any, source: bytes) -> str:
    """``msg_`` + the OpenAI id's characters in ``[A-Za-z0-9_-]`` (stable: the same answer
    gets the same id); without a usable id, ``msg_`` + a digest of ``source``."""
    if isinstance(openai_id, str):
        safe = _UNSAFE.sub("", openai_id)
        if safe:
            return "msg_" + safe
    return "msg_" + hashlib.blake2b(source, digest_size=12).hexdigest()


def tool_use_id(given: Any, mid: str, n: int) -> str:
    """The upstream's tool call id as it is; a stable one from the message id if none."""
    if isinstance(given, str) and given:
        return given
    return f"toolu_{mid.removeprefix('msg_')}_{n}"


def _tool_use(call_id: Any, function: Any, mid: str, n: int) -> JSON:
    function = function if isinstance(function, Mapping) else {}
    name = function.get("name")
    return {
        "type": "tool_use",
        "id": tool_use_id(call_id, mid, n),
        "name": name if isinstance(name, str) else "",
        "input": tool_input(function.get("arguments")),
    }


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0
