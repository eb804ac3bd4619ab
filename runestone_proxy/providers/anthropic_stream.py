"""Anthropic streaming events -> OpenAI ``chat.completion.chunk`` payloads. No I/O.

Owns the per-stream state machine of the Anthropic translator. The event flow is documented
at https://docs.anthropic.com/en/api/messages-streaming:

    "1. message_start: contains a Message object with empty content.
     2. A series of content blocks, each of which have a content_block_start, one or more
        content_block_delta events, and a content_block_stop event. [...]
     3. One or more message_delta events, indicating top-level changes to the final Message.
     4. A final message_stop event."
    "Event streams may also include any number of ping events."
    "We may occasionally send errors in the event stream", e.g. overloaded_error.
    "In accordance with our versioning policy, we may add new event types, and your code
     should handle unknown event types gracefully."

How this works: ``_TRANSITIONS`` below is the whole machine. ``ping`` is ignored in every
state; ``error`` raises :class:`~runestone_proxy.errors.ProviderError` in every state; event
types the table does not know are ignored; a known event in a state that does not allow it
raises :class:`~runestone_proxy.errors.UpstreamProtocolError`. Each handled event yields zero
or more chunk payloads:

    message_start        first chunk: delta {"role": "assistant", "content": ""}
    content_block_start  tool_use: tool_calls[{index, id, type, function{name, arguments:""}}]
    content_block_delta  text_delta -> content; input_json_delta -> tool_calls[{index,
                         function{arguments}}]; thinking_delta -> reasoning_content;
                         signature_delta -> kept for the thinking block
    content_block_stop   thinking / redacted_thinking -> thinking_blocks [the signed block]
    message_delta        stop_reason -> a chunk with finish_reason (once); usage kept. In
                         state BLOCK it first closes the open block, as content_block_stop
                         would (``max_tokens`` can cut a tool's input mid-block)
    message_stop         done; the usage chunk (choices: []) if the client asked for it

``ENDINGS`` is the other half: what an upstream end *without* ``message_stop`` means in each
state. After a ``message_delta`` that carried a ``stop_reason`` nothing was lost: the stream
ends as ``message_stop`` would end it. Before it, or with an event cut in half, it is an
error.

The OpenAI tool call ``index`` counts tool calls (0, 1, ...), not Anthropic's content block
index, which also counts text and thinking blocks.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.anthropic_response import (
    JSON,
    completion_id,
    detail_code,
    dumps,
    error_fields,
    finish_reason,
    tool_arguments,
    usage_to_openai,
)
from runestone_proxy.providers.base import Ending, Outcome
from runestone_proxy.providers.provider_errors import anthropic_error


class State(enum.Enum):
    START = "start"  # nothing yet
    MESSAGE = "message"  # between content blocks
    BLOCK = "block"  # inside one content block
    ENDING = "ending"  # message_delta seen; only message_delta / message_stop may follow
    DONE = "done"  # message_stop seen


#: (state, Anthropic event type) -> next state. Anything else known is a protocol error.
_TRANSITIONS: Final[Mapping[tuple[State, str], State]] = {
    (State.START, "message_start"): State.MESSAGE,
    (State.MESSAGE, "content_block_start"): State.BLOCK,
    (State.BLOCK, "content_block_delta"): State.BLOCK,
    (State.BLOCK, "content_block_stop"): State.MESSAGE,
    (State.MESSAGE, "message_delta"): State.ENDING,
    (State.BLOCK, "message_delta"): State.ENDING,  # closes the open block implicitly
    (State.ENDING, "message_delta"): State.ENDING,
    (State.ENDING, "message_stop"): State.DONE,
}
_KNOWN: Final = frozenset(kind for _, kind in _TRANSITIONS)

#: (state, how the upstream ended without message_stop) -> outcome; read by
#: :meth:`AnthropicStream.finish` and the tests. ENDING means a message_delta arrived;
#: ``finish`` also requires that it carried a ``stop_reason``, as message_stop does.
ENDINGS: Final[Mapping[tuple[State, Ending], Outcome]] = {
    (State.START, "eof"): "error",
    (State.START, "partial"): "error",
    (State.START, "broken"): "error",
    (State.MESSAGE, "eof"): "error",
    (State.MESSAGE, "partial"): "error",
    (State.MESSAGE, "broken"): "error",
    (State.BLOCK, "eof"): "error",
    (State.BLOCK, "partial"): "error",
    (State.BLOCK, "broken"): "error",
    (State.ENDING, "eof"): "end",
    (State.ENDING, "partial"): "error",
    (State.ENDING, "broken"): "end",
    (State.DONE, "eof"): "end",
    (State.DONE, "partial"): "end",
    (State.DONE, "broken"): "end",
}


@attrs.define
class _Block:
    """The open content block."""

    index: int
    kind: str
    tool_index: int = -1  # OpenAI tool call index, for tool_use blocks
    start_input: Any = None  # tool_use input given whole in content_block_start
    streamed_args: bool = False
    thinking: list[str] = attrs.Factory(list)
    signature: str = ""
    data: str = ""  # redacted_thinking payload


@attrs.define
class AnthropicStream:
    """One Anthropic stream -> OpenAI chunks. Implements ``providers.base.StreamTranslator``."""

    provider: str
    model: str
    created: int
    include_usage: bool = False
    _state: State = State.START
    _id: str = "chatcmpl-"
    _tool_calls: int = 0
    _block: _Block | None = attrs.field(default=None, repr=False)
    _usage: dict[str, Any] = attrs.field(factory=dict, repr=False)
    _finish_reason: str | None = None

    @property
    def done(self) -> bool:
        return self._state is State.DONE

    @property
    def state(self) -> State:
        return self._state

    @property
    def usage(self) -> JSON | None:
        """The usage so far in OpenAI's shape (message_start's, then message_delta's)."""
        return usage_to_openai(self._usage) if self._usage else None

    def feed(self, event: SSEEvent) -> list[bytes]:
        data = self._decode(event)
        kind = data.get("type", event.event)
        if kind == "error":
            error_type, message = error_fields(data)
            # A mid-stream error "would normally correspond to an HTTP 529 in a non-streaming
            # context" for overloaded_error; the status comes from the error type alone.
            raise anthropic_error(
                error_type or "api_error",
                message or "error",
                http_status=200,
                detail_code=detail_code(data),
            )
        if kind == "ping":
            return []
        following = _TRANSITIONS.get((self._state, kind))
        if following is None:
            if kind in _KNOWN:
                raise UpstreamProtocolError(
                    f"{self.provider}: {kind} is not allowed in stream state {self._state.value}."
                )
            return []  # a new event type: handled gracefully, as the versioning policy asks
        out = _HANDLERS[kind](self, data)
        self._state = following
        return out

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        state = self._state
        if state is State.DONE:
            return []
        if ENDINGS[state, ending] == "error" or self._finish_reason is None:
            # Never fabricate finish_reason "stop": a cut stream is an upstream failure.
            where = "inside an event" if ending == "partial" else f"in state {state.value}"
            raise UpstreamProtocolError(
                f"{self.provider}: stream ended before message_stop, {where}."
            )
        out = self._on_message_stop({})  # the stop_reason was said: end as message_stop would
        self._state = State.DONE
        return out

    # --- event handlers, one per event type in _TRANSITIONS ---------------------------------

    def _on_message_start(self, data: JSON) -> list[bytes]:
        message = _object(data.get("message"), "message_start.message", self.provider)
        self._id = completion_id(message.get("id"))
        if isinstance(message.get("model"), str) and message["model"]:
            self.model = message["model"]
        self._usage.update(_object(message.get("usage") or {}, "usage", self.provider))
        return [self._chunk({"role": "assistant", "content": ""})]

    def _on_block_start(self, data: JSON) -> list[bytes]:
        block = _object(data.get("content_block"), "content_block", self.provider)
        self._block = current = _Block(index=_index(data), kind=str(block.get("type")))
        if current.kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if current.kind == "thinking" and block.get("thinking"):
            current.thinking.append(block["thinking"])
            return [self._chunk({"reasoning_content": block["thinking"]})]
        if current.kind == "redacted_thinking":
            current.data = str(block.get("data", ""))
        elif current.kind == "tool_use":
            current.tool_index = self._tool_calls
            self._tool_calls += 1
            current.start_input = block.get("input") or None
            call = {
                "index": current.tool_index,
                "id": block.get("id"),
                "type": "function",
                "function": {"name": block.get("name"), "arguments": ""},
            }
            return [self._chunk({"tool_calls": [call]})]
        return []

    def _on_block_delta(self, data: JSON) -> list[bytes]:
        current = self._open_block(data)
        delta = _object(data.get("delta"), "delta", self.provider)
        kind = delta.get("type")
        if kind == "text_delta" and delta.get("text"):
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and current.kind == "tool_use" and delta.get("partial_json"):
            current.streamed_args = True
            piece = {"index": current.tool_index, "function": {"arguments": delta["partial_json"]}}
            return [self._chunk({"tool_calls": [piece]})]
        if kind == "thinking_delta" and delta.get("thinking"):
            current.thinking.append(delta["thinking"])
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        if kind == "signature_delta":
            current.signature += str(delta.get("signature", ""))
        return []  # empty pieces, citations_delta and future delta types add nothing

    def _on_block_stop(self, data: JSON) -> list[bytes]:
        return self._close_block(self._open_block(data))

    def _close_block(self, current: _Block) -> list[bytes]:
        self._block = None
        if current.kind == "thinking":
            signed = {
                "type": "thinking",
                "thinking": "".join(current.thinking),
                "signature": current.signature,
            }
            return [self._chunk({"thinking_blocks": [signed]})]
        if current.kind == "redacted_thinking":
            redacted = {"type": "redacted_thinking", "data": current.data}
            return [self._chunk({"thinking_blocks": [redacted]})]
        if current.kind == "tool_use" and not current.streamed_args:
            # No input_json_delta came (a tool without arguments): send the whole input.
            piece = {
                "index": current.tool_index,
                "function": {"arguments": tool_arguments(current.start_input)},
            }
            return [self._chunk({"tool_calls": [piece]})]
        return []

    def _on_message_delta(self, data: JSON) -> list[bytes]:
        if self._block is not None:
            return self._close_block(self._block) + self._message_delta(data)
        return self._message_delta(data)

    def _message_delta(self, data: JSON) -> list[bytes]:
        # message_delta usage counts are cumulative (streaming docs), so they replace ours;
        # a null count (a field the delta does not report) keeps the message_start value.
        usage = _object(data.get("usage") or {}, "usage", self.provider)
        self._usage.update((k, v) for k, v in usage.items() if v is not None)
        delta = _object(data.get("delta") or {}, "delta", self.provider)
        stop = delta.get("stop_reason")
        if not isinstance(stop, str) or self._finish_reason is not None:
            return []
        self._finish_reason = finish_reason(stop)
        return [self._chunk({}, self._finish_reason)]

    def _on_message_stop(self, data: JSON) -> list[bytes]:
        if self._finish_reason is None:
            raise UpstreamProtocolError(f"{self.provider}: message_stop without a stop_reason.")
        if not self.include_usage:
            return []
        # OpenAI's stream_options.include_usage: "an additional chunk will be streamed before
        # the data: [DONE] message [...] the choices field will always be an empty array."
        return [self._encode([], usage_to_openai(self._usage))]

    # --- helpers ----------------------------------------------------------------------------

    def _open_block(self, data: JSON) -> _Block:
        if self._block is None or self._block.index != _index(data):
            raise UpstreamProtocolError(
                f"{self.provider}: {data.get('type')} for a content block that is not open."
            )
        return self._block

    def _chunk(self, delta: JSON, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        return self._encode([choice], None)

    def _encode(self, choices: list[JSON], usage: JSON | None) -> bytes:
        chunk: JSON = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage  # null on every chunk but the last, as OpenAI sends it
        return dumps(chunk)

    def _decode(self, event: SSEEvent) -> JSON:
        try:
            data = json.loads(event.data)
        except ValueError:
            raise UpstreamProtocolError(
                f"{self.provider}: stream event {event.event!r} is not JSON."
            ) from None
        return _object(data, f"{event.event} event", self.provider)


_HANDLERS: Final[Mapping[str, Callable[[AnthropicStream, JSON], list[bytes]]]] = {
    "message_start": AnthropicStream._on_message_start,
    "content_block_start": AnthropicStream._on_block_start,
    "content_block_delta": AnthropicStream._on_block_delta,
    "content_block_stop": AnthropicStream._on_block_stop,
    "message_delta": AnthropicStream._on_message_delta,
    "message_stop": AnthropicStream._on_message_stop,
}


def _object(value: Any, what: str, provider: str) -> JSON:
    if not isinstance(value, dict):
        raise UpstreamProtocolError(f"{provider}: {what} is not a JSON object.")
    return value


def _index(data: JSON) -> int:
    index = data.get("index")
    return index if isinstance(index, int) else -1
