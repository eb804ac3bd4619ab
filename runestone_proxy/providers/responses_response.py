"""OpenAI ``chat.completion`` -> OpenAI Responses API ``response``, for Responses clients on
translated targets. No I/O.

Owns :func:`chat_to_response` (a whole answer) and what the stream encoder
(``responses_stream``) shares with it: the Response object's frame
(:func:`response_object`), the item ids (:func:`item_id`, :func:`call_id`), the finish
table :data:`INCOMPLETE_REASONS` and :func:`usage_to_responses`.

Sources: the chat completion object (https://platform.openai.com/docs/api-reference/chat/object)
and the Response object (https://platform.openai.com/docs/api-reference/responses/object),
checked against the ``openai`` SDK's ``openai.types.responses.Response``. Only choice 0 is
read (a Responses request has no ``n``).

Output items, in this order, each with an id made from the response id and its index in
``output`` (:func:`item_id`), so that a stored response and its stream name them alike:

* reasoning (``message.reasoning_content``: DeepSeek, vLLM; ``message.reasoning``:
  OpenRouter, Groq) -> ``{"type": "reasoning", "id": "rs_...", "summary":
  [{"type": "summary_text", "text"}]}``;
* ``content`` (a string, or a list of text parts) and ``refusal`` -> one ``message`` item
  whose ``content`` holds an ``output_text`` part and / or a ``refusal`` part; left out when
  both are empty;
* each of ``tool_calls`` (and the legacy ``function_call``) -> a ``function_call`` item
  ``{"id": "fc_...", "call_id", "name", "arguments", "status"}``. ``call_id`` is the
  upstream's tool call id, unchanged, so that the ``function_call_output`` the client sends
  back names the call the upstream made (one is made up, stable, only if it gave none);
  ``arguments`` is the model's text as it came, broken JSON included.

Status: ``finish_reason`` ``length`` or ``content_filter`` make the response ``incomplete``
(``incomplete_details.reason`` from :data:`INCOMPLETE_REASONS`) and mark its last message or
function call item ``incomplete`` (that is the one cut short); anything else is
``completed``. The request's settings are echoed where the API echoes them, with the API's
defaults where the request said nothing (:data:`ECHOED`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.providers.chunks import choice_zero
from runestone_proxy.providers.json_codec import dumps, loads_object
from runestone_proxy.providers.openai_errors import error_from_payload, is_error

__all__ = [
    "ECHOED",
    "INCOMPLETE_REASONS",
    "call_id",
    "chat_to_response",
    "incomplete_reason",
    "item_id",
    "output_items",
    "response_object",
    "usage_to_responses",
]

JSON = dict[str, Any]

#: OpenAI chat ``finish_reason`` -> Responses ``incomplete_details.reason``; any other
#: finish (stop, tool_calls, null, a server's own value) completes the response.
INCOMPLETE_REASONS: Final[Mapping[str, str]] = {
    "length": "max_output_tokens",
    "content_filter": "content_filter",
}

#: Request fields the Response object echoes, in OpenAI's key order, with the value the API
#: reports when the request left them out. Fields marked ``...`` are echoed only if given.
ECHOED: Final[Mapping[str, Any]] = {
    "background": False,
    "instructions": None,
    "max_output_tokens": None,
    "max_tool_calls": ...,
    "parallel_tool_calls": True,
    "previous_response_id": None,
    "prompt_cache_key": ...,
    "reasoning": {"effort": None, "summary": None},
    "safety_identifier": ...,
    "service_tier": ...,
    "store": True,
    "temperature": 1.0,
    "text": {"format": {"type": "text"}},
    "tool_choice": "auto",
    "tools": [],
    "top_logprobs": ...,
    "top_p": 1.0,
    "truncation": "disabled",
    "user": None,
    "metadata": {},
}


def chat_to_response(
    chat_json: bytes, *, request: Mapping[str, Any], response_id: str, created: int
) -> bytes:
    """A whole OpenAI ``chat.completion`` (bytes) -> Response object JSON bytes.

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
    reason = incomplete_reason(choice.get("finish_reason"))
    output = output_items(message, response_id, incomplete=reason is not None)
    model = obj.get("model")
    return dumps(
        response_object(
            request,
            response_id=response_id,
            created=created,
            model=model if isinstance(model, str) else request.get("model"),
            status="completed" if reason is None else "incomplete",
            reason=reason,
            output=output,
            usage=usage_to_responses(obj.get("usage")),
        )
    )


def output_items(message: Mapping[str, Any], response_id: str, *, incomplete: bool) -> list[JSON]:
    """A chat ``message`` -> the Response's ``output`` items (see the module docstring)."""
    items: list[JSON] = []
    reasoning = message.get("reasoning_content") or message.get("reasoning")
    if isinstance(reasoning, str) and reasoning:
        summary = [{"type": "summary_text", "text": reasoning}]
        items.append({"id": item_id("rs", response_id, 0), "type": "reasoning", "summary": summary})
    content: list[JSON] = []
    text = _text(message.get("content"))
    if text:
        content.append({"type": "output_text", "text": text, "annotations": []})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal:
        content.append({"type": "refusal", "refusal": refusal})
    if content:
        items.append(
            {
                "id": item_id("msg", response_id, len(items)),
                "type": "message",
                "status": "completed",
                "role": "assistant",
                "content": content,
            }
        )
    calls = message.get("tool_calls")
    pieces = (
        [call for call in calls if isinstance(call, Mapping)] if isinstance(calls, list) else []
    )
    legacy = message.get("function_call")
    if isinstance(legacy, Mapping):
        pieces.append({"function": legacy})
    for call in pieces:
        function = call.get("function")
        function = function if isinstance(function, Mapping) else {}
        n = len(items)
        items.append(
            function_call_item(
                n,
                response_id,
                given_id=call.get("id"),
                name=function.get("name"),
                arguments=_arguments(function.get("arguments")),
                status="completed",
            )
        )
    if incomplete and items and items[-1]["type"] != "reasoning":
        items[-1]["status"] = "incomplete"
    return items


def function_call_item(
    index: int, response_id: str, *, given_id: Any, name: Any, arguments: str, status: str
) -> JSON:
    """One ``function_call`` output item, in OpenAI's key order."""
    return {
        "id": item_id("fc", response_id, index),
        "type": "function_call",
        "status": status,
        "arguments": arguments,
        "call_id": call_id(given_id, response_id, index),
        "name": name if isinstance(name, str) else "",
    }


def response_object(
    request: Mapping[str, Any],
    *,
    response_id: str,
    created: int,
    model: Any,
    status: str,
    reason: str | None,
    output: list[JSON],
    usage: JSON | None,
) -> JSON:
    """The whole Response object, in OpenAI's key order, the request's settings echoed
    (:data:`ECHOED`)."""
    obj: JSON = {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "error": None,
        "incomplete_details": None if reason is None else {"reason": reason},
        "model": model if isinstance(model, str) else "",
        "output": output,
        "usage": usage,
    }
    for key, default in ECHOED.items():
        value = request.get(key)
        if value is not None:
            obj[key] = value
        elif default is not ...:
            obj[key] = default
    return obj


def incomplete_reason(finish: Any) -> str | None:
    """``incomplete_details.reason`` for a ``finish_reason``, or None: the response completed."""
    return INCOMPLETE_REASONS.get(finish) if isinstance(finish, str) else None


def usage_to_responses(usage: Any) -> JSON | None:
    """OpenAI chat ``usage`` -> Responses ``usage``; None when the answer reported none.

    OpenAI counts the same way in both APIs (cached tokens are part of the input, reasoning
    tokens part of the output); chat reports no cache writes, so ``cache_write_tokens`` is 0
    (the ``openai`` SDK requires the field)."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    details = usage.get("prompt_tokens_details")
    cached = _count(details.get("cached_tokens")) if isinstance(details, Mapping) else 0
    if not cached:
        cached = _count(usage.get("prompt_cache_hit_tokens"))  # DeepSeek
    details = usage.get("completion_tokens_details")
    reasoning = _count(details.get("reasoning_tokens")) if isinstance(details, Mapping) else 0
    total = _count(usage.get("total_tokens")) or prompt + completion
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": min(cached, prompt), "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": min(reasoning, completion)},
        "total_tokens": total,
    }


def item_id(prefix: str, response_id: str, index: int) -> str:
    """``<prefix>_<the response id's own part>_<index in output>``: ``msg_``, ``fc_``, ``rs_``."""
    return f"{prefix}_{response_id.removeprefix('resp_')}_{index}"


def call_id(given: Any, response_id: str, index: int) -> str:
    """The upstream's tool call id as it is; a stable one from the response id if none."""
    if isinstance(given, str) and given:
        return given
    return item_id("call", response_id, index)


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    if isinstance(arguments, Mapping):  # a few servers send the object itself
        return dumps(arguments).decode()
    return ""


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
