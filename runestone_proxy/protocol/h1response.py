"""An upstream's HTTP/1.1 response head and Content-Length body, read without h11. No I/O.

The upstream pool reads every response through here first: :func:`parse_response_head`
turns the bytes received so far into a :class:`ResponseHead`, asks for more (None), or
declines with :class:`Unusual`, and the pool then hands the same bytes to h11, which
parses the message or refuses it with its own error. :class:`LengthDecoder` reads a
``Content-Length`` body; :class:`~.chunked.ChunkedDecoder` a chunked one. Why: on the
non-stream path h11's generic machinery (a receive buffer, a reader per state, event
objects, header normalisation, the state machine's bookkeeping) was about a tenth of the
gateway's CPU per request; a typical head is one ``find``, two regex calls and a list.

**The rule** (held by property tests against h11, on generated heads cut at every byte):
the fast parser accepts a strict subset of what h11 accepts, and what it accepts it reads
exactly as h11 does (status, header names lower-cased, values without their surrounding
whitespace, the body's framing, whether the connection stays open); while it asks for
more bytes, h11 would too. Everything else is :class:`Unusual`, and h11 decides:

* not ``HTTP/1.1`` (1.0 closes by default: h11 knows), a status outside 200-599, 1xx
  (informational heads before the final one, 101 upgrades: RFC 9110 §15.2), and 204/304
  (no body whatever the fields say, RFC 9112 §6.3);
* a byte h11 would read leniently: a bare LF, obs-fold (RFC 9112 §5.2), obs-text or a
  control character in a value (§5.5), a head longer than ``max_head_bytes``;
* framing that is not plain (RFC 9112 §6.3): no Content-Length and no Transfer-Encoding
  (the body runs to EOF), both at once, either one twice or as a list, a transfer coding
  other than ``chunked`` spelled in lower case, a length of more than 18 digits.

The caller picks the requests this is used for: not HEAD or CONNECT, whose responses are
framed by the request (RFC 9112 §6.3 rules 1 and 2).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple, Protocol

__all__ = [
    "CHUNKED",
    "FRAMED_BY_REQUEST",
    "LENGTH",
    "BodyDecoder",
    "LengthDecoder",
    "ResponseHead",
    "Unusual",
    "parse_response_head",
]

#: RFC 9112 §4 status-line, strictly: HTTP/1.1, a final status, a reason of visible ASCII.
_STATUS_LINE: Final = re.compile(rb"HTTP/1\.1 ([2-5][0-9][0-9])(?: [\t\x20-\x7e]*)?")
#: RFC 9112 §5 field-line with its CRLF: ``token ":" OWS field-value OWS``, the value
#: visible ASCII with inner spaces and tabs (no obs-text, no controls: h11 takes those).
#: Written so that no two ways of matching a line exist (no backtracking blow-up).
_NAME: Final = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_VALUE: Final = rb"[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*"
_FIELD_LINE: Final = re.compile(rb"(%b):[ \t]*(%b)?[ \t]*\r\n" % (_NAME, _VALUE))
#: The whole field section, to check it in one call before :data:`_FIELD_LINE` splits it.
_FIELD_SECTION: Final = re.compile(rb"(?:%b:[ \t]*(?:%b)?[ \t]*\r\n)*" % (_NAME, _VALUE))
#: Content-Length (RFC 9110 §8.6): digits; 18 of them fit any length we could read.
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")

CHUNKED: Final = "chunked"
LENGTH: Final = "length"
#: Methods whose response's framing the request decides (RFC 9112 §6.3 rules 1 and 2):
#: the caller leaves their responses to h11.
FRAMED_BY_REQUEST: Final = frozenset({"HEAD", "CONNECT"})


class ResponseHead(NamedTuple):
    """A final response head as h11 would have read it (a tuple: cheap to build, frozen)."""

    status: int
    #: (name lower-cased, value without surrounding whitespace), in order.
    headers: list[tuple[bytes, bytes]]
    #: :data:`CHUNKED` or :data:`LENGTH`.
    framing: str
    #: The Content-Length (0 when chunked).
    length: int
    #: Neither side said ``Connection: close`` (we never do; RFC 9112 §9.6).
    keep_alive: bool
    #: Bytes of the buffer the head took, its blank line included: the body starts here.
    size: int


class Unusual(NamedTuple):
    """The head is not one :func:`parse_response_head` reads: h11 gets the bytes."""

    reason: str


def parse_response_head(buf: bytes, max_head_bytes: int) -> ResponseHead | Unusual | None:
    """The response head at the start of ``buf``, None if more bytes are needed, or
    :class:`Unusual` (see the module docstring for the rule)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return incomplete(buf, max_head_bytes)
    if end + 4 > max_head_bytes:
        return Unusual("head too long")
    line_end = buf.find(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(buf, 0, line_end)
    if status_line is None:
        return Unusual("not an HTTP/1.1 final status line")
    status = int(status_line[1])
    if status == 204 or status == 304:
        return Unusual("no body by its status")
    headers = parse_fields(buf[line_end + 2 : end + 2])
    if headers is None:
        return Unusual("not a plain field section")
    framing = None
    length = 0
    keep_alive = True
    for name, value in headers:
        if name == b"content-length":
            if framing is not None or _LENGTH.fullmatch(value) is None:
                return Unusual("not a plain Content-Length")
            framing, length = LENGTH, int(value)
        elif name == b"transfer-encoding":
            if framing is not None or value != b"chunked":
                return Unusual("not a plain Transfer-Encoding")
            framing = CHUNKED
        elif name == b"connection" and b"close" in tokens(value):
            keep_alive = False
    if framing is None:
        return Unusual("a body delimited by the connection's end")
    return ResponseHead(status, headers, framing, length, keep_alive, end + 4)


def incomplete(buf: bytes, max_head_bytes: int) -> Unusual | None:
    """For a buffer with no CRLF CRLF yet: None (wait) where h11 would wait too, else
    :class:`Unusual`. h11's blank line (``\\n\\r?\\n``) allows a bare LF, a first byte
    below "!" is an error to it at once, and its buffer has a bound."""
    if len(buf) > max_head_bytes or b"\n\n" in buf or b"\n\r\n" in buf:
        return Unusual("not a plain head")
    if buf and buf[0] < 0x21:
        return Unusual("not a start line")
    return None


def parse_fields(section: bytes) -> list[tuple[bytes, bytes]] | None:
    """A field section, each line with its CRLF, as h11 reads it (names lower-cased,
    values without their surrounding whitespace), or None if a line is not plain."""
    if _FIELD_SECTION.fullmatch(section) is None:
        return None
    return [(name.lower(), value) for name, value in _FIELD_LINE.findall(section)]


def tokens(value: bytes) -> list[bytes]:
    """A comma-separated list's members, lower-cased (how h11 reads ``Connection``)."""
    return [token.strip().lower() for token in value.split(b",")]


class BodyDecoder(Protocol):
    """What the pool reads a body with: :class:`LengthDecoder` or ``ChunkedDecoder``."""

    done: bool
    extra: bytes
    chunks: int

    def feed(self, data: bytes) -> bytes:
        """The body bytes ``data`` completes; bytes past the end go to :attr:`extra`."""
        ...

    def missing(self) -> str:
        """What an EOF now cuts short, in h11's words."""
        ...


class LengthDecoder:
    """A body of ``length`` bytes (RFC 9112 §6.2): ``feed`` hands data out as it comes;
    :attr:`done` at the last byte; bytes past it are kept in :attr:`extra` (a peer that
    wrote past the end: the pool closes such a connection rather than reuse it)."""

    __slots__ = ("_left", "chunks", "done", "extra", "length")

    def __init__(self, length: int) -> None:
        self.length = length
        self._left = length
        self.done = not length
        self.extra = b""
        #: 1 when the last feed carried body bytes (the ``ChunkedDecoder`` interface).
        self.chunks = 0

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra += data
            return b""
        left = self._left
        self.chunks = 1 if data else 0
        if len(data) < left:
            self._left = left - len(data)
            return data
        self._left = 0
        self.done = True
        if len(data) > left:
            self.extra = data[left:]
            return data[:left]
        return data

    def missing(self) -> str:
        return f"received {self.length - self._left} bytes, expected {self.length}"
