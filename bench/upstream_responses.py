"""The fake upstream's OpenAI Responses API answers: precomputed bodies and event streams.

``bench/upstream.py`` routes ``POST /v1/responses`` here. No I/O: the whole Response object
and the stream's writes are built once per (model, chunk count) and cached, so the Responses
route costs the fake upstream what the chat route does.

Whole (https://platform.openai.com/docs/api-reference/responses/object): a ``response``
with status ``completed``, one ``message`` output item holding one ``output_text`` part,
and ``usage`` (input 9, output 6 tokens).

Stream (https://platform.openai.com/docs/api-reference/responses-streaming): every event is
``event: <type>`` + ``data: <json>`` with ``sequence_number`` 0, 1, 2, ...; no ``[DONE]``:

    response.created, response.in_progress       the Response, status in_progress, output []
    response.output_item.added                   the message item, status in_progress
    response.content_part.added                  an empty output_text part
    response.output_text.delta * chunks          "tok0 ", "tok1 ", ...
    response.output_text.done                    the whole text
    response.content_part.done, response.output_item.done
    response.completed                           the whole Response, usage output = chunks

It is flushed as the chat stream is, ``chunks + 1`` writes: the four opening events ride
with the first delta, one delta per write, and the four closing events are the last write
(in place of ``[DONE]``).
"""

from __future__ import annotations

import functools
import json
from typing import Any

CREATED = 1_700_000_000
TEXT = "Hello from the bench upstream."
RESPONSE_ID = "resp_bench"
ITEM_ID = "msg_bench"

JSON = dict[str, Any]


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _event(seq: int, type_: str, **fields: Any) -> bytes:
    data = {"type": type_, "sequence_number": seq, **fields}
    return b"event: " + type_.encode() + b"\ndata: " + _dumps(data) + b"\n\n"


def _part(text: str) -> JSON:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(status: str, text: str | None) -> JSON:
    content = [] if text is None else [_part(text)]
    return {
        "id": ITEM_ID,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": content,
    }


def _usage(output_tokens: int) -> JSON:
    return {
        "input_tokens": 9,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": 9 + output_tokens,
    }


def _response(model: str, status: str, output: list[JSON], usage: JSON | None) -> JSON:
    """A Response object in OpenAI's key order (the settings a plain request gets)."""
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": None,
        "max_output_tokens": None,
        "model": model,
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": None,
        "reasoning": {"effort": None, "summary": None},
        "store": False,
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
        "metadata": {},
    }


@functools.lru_cache(maxsize=64)
def response_body(model: str) -> bytes:
    """The whole answer to a non-stream ``POST /v1/responses``."""
    return _dumps(_response(model, "completed", [_item("completed", TEXT)], _usage(6)))


@functools.lru_cache(maxsize=256)
def response_events(model: str, chunks: int) -> tuple[bytes, ...]:
    """``chunks + 1`` writes (see the module docstring); ``chunks`` >= 1."""
    where = {"item_id": ITEM_ID, "output_index": 0, "content_index": 0}
    texts = [f"tok{i} " for i in range(chunks)]
    text = "".join(texts)
    started = _response(model, "in_progress", [], None)
    opening = (
        _event(0, "response.created", response=started)
        + _event(1, "response.in_progress", response=started)
        + _event(2, "response.output_item.added", output_index=0, item=_item("in_progress", None))
        + _event(3, "response.content_part.added", **where, part=_part(""))
    )
    seq = 4
    deltas = []
    for piece in texts:
        deltas.append(_event(seq, "response.output_text.delta", **where, delta=piece, logprobs=[]))
        seq += 1
    done = _item("completed", text)
    completed = _response(model, "completed", [done], _usage(chunks))
    closing = (
        _event(seq, "response.output_text.done", **where, text=text, logprobs=[])
        + _event(seq + 1, "response.content_part.done", **where, part=_part(text))
        + _event(seq + 2, "response.output_item.done", output_index=0, item=done)
        + _event(seq + 3, "response.completed", response=completed)
    )
    return (opening + deltas[0], *deltas[1:], closing)
