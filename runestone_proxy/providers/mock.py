"""The built-in deterministic provider (kind ``mock``): OpenAI-shaped answers, no network.

Owns what the shipped config serves when no provider key is set, and what tests and the
bench use as a provider with known output. Everything here is pure: the same request gives
the same bytes (only ``created`` comes from the clock, which callers may replace). Timing
(``latency_ms`` before the answer, ``chunk_interval_ms`` between stream chunks) is carried
by :class:`MockSettings` and applied by the I/O layer.

The shapes follow OpenAI's API reference: ``chat.completion`` and ``chat.completion.chunk``
(https://platform.openai.com/docs/api-reference/chat), ``text_completion``
(https://platform.openai.com/docs/api-reference/completions) and the embeddings ``list``
(https://platform.openai.com/docs/api-reference/embeddings), including the tool-call stream
shape (``id``/``name`` only in the first piece, then ``arguments`` fragments) and the final
``choices: []`` usage chunk of ``stream_options.include_usage``.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from runestone_proxy.errors import InvalidParam
from runestone_proxy.providers.base import ProviderCall
from runestone_proxy.providers.json_codec import dumps

__all__ = ["MockProvider", "MockSettings"]


def _at_least_one(_inst: object, attribute: attrs.Attribute[Any], value: int) -> None:
    if value < 1:
        raise ValueError(f"{attribute.name} must be >= 1, got {value}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise ValueError(f"{attribute.name} must be >= 0, got {value}")


@attrs.frozen
class MockSettings:
    latency_ms: float = attrs.field(default=0, validator=_non_negative)
    #: Chunks per streamed choice, the finishing chunk included (usage chunk not counted).
    chunk_count: int = attrs.field(default=8, validator=_at_least_one)
    chunk_interval_ms: float = attrs.field(default=0, validator=_non_negative)
    embedding_dim: int = attrs.field(default=16, validator=_at_least_one)


@attrs.frozen
class _Answer:
    """What the mock says to one request, before it is shaped as JSON."""

    key: str  # hex digest naming the answer
    text: str  # reply text ("" when calling a tool)
    finish_reason: str
    prompt_tokens: int
    tool: str | None = None  # function name when the answer is a tool call

    @property
    def completion_tokens(self) -> int:
        return 1 if self.tool else len(self.text.split())

    def usage(self) -> dict[str, int]:
        total = self.prompt_tokens + self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": total,
        }


@attrs.frozen
class MockProvider:
    """Deterministic answers for ``chat``, ``completions`` and ``embeddings`` calls."""

    settings: MockSettings = attrs.field(factory=MockSettings)
    clock: Callable[[], float] = attrs.field(default=time.time, repr=False)

    # -- dispatch ---------------------------------------------------------------------------

    def respond(self, call: ProviderCall) -> bytes:
        """The whole (non-stream) answer for ``call.endpoint``."""
        if call.endpoint == "chat":
            return self.chat(call)
        if call.endpoint == "completions":
            return self.completion(call)
        return self.embeddings(call)

    def chunks(self, call: ProviderCall) -> list[bytes]:
        """The stream payloads (unframed) for ``call.endpoint``; embeddings don't stream."""
        return self.stream(call)[0]

    def stream(self, call: ProviderCall) -> tuple[list[bytes], dict[str, int]]:
        """The stream payloads and the usage they amount to (for the gateway's accounting;
        the client sees the ``choices: []`` usage chunk only if it asked)."""
        if call.endpoint == "chat":
            return self._chat_stream(call)
        if call.endpoint == "completions":
            return self._completion_stream(call)
        raise InvalidParam("embeddings cannot be streamed", param="stream")

    # -- chat -------------------------------------------------------------------------------

    def chat(self, call: ProviderCall) -> bytes:
        answer = _chat_answer(call.body)
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or None}
        if answer.tool is not None:
            message["tool_calls"] = [_tool_call(answer, arguments="{}")]
        choice = {"index": 0, "message": message, "logprobs": None}
        choice["finish_reason"] = answer.finish_reason
        return dumps(
            {
                **self._head(f"chatcmpl-mock-{answer.key}", "chat.completion", call),
                "choices": [choice],
                "usage": answer.usage(),
            }
        )

    def chat_chunks(self, call: ProviderCall) -> list[bytes]:
        return self._chat_stream(call)[0]

    def _chat_stream(self, call: ProviderCall) -> tuple[list[bytes], dict[str, int]]:
        answer = _chat_answer(call.body)
        head = self._head(f"chatcmpl-mock-{answer.key}", "chat.completion.chunk", call)
        n = self.settings.chunk_count
        payload = "{}" if answer.tool is not None else answer.text
        if n >= 3:
            # OpenAI's first chunk announces the role (and the tool call's id and name), the
            # middle ones carry the text (or argument fragments), the last one only finishes.
            deltas = [{"role": "assistant", **_payload_delta(answer, "", first=True)}]
            deltas += [_payload_delta(answer, piece) for piece in _split(payload, n - 2)]
        else:
            deltas = [{"role": "assistant", **_payload_delta(answer, payload, first=True)}]
        if n >= 2:
            deltas.append({})
        usage = call.include_usage
        out = [_chunk(head, delta, None, usage) for delta in deltas[:-1]]
        out.append(_chunk(head, deltas[-1], answer.finish_reason, usage))
        counts = answer.usage()
        if usage:
            out.append(dumps({**head, "choices": [], "usage": counts}))
        return out, counts

    # -- legacy completions -----------------------------------------------------------------

    def completion(self, call: ProviderCall) -> bytes:
        answer = _completion_answer(call.body)
        choice = {"text": answer.text, "index": 0, "logprobs": None}
        choice["finish_reason"] = answer.finish_reason
        return dumps(
            {
                **self._head(f"cmpl-mock-{answer.key}", "text_completion", call),
                "choices": [choice],
                "usage": answer.usage(),
            }
        )

    def completion_chunks(self, call: ProviderCall) -> list[bytes]:
        return self._completion_stream(call)[0]

    def _completion_stream(self, call: ProviderCall) -> tuple[list[bytes], dict[str, int]]:
        answer = _completion_answer(call.body)
        head = self._head(f"cmpl-mock-{answer.key}", "text_completion", call)
        n = self.settings.chunk_count
        texts = [*_split(answer.text, n - 1), ""] if n > 1 else [answer.text]
        out = []
        for i, text in enumerate(texts):
            finish = answer.finish_reason if i == len(texts) - 1 else None
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            out.append(dumps({**head, "choices": [choice]}))
        counts = answer.usage()
        if call.include_usage:
            out.append(dumps({**head, "choices": [], "usage": counts}))
        return out, counts

    # -- embeddings -------------------------------------------------------------------------

    def embeddings(self, call: ProviderCall) -> bytes:
        inputs = _embedding_inputs(call.body.get("input"))
        dim = call.body.get("dimensions", self.settings.embedding_dim)
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise InvalidParam("dimensions must be a positive integer", param="dimensions")
        fmt = call.body.get("encoding_format", "float")
        if fmt not in ("float", "base64"):
            raise InvalidParam(
                "encoding_format must be 'float' or 'base64'", param="encoding_format"
            )
        data = []
        tokens = 0
        for index, (seed, count) in enumerate(inputs):
            vector = _unit_vector(seed, dim)
            packed = struct.pack(f"<{dim}f", *vector)
            embedding: object
            if fmt == "base64":
                embedding = base64.b64encode(packed).decode("ascii")
            else:  # the float32 values, so both formats carry the same numbers
                embedding = list(struct.unpack(f"<{dim}f", packed))
            data.append({"object": "embedding", "index": index, "embedding": embedding})
            tokens += count
        return dumps(
            {
                "object": "list",
                "data": data,
                "model": call.model,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        )

    def _head(self, id_: str, obj: str, call: ProviderCall) -> dict[str, Any]:
        return {
            "id": id_,
            "object": obj,
            "created": int(self.clock()),
            "model": call.model,
            "system_fingerprint": "fp_mock",
        }


# -- answers --------------------------------------------------------------------------------


def _digest(text: str) -> str:
    # surrogatepass: a client's escaped lone surrogate is data here, not an error.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _words(text: str) -> int:
    """The mock's token count: whitespace-separated words."""
    return len(text.split())


def _content_text(content: object) -> str:
    """The text of a message's ``content``: a string or a list of content parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        return " ".join(
            part["text"]
            for part in content
            if isinstance(part, Mapping) and isinstance(part.get("text"), str)
        )
    return ""


def _reply(key: str, prompt: str, body: Mapping[str, Any]) -> tuple[str, str]:
    """The reply text and finish reason, cut to ``max_tokens`` words if asked."""
    text = f"Mock reply #{key[:8]} to: {prompt[:40]}"
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < _words(text):
        return " ".join(text.split()[:limit]), "length"
    return text, "stop"


def _chat_answer(body: Mapping[str, Any]) -> _Answer:
    messages = body.get("messages")
    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise InvalidParam("messages must be a non-empty array", param="messages")
    texts = [_content_text(m.get("content")) for m in messages if isinstance(m, Mapping)]
    last_user = next(
        (
            _content_text(m.get("content"))
            for m in reversed(messages)
            if isinstance(m, Mapping) and m.get("role") == "user"
        ),
        "",
    )
    key = _digest(last_user)
    prompt_tokens = sum(_words(t) for t in texts)
    tool = _tool_name(body)
    if tool is not None:
        return _Answer(key, "", "tool_calls", prompt_tokens, tool=tool)
    text, finish = _reply(key, last_user, body)
    return _Answer(key, text, finish, prompt_tokens)


def _tool_name(body: Mapping[str, Any]) -> str | None:
    """The function the mock calls: the one ``tool_choice`` names, else the first tool."""
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto")
    if not isinstance(tools, Sequence) or not tools or choice == "none":
        return None
    if isinstance(choice, Mapping):
        named = choice.get("function")
        if isinstance(named, Mapping) and isinstance(named.get("name"), str):
            return str(named["name"])
    first = tools[0]
    function = first.get("function") if isinstance(first, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise InvalidParam("tools[0].function.name is required", param="tools")
    return str(function["name"])


def _completion_answer(body: Mapping[str, Any]) -> _Answer:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, Sequence) and prompt and all(isinstance(p, str) for p in prompt):
        text = "\n".join(prompt)
    elif isinstance(prompt, Sequence):
        seeds = [seed for seed, _ in _embedding_inputs(prompt, param="prompt")]
        text = " ".join(seed.decode("utf-8", "replace") for seed in seeds)
    else:
        raise InvalidParam("prompt must be a string or an array", param="prompt")
    key = _digest(text)
    reply, finish = _reply(key, text, body)
    return _Answer(key, reply, finish, _words(text))


def _tool_call(answer: _Answer, arguments: str) -> dict[str, Any]:
    return {
        "id": f"call_mock_{answer.key}",
        "type": "function",
        "function": {"name": answer.tool, "arguments": arguments},
    }


def _payload_delta(answer: _Answer, piece: str, *, first: bool = False) -> dict[str, Any]:
    if answer.tool is None:
        return {"content": piece}
    if first:
        return {"content": None, "tool_calls": [{"index": 0, **_tool_call(answer, piece)}]}
    return {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}


def _chunk(
    head: Mapping[str, Any], delta: Mapping[str, Any], finish: str | None, with_usage: bool
) -> bytes:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    chunk: dict[str, Any] = {**head, "choices": [choice]}
    if with_usage:
        chunk["usage"] = None  # as OpenAI sends it on every chunk but the last
    return dumps(chunk)


def _split(text: str, parts: int) -> list[str]:
    """``text`` in ``parts`` consecutive pieces of near-equal length (some may be empty)."""
    size = len(text)
    return [text[i * size // parts : (i + 1) * size // parts] for i in range(parts)]


# -- embeddings -----------------------------------------------------------------------------


def _embedding_inputs(value: object, *, param: str = "input") -> list[tuple[bytes, int]]:
    """Each input as (seed bytes, token count). Accepts OpenAI's four shapes: a string, an
    array of strings, an array of token ids, an array of arrays of token ids."""

    def is_tokens(v: object) -> bool:
        return (
            isinstance(v, Sequence)
            and not isinstance(v, str)
            and bool(v)
            and all(isinstance(t, int) and not isinstance(t, bool) for t in v)
        )

    def tokens(v: Sequence[int]) -> tuple[bytes, int]:
        return ",".join(str(t) for t in v).encode(), len(v)

    if isinstance(value, str):
        return [(value.encode("utf-8", "surrogatepass"), _words(value))]
    if isinstance(value, Sequence) and value:
        if all(isinstance(v, str) for v in value):
            return [(v.encode("utf-8", "surrogatepass"), _words(v)) for v in value]
        if is_tokens(value):
            return [tokens(value)]
        if all(is_tokens(v) for v in value):
            return [tokens(v) for v in value]
    raise InvalidParam(
        f"{param} must be a string, an array of strings, an array of token ids, "
        "or an array of arrays of token ids",
        param=param,
    )


def _unit_vector(seed: bytes, dim: int) -> list[float]:
    """``dim`` numbers drawn from SHA-256 of ``seed``, scaled to unit length."""
    values: list[float] = []
    counter = 0
    while len(values) < dim:
        block = hashlib.sha256(seed + counter.to_bytes(4, "big")).digest()
        values.extend(x / 2**31 - 1.0 for x in struct.unpack(">8I", block))
        counter += 1
    del values[dim:]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]
