"""The Responses stream's events and transition table: what :mod:`.responses_stream`'s
encoder carries out. No I/O.

Owns :data:`TRANSITIONS` (state x input -> actions, next state: the whole machine, read by
the encoder and its tests), the part kinds (:data:`PARTS`: which events open, stream and
close a reasoning summary, an output text or a refusal), the pre-encoded heads of the delta
frames, and :func:`error_frame`, the ``error`` event that ends a stream which failed after
it started (https://platform.openai.com/docs/api-reference/responses-streaming).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final, Literal

from runestone_proxy.errors import GatewayError
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_frames import frame

__all__ = [
    "ARGS_HEAD",
    "PARTS",
    "TAIL",
    "TEXT_HEAD",
    "TEXT_TAIL",
    "TRANSITIONS",
    "Input",
    "State",
    "delta_head",
    "delta_prefix",
    "error_frame",
]


class State(enum.Enum):
    START = "start"  # no payload yet: response.created not sent
    IDLE = "idle"  # response started, no item open
    REASONING = "reasoning"  # a reasoning item is open (its summary part 0)
    TEXT = "text"  # a message item is open, an output_text part in it
    REFUSAL = "refusal"  # a message item is open, a refusal part in it
    CALLS = "calls"  # one or more function_call items are open
    DONE = "done"  # finish() ran: response.completed / .incomplete sent


#: The inputs: a piece of choice 0's delta, its finish_reason, ``empty`` (a payload with
#: none of these: the role-only first chunk, the usage chunk) and ``end`` (:meth:`finish`).
Input = Literal["empty", "reasoning", "text", "refusal", "tool", "stop", "end"]

_START, _IDLE, _REASONING, _TEXT, _REFUSAL, _CALLS, _DONE = State
_S: Final = ("start",)
#: (state, input) -> (actions, next state): the whole machine. Actions, run in order:
#:   start           response.created and response.in_progress
#:   close           close what is open: the part, then its item; or every open call
#:   close_part      close the open part of the message (its .done, content_part.done)
#:   open_reasoning  output_item.added reasoning, reasoning_summary_part.added
#:   open_message    output_item.added message
#:   open_text       content_part.added output_text;   open_refusal  ... refusal
#:   delta           the open part's delta (summary text, output text, refusal)
#:   tool            open the call's function_call item and / or stream its arguments
#:   note_stop       remember finish_reason (the first one)
#:   end             response.completed or response.incomplete, with the whole Response
#: Row (TEXT, text) is also written inline in ``feed`` (the per-chunk hot path); keep both.
TRANSITIONS: Final[Mapping[tuple[State, Input], tuple[tuple[str, ...], State]]] = {
    (_START, "empty"): (_S, _IDLE),
    (_START, "reasoning"): ((*_S, "open_reasoning", "delta"), _REASONING),
    (_START, "text"): ((*_S, "open_message", "open_text", "delta"), _TEXT),
    (_START, "refusal"): ((*_S, "open_message", "open_refusal", "delta"), _REFUSAL),
    (_START, "tool"): ((*_S, "tool"), _CALLS),
    (_START, "stop"): ((*_S, "note_stop"), _IDLE),
    (_START, "end"): ((*_S, "end"), _DONE),
    (_IDLE, "empty"): ((), _IDLE),
    (_IDLE, "reasoning"): (("open_reasoning", "delta"), _REASONING),
    (_IDLE, "text"): (("open_message", "open_text", "delta"), _TEXT),
    (_IDLE, "refusal"): (("open_message", "open_refusal", "delta"), _REFUSAL),
    (_IDLE, "tool"): (("tool",), _CALLS),
    (_IDLE, "stop"): (("note_stop",), _IDLE),
    (_IDLE, "end"): (("end",), _DONE),
    (_REASONING, "empty"): ((), _REASONING),
    (_REASONING, "reasoning"): (("delta",), _REASONING),
    (_REASONING, "text"): (("close", "open_message", "open_text", "delta"), _TEXT),
    (_REASONING, "refusal"): (("close", "open_message", "open_refusal", "delta"), _REFUSAL),
    (_REASONING, "tool"): (("close", "tool"), _CALLS),
    (_REASONING, "stop"): (("note_stop", "close"), _IDLE),
    (_REASONING, "end"): (("close", "end"), _DONE),
    (_TEXT, "empty"): ((), _TEXT),
    (_TEXT, "reasoning"): (("close", "open_reasoning", "delta"), _REASONING),
    (_TEXT, "text"): (("delta",), _TEXT),
    (_TEXT, "refusal"): (("close_part", "open_refusal", "delta"), _REFUSAL),  # same message
    (_TEXT, "tool"): (("close", "tool"), _CALLS),
    (_TEXT, "stop"): (("note_stop", "close"), _IDLE),
    (_TEXT, "end"): (("close", "end"), _DONE),
    (_REFUSAL, "empty"): ((), _REFUSAL),
    (_REFUSAL, "reasoning"): (("close", "open_reasoning", "delta"), _REASONING),
    (_REFUSAL, "text"): (("close_part", "open_text", "delta"), _TEXT),  # same message
    (_REFUSAL, "refusal"): (("delta",), _REFUSAL),
    (_REFUSAL, "tool"): (("close", "tool"), _CALLS),
    (_REFUSAL, "stop"): (("note_stop", "close"), _IDLE),
    (_REFUSAL, "end"): (("close", "end"), _DONE),
    (_CALLS, "empty"): ((), _CALLS),
    (_CALLS, "reasoning"): (("close", "open_reasoning", "delta"), _REASONING),
    (_CALLS, "text"): (("close", "open_message", "open_text", "delta"), _TEXT),
    (_CALLS, "refusal"): (("close", "open_message", "open_refusal", "delta"), _REFUSAL),
    (_CALLS, "tool"): (("tool",), _CALLS),
    (_CALLS, "stop"): (("note_stop", "close"), _IDLE),
    (_CALLS, "end"): (("close", "end"), _DONE),
    (_DONE, "empty"): ((), _DONE),  # nothing is defined after the end: ignored
    (_DONE, "reasoning"): ((), _DONE),
    (_DONE, "text"): ((), _DONE),
    (_DONE, "refusal"): ((), _DONE),
    (_DONE, "tool"): ((), _DONE),
    (_DONE, "stop"): ((), _DONE),
    (_DONE, "end"): ((), _DONE),  # finish() is idempotent
}


#: Each part kind -> its events (added, delta, done, part done), the field its text is in,
#: and the field that numbers it within its item.
PARTS: Final[Mapping[str, tuple[str, str, str, str, str, str]]] = {
    "summary_text": (
        *("response.reasoning_summary_part.added", "response.reasoning_summary_text.delta"),
        *("response.reasoning_summary_text.done", "response.reasoning_summary_part.done"),
        *("text", "summary_index"),
    ),
    "output_text": (
        *("response.content_part.added", "response.output_text.delta"),
        *("response.output_text.done", "response.content_part.done"),
        *("text", "content_index"),
    ),
    "refusal": (
        *("response.content_part.added", "response.refusal.delta"),
        *("response.refusal.done", "response.content_part.done"),
        *("refusal", "content_index"),
    ),
}
_ARGS = "response.function_call_arguments.delta"
TAIL = b"}\n\n"
TEXT_TAIL = b',"logprobs":[]}\n\n'  # output_text deltas carry logprobs: []


def delta_head(event_type: str) -> bytes:
    """A delta frame up to its ``sequence_number`` value."""
    name = event_type.encode()
    return b'event: %b\ndata: {"type":"%b","sequence_number":' % (name, name)


TEXT_HEAD: Final = delta_head("response.output_text.delta")
ARGS_HEAD: Final = delta_head(_ARGS)


def error_frame(exc: GatewayError, sequence_number: int) -> bytes:
    """The Responses ``error`` event that ends a stream which failed after it started:
    ``{"type": "error", "code", "message", "param", "sequence_number"}``; ``code`` is the
    error's code, else its type (``server_error``, ``invalid_request_error``, ...)."""
    data = {
        "type": "error",
        "sequence_number": sequence_number,
        "code": exc.code if exc.code is not None else exc.error_type,
        "message": exc.message,
        "param": exc.param,
    }
    return frame("error", dumps(data))


def delta_prefix(fields: Mapping[str, Any]) -> bytes:
    """``,"<field>":<value>...,"delta":`` for a delta frame after its sequence number."""
    return b"," + dumps(fields)[1:-1] + b',"delta":'
