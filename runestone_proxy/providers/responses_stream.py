"""OpenAI ``chat.completion.chunk`` payloads -> OpenAI Responses API SSE frames. No I/O.

Owns :class:`ResponsesEncoder`, the per-stream state machine that answers a Responses client
whose request was translated to a chat target, and :func:`error_frame`, the ``error`` event
that ends a stream which failed after it started. In: each chunk's JSON text
(https://platform.openai.com/docs/api-reference/chat/streaming), the final usage chunk
(``"choices": []``) included. Out: whole SSE frames (``event: <type>\\ndata: <json>\\n\\n``)
in the order https://platform.openai.com/docs/api-reference/responses-streaming gives, each
with ``sequence_number`` 0, 1, 2, ...:

    response.created, response.in_progress     on the first payload; status in_progress,
                                               output []
    per output item, output_index 0, 1, ...:
      reasoning   output_item.added, reasoning_summary_part.added,
                  reasoning_summary_text.delta*, reasoning_summary_text.done,
                  reasoning_summary_part.done, output_item.done
      message     output_item.added, then per part (content_index 0, 1): content_part.added,
                  output_text.delta* / refusal.delta*, output_text.done / refusal.done,
                  content_part.done; then output_item.done
      call        output_item.added (arguments ""), function_call_arguments.delta*,
                  function_call_arguments.done, output_item.done
    response.completed (or response.incomplete)  the whole Response, as ``final``

How this works: each chunk's choice 0 is read in a fixed order (reasoning, content, refusal,
each tool call piece, finish_reason) and every piece found is one *input* to
:data:`TRANSITIONS`, the whole machine: (state, input) -> (actions, next state). The state
is what is open; an input of another kind closes it first. Parallel tool calls interleave
by chat ``index`` and Responses items may interleave by ``output_index``, so every call
gets its own item when it first appears and streams its arguments as they come; the open
calls close together, at the next input of another kind or the finish_reason. A piece for
a call already closed (text came in between) cannot be delivered: UpstreamProtocolError.
``finish_reason`` is noted before it closes what is open, so that the item cut short by
``length`` / ``content_filter`` is done with status ``incomplete``; response.completed waits
for :meth:`ResponsesEncoder.finish` (the usage chunk comes after the finish_reason).

The Response in response.completed is the one ``responses_response.chat_to_response`` makes
of the same answer whole: same item ids, statuses, echoed settings and usage.

Per chunk the cost is one JSON decode (``chunks.loads_chunk``), one string encode joined to a
prefix made when the part opened, and one list append (the text is kept for the ``.done``
events and the final Response); row (TEXT, text), the common chunk, is carried out inline
in :meth:`ResponsesEncoder.feed`, on the chunk's bytes when it is a plain text chunk
(``chunks.plain_text``: its JSON literal forwarded; only the literal is decoded).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import attrs

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.providers.chunks import (
    chunk_choice,
    delta_pieces,
    json_string,
    literal_text,
    loads_chunk,
    plain_text,
    tool_key,
)
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_frames import frame
from runestone_proxy.providers.openai_errors import error_from_payload, is_error
from runestone_proxy.providers.responses_events import (
    ARGS_HEAD,
    PARTS,
    TAIL,
    TEXT_HEAD,
    TEXT_TAIL,
    TRANSITIONS,
    Input,
    State,
    delta_head,
    delta_prefix,
    error_frame,
)
from runestone_proxy.providers.responses_response import (
    function_call_item,
    incomplete_reason,
    item_id,
    response_object,
    usage_to_responses,
)

__all__ = ["TRANSITIONS", "Input", "ResponsesEncoder", "State", "error_frame"]

JSON = dict[str, Any]


@attrs.define
class _Call:
    """One chat tool call (by its ``index``): its function_call item, open or done."""

    index: int  # output_index
    item: JSON
    prefix: bytes  # its arguments delta frame after the sequence number
    pieces: list[str] = attrs.Factory(list)
    open: bool = True


@attrs.define
class ResponsesEncoder:
    """One chat chunk stream -> Responses frames: :meth:`feed` each payload, then
    :meth:`finish` when the upstream ended cleanly."""

    request: Mapping[str, Any] = attrs.field(repr=False)
    response_id: str
    created: int
    _state: State = attrs.field(default=State.START, init=False)
    _seq: int = attrs.field(default=0, init=False)
    _model: object = attrs.field(default=None, init=False)
    _output: list[JSON] = attrs.field(factory=list, init=False, repr=False)  # the final items
    # The open reasoning or message item, its open part and that part's text so far:
    _item: JSON | None = attrs.field(default=None, init=False, repr=False)
    _index: int = attrs.field(default=-1, init=False)  # its output_index
    _part: JSON | None = attrs.field(default=None, init=False, repr=False)
    _where: JSON = attrs.field(factory=dict, init=False, repr=False)  # item_id, indexes
    _pieces: list[str] = attrs.field(factory=list, init=False, repr=False)
    _head: bytes = attrs.field(default=b"", init=False, repr=False)  # its delta frame: head,
    _prefix: bytes = attrs.field(default=b"", init=False, repr=False)  # seq, prefix, delta,
    _tail: bytes = attrs.field(default=b"", init=False, repr=False)  # tail
    _calls: dict[object, _Call] = attrs.field(factory=dict, init=False, repr=False)
    _open_calls: list[_Call] = attrs.field(factory=list, init=False, repr=False)
    _last_tool: object = attrs.field(default=None, init=False, repr=False)
    _finish: str | None = attrs.field(default=None, init=False)
    _usage: Mapping[str, Any] | None = attrs.field(default=None, init=False, repr=False)
    _final: bytes | None = attrs.field(default=None, init=False, repr=False)

    @property
    def state(self) -> State:
        return self._state

    @property
    def sequence(self) -> int:
        """The next event's ``sequence_number`` (for :func:`error_frame`)."""
        return self._seq

    @property
    def usage(self) -> Mapping[str, Any] | None:
        """The usage the stream reported, in OpenAI's chat shape, or None (yet)."""
        return self._usage

    @property
    def final(self) -> bytes | None:
        """The whole Response as the stream ended (JSON); None until :meth:`finish`."""
        return self._final

    def feed(self, payload: bytes) -> list[bytes]:
        """One chunk's JSON text -> zero or more frames. An error object raises it."""
        if self._state is State.TEXT:
            literal = plain_text(payload)
            if literal is not None:  # row (TEXT, text) on the bytes: most chunks of a stream
                self._pieces.append(literal_text(literal))
                seq = self._seq
                self._seq = seq + 1
                return [b"%b%d%b%b%b" % (TEXT_HEAD, seq, self._prefix, literal, TEXT_TAIL)]
        obj = loads_chunk(payload)
        if not isinstance(obj, dict):
            raise UpstreamProtocolError("stream chunk is not a JSON object")
        if ("error" in obj or obj.get("object") == "error") and is_error(obj):
            raise error_from_payload(obj)
        out: list[bytes] = []
        if self._model is None:
            self._model = obj.get("model")
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
                    self._pieces.append(value)
                    seq = self._seq
                    self._seq = seq + 1
                    text = json_string(value)
                    out.append(b"%b%d%b%b%b" % (TEXT_HEAD, seq, self._prefix, text, TEXT_TAIL))
                else:
                    self._step(kind, value, out)
        finish = choice.get("finish_reason")
        if finish is not None:
            self._step("stop", finish, out)
        elif self._state is State.START:
            self._step("empty", None, out)
        return out

    def finish(self) -> list[bytes]:
        """The upstream ended cleanly: close what is open, then response.completed (or
        response.incomplete). Idempotent."""
        out: list[bytes] = []
        self._step("end", None, out)
        return out

    def _step(self, kind: Input, value: Any, out: list[bytes]) -> None:
        actions, following = _COMPILED[self._state, kind]
        for action in actions:
            action(self, value, out)
        self._state = following

    def _event(self, event_type: str, fields: JSON) -> bytes:
        seq = self._seq
        self._seq = seq + 1
        return frame(event_type, dumps({"type": event_type, "sequence_number": seq, **fields}))

    def _response(self, status: str, output: list[JSON]) -> JSON:
        model = self._model if isinstance(self._model, str) else self.request.get("model")
        in_progress = status == "in_progress"
        return response_object(
            self.request,
            response_id=self.response_id,
            created=self.created,
            model=model,
            status=status,
            reason=None if in_progress else incomplete_reason(self._finish),
            output=output,
            usage=None if in_progress else usage_to_responses(self._usage),
        )

    # --- actions, one per name in TRANSITIONS ----------------------------------------------

    def _start(self, _: Any, out: list[bytes]) -> None:
        response = dumps(self._response("in_progress", []))  # one encode for both events
        out.append(self._lifecycle("response.created", response))
        out.append(self._lifecycle("response.in_progress", response))

    def _lifecycle(self, event_type: str, response: bytes) -> bytes:
        """An event carrying the whole Response, already encoded."""
        seq = self._seq
        self._seq = seq + 1
        data = b'{"type":"%b","sequence_number":%d,"response":%b}'
        return frame(event_type, data % (event_type.encode(), seq, response))

    def _add(self, added: JSON, final: JSON, out: list[bytes]) -> int:
        """output_item.added with the item as it starts; ``final`` is filled in as it goes."""
        index = len(self._output)
        self._output.append(final)
        out.append(
            self._event("response.output_item.added", {"output_index": index, "item": added})
        )
        return index

    def _open_reasoning(self, _: Any, out: list[bytes]) -> None:
        rid = item_id("rs", self.response_id, len(self._output))
        self._item = {"id": rid, "type": "reasoning", "summary": []}
        self._index = self._add({"id": rid, "type": "reasoning", "summary": []}, self._item, out)
        self._open_part({"type": "summary_text", "text": ""}, self._item["summary"], out)

    def _open_message(self, _: Any, out: list[bytes]) -> None:
        mid = item_id("msg", self.response_id, len(self._output))
        head = {"id": mid, "type": "message", "status": "in_progress", "role": "assistant"}
        self._item = {**head, "content": []}
        self._index = self._add({**head, "content": []}, self._item, out)

    def _open_text(self, _: Any, out: list[bytes]) -> None:
        assert self._item is not None
        part = {"type": "output_text", "text": "", "annotations": []}
        self._open_part(part, self._item["content"], out)

    def _open_refusal(self, _: Any, out: list[bytes]) -> None:
        assert self._item is not None
        self._open_part({"type": "refusal", "refusal": ""}, self._item["content"], out)

    def _open_part(self, part: JSON, parts: list[JSON], out: list[bytes]) -> None:
        """Open ``part`` as the next of ``parts`` (the item's summary or content)."""
        assert self._item is not None
        kind = part["type"]
        added, delta, _, _, _, index_name = PARTS[kind]
        self._where = {"item_id": self._item["id"], "output_index": self._index}
        self._where[index_name] = len(parts)
        out.append(self._event(added, {**self._where, "part": part}))
        self._part = part
        parts.append(part)
        self._pieces = []
        self._head = delta_head(delta)
        self._prefix = delta_prefix(self._where)
        self._tail = TEXT_TAIL if kind == "output_text" else TAIL

    def _delta(self, piece: str, out: list[bytes]) -> None:
        self._pieces.append(piece)
        seq = self._seq
        self._seq = seq + 1
        out.append(b"%b%d%b%b%b" % (self._head, seq, self._prefix, json_string(piece), self._tail))

    def _close_part(self, _: Any, out: list[bytes]) -> None:
        part = self._part
        assert part is not None
        kind = part["type"]
        _, _, done, part_done, field, _ = PARTS[kind]
        text = "".join(self._pieces)
        self._pieces = []
        part[field] = text
        fields: JSON = {**self._where, field: text}
        if kind == "output_text":
            fields["logprobs"] = []
        out.append(self._event(done, fields))
        out.append(self._event(part_done, {**self._where, "part": part}))
        self._part = None

    def _close(self, _: Any, out: list[bytes]) -> None:
        """Close what is open: the reasoning or message item (its part first), or every
        open call. The last item closed after a ``length`` / ``content_filter`` finish is
        ``incomplete``."""
        status = "completed" if incomplete_reason(self._finish) is None else "incomplete"
        if self._open_calls:
            last = self._open_calls[-1]
            for call in self._open_calls:
                call.open = False
                item = call.item
                item["arguments"] = "".join(call.pieces)
                item["status"] = status if call is last else "completed"
                where = {"item_id": item["id"], "output_index": call.index}
                arguments = {**where, "arguments": item["arguments"]}
                out.append(self._event("response.function_call_arguments.done", arguments))
                done = {"output_index": call.index, "item": item}
                out.append(self._event("response.output_item.done", done))
            self._open_calls.clear()
            return
        opened = self._item
        assert opened is not None
        if self._part is not None:
            self._close_part(None, out)
        if opened["type"] == "message":
            opened["status"] = status
        out.append(
            self._event("response.output_item.done", {"output_index": self._index, "item": opened})
        )
        self._item = None

    def _tool(self, piece: Mapping[str, Any], out: list[bytes]) -> None:
        key = self._tool_key(piece)
        call = self._calls.get(key)
        function = piece.get("function")
        function = function if isinstance(function, Mapping) else {}
        if call is None:
            index = len(self._output)
            item = function_call_item(
                index,
                self.response_id,
                given_id=piece.get("id"),
                name=function.get("name"),
                arguments="",
                status="in_progress",
            )
            self._add(dict(item), item, out)
            call = _Call(index, item, delta_prefix({"item_id": item["id"], "output_index": index}))
            self._calls[key] = call
            self._open_calls.append(call)
        elif not call.open:
            raise UpstreamProtocolError(
                f"stream chunk continues tool call {key!r} after its item was done"
            )
        arguments = function.get("arguments")
        if arguments and isinstance(arguments, str):
            call.pieces.append(arguments)
            seq = self._seq
            self._seq = seq + 1
            text = json_string(arguments)
            out.append(b"%b%d%b%b%b" % (ARGS_HEAD, seq, call.prefix, text, TAIL))

    def _note_stop(self, finish: Any, _: list[bytes]) -> None:
        if self._finish is None:
            self._finish = finish if isinstance(finish, str) else "stop"

    def _end(self, _: Any, out: list[bytes]) -> None:
        response = self._response("completed", self._output)
        if response["incomplete_details"] is not None:
            response["status"] = "incomplete"
        final = dumps(response)
        self._final = final
        out.append(self._lifecycle(f"response.{response['status']}", final))

    def _tool_key(self, piece: Mapping[str, Any]) -> object:
        key = self._last_tool = tool_key(piece, self._last_tool)
        return key


_Action = Callable[[ResponsesEncoder, Any, list[bytes]], None]
_ACTIONS: Final[Mapping[str, _Action]] = {
    "start": ResponsesEncoder._start,
    "close": ResponsesEncoder._close,
    "close_part": ResponsesEncoder._close_part,
    "open_reasoning": ResponsesEncoder._open_reasoning,
    "open_message": ResponsesEncoder._open_message,
    "open_text": ResponsesEncoder._open_text,
    "open_refusal": ResponsesEncoder._open_refusal,
    "delta": ResponsesEncoder._delta,
    "tool": ResponsesEncoder._tool,
    "note_stop": ResponsesEncoder._note_stop,
    "end": ResponsesEncoder._end,
}
_COMPILED: Final[Mapping[tuple[State, Input], tuple[tuple[_Action, ...], State]]] = {
    key: (tuple(_ACTIONS[name] for name in names), following)
    for key, (names, following) in TRANSITIONS.items()
}
