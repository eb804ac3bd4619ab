"""Legacy ``/v1/completions`` over chat-only providers. No I/O.

Owns the three adapters that let a ``text_completion`` client use a provider that only has
chat (Anthropic, most new models): the request (``prompt`` -> one user message), the whole
answer (``chat.completion`` -> ``text_completion``) and the stream (``chat.completion.chunk``
-> ``text_completion`` chunks, wrapping the provider's own :class:`StreamTranslator`).

Shapes: https://platform.openai.com/docs/api-reference/completions (legacy) and
https://platform.openai.com/docs/api-reference/chat. What chat cannot express is refused
with :class:`InvalidParam` naming the field, rather than silently answered differently:
token-id prompts, batched prompts (one choice per prompt), ``echo``, ``suffix``,
``best_of`` > 1 and ``logprobs`` (completions' per-token shape has no chat equivalent here).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from runestone_proxy.errors import InvalidParam, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.base import Ending, StreamTranslator
from runestone_proxy.providers.json_codec import dumps, loads_object

__all__ = [
    "ChatToTextStream",
    "chat_chunk_to_text",
    "chat_to_text_completion",
    "prompt_to_chat_body",
]

#: Completions-only fields, handled (or refused) here rather than passed on.
_COMPLETION_ONLY = frozenset({"prompt", "echo", "suffix", "best_of", "logprobs"})


def prompt_to_chat_body(body: Mapping[str, Any]) -> dict[str, Any]:
    """A ``/v1/completions`` body -> a ``/v1/chat/completions`` body.

    Every other field (``model``, ``max_tokens``, ``temperature``, ``top_p``, ``stop``, ``n``,
    ``stream``, ``stream_options``, ``user``, ``logit_bias``, ``seed``, penalties, unknown
    ones) is carried over unchanged: the chat API takes them under the same names.
    """
    _refuse_unsupported(body)
    out = {k: v for k, v in body.items() if k not in _COMPLETION_ONLY}
    out["messages"] = [{"role": "user", "content": _prompt_text(body.get("prompt"))}]
    return out


def _prompt_text(prompt: object) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, Sequence) and prompt:
        if all(isinstance(p, int) for p in prompt) or all(
            isinstance(p, Sequence) and not isinstance(p, str) for p in prompt
        ):
            raise InvalidParam(
                "prompt as token ids is not supported by this provider (chat only); "
                "send the prompt as text",
                param="prompt",
            )
        if all(isinstance(p, str) for p in prompt):
            if len(prompt) == 1:
                return str(prompt[0])
            raise InvalidParam(
                "batched prompts are not supported by this provider (chat only); "
                "send one prompt per request",
                param="prompt",
            )
    if prompt is None:
        raise InvalidParam("prompt is required", param="prompt")
    raise InvalidParam("prompt must be a string or an array of one string", param="prompt")


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    if body.get("echo"):
        raise InvalidParam("echo is not supported by this provider (chat only)", param="echo")
    if body.get("suffix"):
        raise InvalidParam("suffix is not supported by this provider (chat only)", param="suffix")
    best_of = body.get("best_of")
    if isinstance(best_of, int) and best_of > 1:
        raise InvalidParam("best_of > 1 is not supported by this provider", param="best_of")
    if body.get("logprobs"):
        raise InvalidParam(
            "logprobs is not supported for completions on this provider", param="logprobs"
        )


def chat_to_text_completion(chat_json: bytes) -> bytes:
    """A ``chat.completion`` body -> the ``text_completion`` body a legacy client expects."""
    chat = loads_object(chat_json, "chat completion")
    choices = chat.get("choices")
    if not isinstance(choices, list):
        raise UpstreamProtocolError("chat completion has no choices array")
    out: dict[str, Any] = {
        "id": chat.get("id"),
        "object": "text_completion",
        "created": chat.get("created"),
        "model": chat.get("model"),
        "choices": [_text_choice(c, c.get("message")) for c in choices if isinstance(c, dict)],
    }
    for key in ("system_fingerprint", "usage"):
        if key in chat:
            out[key] = chat[key]
    return dumps(out)


def _text_choice(choice: Mapping[str, Any], message: object) -> dict[str, Any]:
    content = message.get("content") if isinstance(message, Mapping) else None
    return {
        "text": content if isinstance(content, str) else "",
        "index": choice.get("index", 0),
        "logprobs": None,
        "finish_reason": choice.get("finish_reason"),
    }


@attrs.define
class ChatToTextStream:
    """Wraps a chat :class:`StreamTranslator`; re-emits its chunks as ``text_completion``.

    A role-only first chunk (no text, no finish reason) produces nothing; the usage chunk
    (``choices: []``) is kept. It has no ending rule of its own: the inner translator's
    ``ENDINGS`` table decides, and its usage is the inner one's.
    """

    inner: StreamTranslator

    @property
    def done(self) -> bool:
        return self.inner.done

    def feed(self, event: SSEEvent) -> list[bytes]:
        return self._convert(self.inner.feed(event))

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.inner.usage

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        return self._convert(self.inner.finish(ending))

    def _convert(self, payloads: list[bytes]) -> list[bytes]:
        out = []
        for payload in payloads:
            converted = chat_chunk_to_text(payload)
            if converted is not None:
                out.append(converted)
        return out


def chat_chunk_to_text(payload: bytes) -> bytes | None:
    """One ``chat.completion.chunk`` -> a ``text_completion`` chunk, or None if it says
    nothing a completions client could see (a role-only delta)."""
    chunk = loads_object(payload, "chat stream chunk")
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        raise UpstreamProtocolError("chat stream chunk has no choices array")
    texts = []
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, Mapping) else None
        if not content and choice.get("finish_reason") is None:
            continue  # role-only (or empty) delta
        texts.append(_text_choice(choice, delta))
    usage = chunk.get("usage")
    if not texts and not (choices == [] and usage is not None):
        return None
    out: dict[str, Any] = {
        "id": chunk.get("id"),
        "object": "text_completion",
        "created": chunk.get("created"),
        "model": chunk.get("model"),
        "choices": texts,
    }
    if "system_fingerprint" in chunk:
        out["system_fingerprint"] = chunk["system_fingerprint"]
    if usage is not None:
        out["usage"] = usage
    return dumps(out)
