"""Anthropic Messages SSE frames. No I/O.

Owns the one shape every stream payload in the Messages dialect has: a whole SSE frame,
``event: <type>\\ndata: <json>\\n\\n``, where ``<type>`` is the JSON's ``"type"``
(https://docs.anthropic.com/en/docs/build-with-claude/streaming: "Each server-sent event
includes a named event type and associated JSON data"). The relay writes these bytes as they
are. Compact JSON never holds a raw newline (one inside a string is escaped), so one
``data:`` line always carries the whole object.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from runestone_proxy.providers.json_codec import dumps

__all__ = ["PING", "frame", "frame_obj"]


#: ``event: <name>\\ndata: `` for the event names Anthropic documents, encoded once.
_PREFIXES: Final[dict[str, bytes]] = {
    name: b"event: " + name.encode() + b"\ndata: "
    for name in (
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
        "ping",
        "error",
    )
}


def frame(event_type: str, data: bytes) -> bytes:
    """``event: <event_type>\\ndata: <data>\\n\\n``. ``data`` is normally one line of JSON;
    a multi-line one (an upstream event passed on) keeps one ``data:`` field per line."""
    prefix = _PREFIXES.get(event_type) or b"event: " + event_type.encode() + b"\ndata: "
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return prefix + data + b"\n\n"


def frame_obj(obj: Mapping[str, Any]) -> bytes:
    """``obj`` as compact JSON in a frame named by its ``"type"``."""
    return frame(obj["type"], dumps(obj))


#: The keep-alive event Anthropic interleaves ("Event streams may also include any number of
#: ping events").
PING: Final = frame_obj({"type": "ping"})
