"""OpenAI ``chat.completion.chunk`` payloads -> Anthropic Messages SSE frames. No I/O.

Owns :class:`MessagesEncoder`, the per-stream state machine that answers a Messages client
whose request was translated to an OpenAI-compatible target. In: each chunk's JSON text
(https://platform.openai.com/docs/api-reference/chat/streaming), the final usage chunk
(``"choices": []``) included. Out: whole SSE frames in the order
https://docs.anthropic.com/en/docs/build-with-claude/streaming gives:

    message_start          once, on the first payload: ``content: []``, ``stop_reason: null``
                           and usage 0 / 0, since OpenAI reports usage only at the end
    content blocks         each content_block_start, content_block_delta*, content_block_stop
                           with ``index`` 0, 1, 2, ...
    message_delta          ``stop_reason``, ``stop_sequence: null`` (or vLLM's matched stop
                           string) and the usage, translated as ``messages_response`` does
    message_stop

How this works: each chunk's choice 0 is read in a fixed order (reasoning, content, refusal,
each tool call piece, finish_reason) and every piece found is one *input* to
:data:`TRANSITIONS`, the whole machine: (state, input) -> (actions, next state). The open
block's kind is the state; an input of another kind closes it first ("a switch of kind
closes the open block"). ``finish_reason`` closes the open block and is remembered: the usage
chunk comes *after* it, so message_delta and message_stop wait for :meth:`finish` (the
upstream ended cleanly), whose input is ``end``.

Block kinds: reasoning (``delta.reasoning_content``: DeepSeek, vLLM; ``delta.reasoning``:
OpenRouter, Groq) -> ``thinking`` with ``thinking_delta``, closed by a ``signature_delta``
with ``signature: ""`` (no OpenAI-compatible server signs reasoning); ``delta.content`` and
``delta.refusal`` -> ``text`` with ``text_delta``; tool call pieces -> ``tool_use``
``{id, name, input: {}}`` with ``input_json_delta`` carrying the ``arguments`` text as it
comes (``partial_json``).

Tool calls: OpenAI streams ``tool_calls[i]`` with ``id`` and ``function.name`` first, then
``function.arguments`` pieces; several calls may interleave by ``index``, but Anthropic blocks
never overlap. So calls become blocks in the order they first appear: the first streams live;
one that appears while another tool block is open is held (its pieces kept) and sent whole
(start, one input_json_delta, stop) when the open one closes, at the next switch of kind or
the finish_reason. Nothing is lost whatever the interleaving; the price is that a second
parallel call is not streamed live. A piece for a call whose block is already closed (after
text came in between) cannot be delivered: :class:`UpstreamProtocolError`.

Per chunk the cost is one JSON decode (``chunks.loads_chunk``) and, for text, thinking and tool
arguments, one string encode joined to a prefix made when the block opened; row (TEXT, text),
the common chunk, is carried out inline in :meth:`MessagesEncoder.feed`, on the chunk's
bytes when it is a plain text chunk (``chunks.plain_text``: its JSON literal forwarded, no
decode and no encode).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from typing import Any, Final, Literal

import attrs

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.providers.chunks import (
    chunk_choice,
    delta_pieces,
    json_string,
    loads_chunk,
    plain_text,
    tool_key,
)
from runestone_proxy.providers.messages_frames import frame_obj
from runestone_proxy.providers.messages_response import (
    message_id,
    stop_reason,
    tool_use_id,
    usage_to_anthropic,
)
from runestone_proxy.providers.openai_errors import error_from_payload, is_error

__all__ = ["TRANSITIONS", "Input", "MessagesEncoder", "State"]

#: The two fixed frames, as bytes (what ``frame_obj`` would encode, without a dumps each).
_BLOCK_STOP: Final = (
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":%d}\n\n'
)
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


class State(enum.Enum):
    START = "start"  # no payload yet: message_start not sent
    IDLE = "idle"  # message started, no block open
    THINKING = "thinking"  # a thinking block is open
    TEXT = "text"  # a text block is open
    TOOL = "tool"  # a tool_use block is open (others may be held)
    DONE = "done"  # finish() ran: message_stop sent


#: The inputs: a piece of choice 0's delta, its finish_reason, ``empty`` (a payload with
#: none of these: the role-only first chunk, the usage chunk) and ``end`` (:meth:`finish`).
Input = Literal["empty", "reasoning", "text", "tool", "stop", "end"]

_START, _IDLE, _THINKING, _TEXT, _TOOL, _DONE = State
#: (state, input) -> (actions, next state): the whole machine. Actions, run in order:
#:   message_start   the message_start frame
#:   close           close the open block: thinking gets its signature_delta first; a tool
#:                   block is followed by the held tool calls, each sent whole
#:   open_thinking   content_block_start thinking;   thinking   its thinking_delta
#:   open_text       content_block_start text;       text       its text_delta
#:   tool            open the call's tool_use block, or hold it, or stream its arguments
#:   note_stop       remember finish_reason (and vLLM's matched stop string)
#:   end             message_delta (stop_reason, usage) and message_stop
#: Row (TEXT, text) is also written inline in ``feed`` (the per-chunk hot path); keep both.
TRANSITIONS: Final[Mapping[tuple[State, Input], tuple[tuple[str, ...], State]]] = {
    (_START, "empty"): (("message_start",), _IDLE),
    (_START, "reasoning"): (("message_start", "open_thinking", "thinking"), _THINKING),
    (_START, "text"): (("message_start", "open_text", "text"), _TEXT),
    (_START, "tool"): (("message_start", "tool"), _TOOL),
    (_START, "stop"): (("message_start", "note_stop"), _IDLE),
    (_START, "end"): (("message_start", "end"), _DONE),
    (_IDLE, "empty"): ((), _IDLE),
    (_IDLE, "reasoning"): (("open_thinking", "thinking"), _THINKING),
    (_IDLE, "text"): (("open_text", "text"), _TEXT),
    (_IDLE, "tool"): (("tool",), _TOOL),
    (_IDLE, "stop"): (("note_stop",), _IDLE),
    (_IDLE, "end"): (("end",), _DONE),
    (_THINKING, "empty"): ((), _THINKING),
    (_THINKING, "reasoning"): (("thinking",), _THINKING),
    (_THINKING, "text"): (("close", "open_text", "text"), _TEXT),
    (_THINKING, "tool"): (("close", "tool"), _TOOL),
    (_THINKING, "stop"): (("close", "note_stop"), _IDLE),
    (_THINKING, "end"): (("close", "end"), _DONE),
    (_TEXT, "empty"): ((), _TEXT),
    (_TEXT, "reasoning"): (("close", "open_thinking", "thinking"), _THINKING),
    (_TEXT, "text"): (("text",), _TEXT),
    (_TEXT, "tool"): (("close", "tool"), _TOOL),
    (_TEXT, "stop"): (("close", "note_stop"), _IDLE),
    (_TEXT, "end"): (("close", "end"), _DONE),
    (_TOOL, "empty"): ((), _TOOL),
    (_TOOL, "reasoning"): (("close", "open_thinking", "thinking"), _THINKING),
    (_TOOL, "text"): (("close", "open_text", "text"), _TEXT),
    (_TOOL, "tool"): (("tool",), _TOOL),
    (_TOOL, "stop"): (("close", "note_stop"), _IDLE),
    (_TOOL, "end"): (("close", "end"), _DONE),
    (_DONE, "empty"): ((), _DONE),  # nothing is defined after the end: ignored
    (_DONE, "reasoning"): ((), _DONE),
    (_DONE, "text"): ((), _DONE),
    (_DONE, "tool"): ((), _DONE),
    (_DONE, "stop"): ((), _DONE),
    (_DONE, "end"): ((), _DONE),  # finish() is idempotent
}

_DELTA = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":'
_END = b"}}\n\n"


@attrs.define
class _Tool:
    """One OpenAI tool call, by its ``index``."""

    id: str
    name: str
    status: Literal["open", "held", "closed"] = "held"
    held: list[str] = attrs.Factory(list)  # argument pieces of a held call


@attrs.define
class MessagesEncoder:
    """One OpenAI chunk stream -> Anthropic frames: :meth:`feed` each payload, then
    :meth:`finish` when the upstream ended cleanly."""

    model: str
    _state: State = attrs.field(default=State.START, init=False)
    _id: str = attrs.field(default="msg_", init=False)
    _index: int = attrs.field(default=-1, init=False)  # the last block's index
    _prefix: bytes = attrs.field(default=b"", init=False, repr=False)  # open block's delta
    _tools: dict[object, _Tool] = attrs.field(factory=dict, init=False, repr=False)
    _held: list[_Tool] = attrs.field(factory=list, init=False, repr=False)
    _current: _Tool | None = attrs.field(default=None, init=False, repr=False)  # open block
    _last_tool: object = attrs.field(default=None, init=False, repr=False)
    _finish: str | None = attrs.field(default=None, init=False)
    _matched: object = attrs.field(default=None, init=False, repr=False)
    _refused: bool = attrs.field(default=False, init=False)
    _usage: Mapping[str, Any] | None = attrs.field(default=None, init=False, repr=False)

    @property
    def state(self) -> State:
        return self._state

    @property
    def usage(self) -> Mapping[str, Any] | None:
        """The usage the stream reported, in OpenAI's shape, or None (yet)."""
        return self._usage

    def feed(self, payload: bytes) -> list[bytes]:
        """One chunk's JSON text -> zero or more frames. An error object raises it."""
        if self._state is State.TEXT:
            text = plain_text(payload)
            if text is not None:  # row (TEXT, text) on the bytes: most chunks of a stream
                return [self._prefix + text + _END]
        obj = loads_chunk(payload)
        if not isinstance(obj, dict):
            raise UpstreamProtocolError("stream chunk is not a JSON object")
        if "error" in obj or obj.get("object") == "error":
            if is_error(obj):
                raise error_from_payload(obj)
        out: list[bytes] = []
        if self._state is State.START:
            self._id = message_id(obj.get("id"), payload)
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        choice = chunk_choice(obj.get("choices"))
        if choice is None:
            self._step("empty", None, out)
            return out
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for kind, value in delta_pieces(delta):
                if kind == "text" and self._state is State.TEXT:  # row (TEXT, text), inline
                    out.append(self._prefix + json_string(value) + _END)
                elif kind == "refusal":  # said as text, and the stop becomes "refusal"
                    self._refused = True
                    self._step("text", value, out)
                else:
                    self._step(kind, value, out)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._step("stop", choice, out)
        elif self._state is State.START:
            self._step("empty", None, out)
        return out

    def finish(self) -> list[bytes]:
        """The upstream ended cleanly: close what is open, message_delta, message_stop.
        Idempotent."""
        out: list[bytes] = []
        self._step("end", None, out)
        return out

    def _step(self, kind: Input, value: Any, out: list[bytes]) -> None:
        actions, following = _COMPILED[self._state, kind]
        for action in actions:
            action(self, value, out)
        self._state = following

    # --- actions, one per name in TRANSITIONS ----------------------------------------------

    def _message_start(self, _: Any, out: list[bytes]) -> None:
        message: dict[str, Any] = {
            "id": self._id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0},
        }
        out.append(frame_obj({"type": "message_start", "message": message}))

    def _open(
        self, block: dict[str, Any], delta_type: bytes, field: bytes, out: list[bytes]
    ) -> None:
        self._index += 1
        index = self._index
        out.append(
            frame_obj({"type": "content_block_start", "index": index, "content_block": block})
        )
        self._prefix = b'%s%d,"delta":{"type":"%s","%s":' % (_DELTA, index, delta_type, field)

    def _open_thinking(self, _: Any, out: list[bytes]) -> None:
        block = {"type": "thinking", "thinking": "", "signature": ""}
        self._open(block, b"thinking_delta", b"thinking", out)

    def _open_text(self, _: Any, out: list[bytes]) -> None:
        self._open({"type": "text", "text": ""}, b"text_delta", b"text", out)

    def _delta(self, piece: str, out: list[bytes]) -> None:
        out.append(self._prefix + json_string(piece) + _END)

    def _tool(self, piece: Mapping[str, Any], out: list[bytes]) -> None:
        key = self._tool_key(piece)
        tool = self._tools.get(key)
        function = piece.get("function")
        function = function if isinstance(function, Mapping) else {}
        if tool is None:
            name = function.get("name")
            n = len(self._tools)
            tool = _Tool(
                tool_use_id(piece.get("id"), self._id, n), name if isinstance(name, str) else ""
            )
            self._tools[key] = tool
            if self._current is not None:  # another tool block is open: hold this one
                self._held.append(tool)
            else:
                self._open_tool(tool, out)
        elif tool.status == "closed":
            raise UpstreamProtocolError(
                f"stream chunk continues tool call {key!r} after its block closed"
            )
        arguments = function.get("arguments")
        if arguments and isinstance(arguments, str):
            if tool.status == "open":
                out.append(self._prefix + json_string(arguments) + _END)
            else:
                tool.held.append(arguments)

    def _open_tool(self, tool: _Tool, out: list[bytes]) -> None:
        tool.status = "open"
        self._current = tool
        block = {"type": "tool_use", "id": tool.id, "name": tool.name, "input": {}}
        self._open(block, b"input_json_delta", b"partial_json", out)

    def _close(self, _: Any, out: list[bytes]) -> None:
        state = self._state
        if state is State.THINKING:
            signature = {"type": "signature_delta", "signature": ""}
            out.append(
                frame_obj({"type": "content_block_delta", "index": self._index, "delta": signature})
            )
        out.append(self._stop_frame())
        if state is State.TOOL:
            if self._current is not None:
                self._current.status = "closed"
                self._current = None
            for tool in self._held:
                self._open_tool(tool, out)
                if tool.held:
                    out.append(self._prefix + json_string("".join(tool.held)) + _END)
                    tool.held.clear()
                out.append(self._stop_frame())
                tool.status = "closed"
            self._held.clear()
            self._current = None

    def _stop_frame(self) -> bytes:
        return _BLOCK_STOP % self._index

    def _note_stop(self, choice: Mapping[str, Any], _: list[bytes]) -> None:
        if self._finish is None:
            finish = choice.get("finish_reason")
            self._finish = finish if isinstance(finish, str) else "stop"
            self._matched = choice.get("stop_reason")

    def _end(self, _: Any, out: list[bytes]) -> None:
        stop, sequence = stop_reason(
            self._finish, self._matched, tools=bool(self._tools), refused=self._refused
        )
        usage: dict[str, Any] = (
            usage_to_anthropic(self._usage) if self._usage is not None else {"output_tokens": 0}
        )
        delta = {"stop_reason": stop, "stop_sequence": sequence}
        out.append(frame_obj({"type": "message_delta", "delta": delta, "usage": usage}))
        out.append(_MESSAGE_STOP)

    def _tool_key(self, piece: Mapping[str, Any]) -> object:
        key = self._last_tool = tool_key(piece, self._last_tool)
        return key


_Action = Callable[[MessagesEncoder, Any, list[bytes]], None]
_ACTIONS: Final[Mapping[str, _Action]] = {
    "message_start": MessagesEncoder._message_start,
    "close": MessagesEncoder._close,
    "open_thinking": MessagesEncoder._open_thinking,
    "thinking": MessagesEncoder._delta,
    "open_text": MessagesEncoder._open_text,
    "text": MessagesEncoder._delta,
    "tool": MessagesEncoder._tool,
    "note_stop": MessagesEncoder._note_stop,
    "end": MessagesEncoder._end,
}
_COMPILED: Final[Mapping[tuple[State, Input], tuple[tuple[_Action, ...], State]]] = {
    key: (tuple(_ACTIONS[name] for name in names), following)
    for key, (names, following) in TRANSITIONS.items()
}
