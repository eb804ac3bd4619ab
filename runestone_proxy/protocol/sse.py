"""Server-sent events (text/event-stream): an incremental parser and an encoder. No I/O.

Owns the SSE framing on both sides of the gateway: :class:`SSEParser` turns upstream bytes,
cut anywhere, into :class:`SSEEvent` values; :func:`encode_data`, :func:`encode_comment`,
:func:`encode_event` and :data:`DONE` frame what the relay writes to clients.

Implements the WHATWG HTML Living Standard, §9.2.6 "Interpreting an event stream"
(https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation).

How the parser works:

* It works on bytes, never on decoded text: every byte the grammar cares about (CR, LF,
  ``:``, space) is ASCII, and UTF-8 never uses ASCII bytes inside a multibyte sequence, so a
  character split across two feeds is harmless. Field values are decoded only where the
  event carries them as ``str`` (``event``, ``id``).
* The hot path is one canonical event per feed (``data: {...}\\n\\n``, as OpenAI-format
  streams send every chunk) with nothing pending: a few C-level byte checks recognise it and
  it becomes an event without splitting lines.
* Lines end with CRLF, LF or CR (spec: "end-of-line"). ``bytes.splitlines`` breaks at exactly
  those three, in C, so any other feed costs one ``splitlines`` and a ``startswith`` per
  line. A CR that ends one feed may be the first half of a CRLF, so the parser remembers it
  and drops one LF at the start of the next feed.
* An unterminated line is kept as the "tail" until its end-of-line arrives. While a feed
  brings no line end at all, bytes are appended to a ``bytearray`` without rescanning, so a
  large event fed in small pieces costs linear time.
* A blank line dispatches. Per spec an event whose data buffer is empty is not dispatched,
  but ``id:`` still updates :attr:`SSEParser.last_event_id` ("id-only" blocks).
* At EOF (:meth:`SSEParser.close`) an incomplete event is discarded, as the spec says; the
  parser records that in :attr:`SSEParser.truncated` so a cut stream can be told from a
  finished one.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import attrs

__all__ = [
    "DONE",
    "SSEError",
    "SSEEvent",
    "SSEParser",
    "encode_comment",
    "encode_data",
    "encode_event",
]

_BOM = b"\xef\xbb\xbf"  # U+FEFF in UTF-8; spec: "One leading U+FEFF BYTE ORDER MARK ... ignored"
_LINE_ENDS = (b"\r\n", b"\n", b"\r")
_NEWLINE = re.compile(rb"\r\n|\r|\n")
#: ``SSEEvent``'s constructor without the generated ``__new__``'s Python frame (hot path).
_new_event = tuple.__new__

#: The OpenAI stream terminator, framed.
DONE = b"data: [DONE]\n\n"


class SSEError(ValueError):
    """The stream broke the parser's limits (an event larger than ``max_event_bytes``)."""


class SSEEvent(NamedTuple):
    """One dispatched event. ``data`` is the joined ``data:`` lines (bytes, UTF-8).

    A named tuple rather than ``attrs.frozen``: one is made per relayed chunk, and a frozen
    attrs class sets each field through ``object.__setattr__`` (about four times the cost
    of a tuple). It is as immutable, and compares equal to an equal event."""

    data: bytes
    event: str = "message"
    #: The stream's last event ID when this event was dispatched (spec: ``lastEventId``);
    #: None while no ``id:`` field has set one (or after ``id:`` with an empty value).
    id: str | None = None
    #: The ``retry:`` value (milliseconds) given inside this event's block, if any.
    retry: int | None = None


@attrs.define
class SSEParser:
    """Incremental text/event-stream parser: ``feed(bytes) -> [SSEEvent]``, ``close()`` at EOF.

    Accepts any chunking of the stream. Raises :class:`SSEError` when one event (its data
    buffer plus the line being read) grows past ``max_event_bytes``; the gateway sets it to
    ``upstream.max_response_bytes`` (providers send multi-MiB events: one long content delta,
    a big tool-call argument). The parser holds one event, so memory stays within a small
    multiple of the cap (the pending line, then its copy as a data value).
    """

    max_event_bytes: int = 1024 * 1024
    #: Comment lines seen (``:`` keep-alives such as OpenRouter's ``: OPENROUTER PROCESSING``).
    comments: int = attrs.field(default=0, init=False)
    #: The last event ID buffer (spec); persists across events.
    last_event_id: str | None = attrs.field(default=None, init=False)
    #: The latest reconnection time from a ``retry:`` field, in milliseconds.
    retry: int | None = attrs.field(default=None, init=False)
    #: Set by :meth:`close` when the stream ended inside an event (that event is discarded).
    truncated: bool = attrs.field(default=False, init=False)
    closed: bool = attrs.field(default=False, init=False)

    _tail: bytearray = attrs.field(factory=bytearray, init=False, repr=False)
    _data: list[bytes] = attrs.field(factory=list, init=False, repr=False)
    _data_bytes: int = attrs.field(default=0, init=False, repr=False)
    _event_type: bytes = attrs.field(default=b"", init=False, repr=False)
    _block_retry: int | None = attrs.field(default=None, init=False, repr=False)
    _skip_lf: bool = attrs.field(default=False, init=False, repr=False)
    #: Bytes held at stream start until we know whether they begin with a BOM.
    _head: bytes | None = attrs.field(default=b"", init=False, repr=False)

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Parse the next piece of the stream; return the events it completed."""
        if self.closed:
            raise SSEError("feed() after close()")
        if self._head is not None:
            data = self._strip_bom(data)
        if self._skip_lf and data:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
        if not data:
            return []
        if (
            data[:6] == b"data: "
            and data[-2:] == b"\n\n"
            and data.count(b"\n") == 2
            and b"\r" not in data
            and not self._tail
            and not self._data
            and not self._event_type
            and self._block_retry is None
            and len(data) <= self.max_event_bytes
        ):
            # The canonical event in one feed (an OpenAI-format stream's every chunk), with
            # nothing pending: one ``data:`` line and the blank line that dispatches it.
            return [_new_event(SSEEvent, (data[6:-2], "message", self.last_event_id, None))]

        events: list[SSEEvent] = []
        if self._tail:
            # Complete the pending line first, without rescanning what we already hold.
            end = _first_line_end(data)
            if end < 0:
                self._tail += data
                self._check_size()
                return events
            self._tail += data[:end]
            line = bytes(self._tail)
            self._tail.clear()
            if data[end] == 0x0D:  # CR: maybe the first half of CRLF
                if end + 1 == len(data):
                    self._skip_lf = True
                elif data[end + 1] == 0x0A:
                    end += 1
            data = data[end + 1 :]
            self._line(line, events)
            if not data:
                return events

        lines = data.splitlines(keepends=True)
        last = lines[-1]
        if not last.endswith(_LINE_ENDS):
            self._tail += lines.pop()
        self._skip_lf = data[-1:] == b"\r"
        for raw in lines:
            if raw[-2:] == b"\r\n":
                self._line(raw[:-2], events)
            else:
                self._line(raw[:-1], events)
        self._check_size()
        return events

    def close(self) -> list[SSEEvent]:
        """The stream ended. Per spec a pending, undispatched event is discarded: this returns
        ``[]`` and sets :attr:`truncated` if such an event (or a partial line) was pending."""
        if not self.closed:
            self.closed = True
            partial = bytes(self._tail) or (self._head or b"")
            # A partial comment line is no loss; a partial field line or pending data is.
            self.truncated = bool(self._data) or (bool(partial) and not partial.startswith(b":"))
            self._tail.clear()
            self._data.clear()
            self._head = None
        return []

    # -- internals --------------------------------------------------------------------------

    def _strip_bom(self, data: bytes) -> bytes:
        assert self._head is not None
        head = self._head + data
        if len(head) < len(_BOM) and _BOM.startswith(head):
            self._head = head  # still undecided: wait for more bytes
            return b""
        self._head = None
        return head[len(_BOM) :] if head.startswith(_BOM) else head

    def _check_size(self) -> None:
        if self._data_bytes + len(self._tail) > self.max_event_bytes:
            raise SSEError(f"SSE event larger than {self.max_event_bytes} bytes")

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        # Spec order: blank line -> dispatch; ':' first -> comment; else split at first ':'.
        if line.startswith(b"data:"):
            value = line[6:] if line[5:6] == b" " else line[5:]
            self._data.append(value)
            self._data_bytes += len(value) + 1
            if self._data_bytes > self.max_event_bytes:
                raise SSEError(f"SSE event larger than {self.max_event_bytes} bytes")
            return
        if not line:
            self._dispatch(events)
            return
        if line[0] == 0x3A:  # ':'
            self.comments += 1
            return
        colon = line.find(b":")
        if colon < 0:
            field, value = line, b""
        else:
            field = line[:colon]
            value = line[colon + 1 :]
            if value[:1] == b" ":
                value = value[1:]
        if field == b"data":  # "data" with no colon: an empty data line
            self._data.append(value)
            self._data_bytes += 1
        elif field == b"event":
            self._event_type = value
        elif field == b"id":
            # Spec: "If the field value does not contain U+0000 NULL, then set the last
            # event ID buffer to the field value. Otherwise, ignore the field."
            if b"\x00" not in value:
                self.last_event_id = value.decode("utf-8", "replace") or None
        elif field == b"retry":
            # Spec: only ASCII digits; otherwise ignore the field.
            if value and value.isdigit():
                self.retry = self._block_retry = int(value)
        # Any other field name is ignored (spec).

    def _dispatch(self, events: list[SSEEvent]) -> None:
        if self._data:
            events.append(
                SSEEvent(
                    data=b"\n".join(self._data),
                    event=self._event_type.decode("utf-8", "replace") or "message",
                    id=self.last_event_id,
                    retry=self._block_retry,
                )
            )
            self._data = []
            self._data_bytes = 0
        self._event_type = b""
        self._block_retry = None


def _first_line_end(data: bytes) -> int:
    """Index of the first CR or LF in ``data``, or -1."""
    cr = data.find(b"\r")
    lf = data.find(b"\n")
    if cr < 0:
        return lf
    if lf < 0:
        return cr
    return min(cr, lf)


def encode_data(payload: bytes) -> bytes:
    """Frame one event carrying ``payload``: ``data: <payload>\\n\\n``.

    A payload with line breaks becomes several ``data:`` lines; a spec parser joins them back
    with LF (so CR and CRLF inside a payload come back as LF).
    """
    if b"\n" not in payload and b"\r" not in payload:
        return b"data: " + payload + b"\n\n"
    return b"".join(b"data: " + part + b"\n" for part in _NEWLINE.split(payload)) + b"\n"


def encode_comment(text: str) -> bytes:
    """Frame a comment (a keep-alive clients must ignore): ``: <text>\\n\\n``."""
    raw = text.encode("utf-8")
    return b"".join(b": " + part + b"\n" for part in _NEWLINE.split(raw)) + b"\n"


def encode_event(event: SSEEvent) -> bytes:
    """Frame a whole :class:`SSEEvent`, with ``event:``/``id:``/``retry:`` lines as needed."""
    head = b""
    if event.event != "message":
        head += b"event: " + _one_line(event.event) + b"\n"
    if event.id is not None:
        head += b"id: " + _one_line(event.id) + b"\n"
    if event.retry is not None:
        head += b"retry: " + str(event.retry).encode() + b"\n"
    return head + encode_data(event.data)


def _one_line(value: str) -> bytes:
    raw = value.encode("utf-8")
    if _NEWLINE.search(raw) or b"\x00" in raw:
        raise ValueError(f"SSE field value must be one line without NUL: {value!r}")
    return raw
