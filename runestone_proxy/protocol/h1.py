"""HTTP/1.1 pieces both sides share, with no I/O: head writing, head checks, the phase table.

h11 parses the listener's requests and the upstream responses :mod:`.h1response` declines;
the common upstream response is read by :mod:`.h1response` (head, Content-Length body) and
:mod:`.chunked` (a chunked body). What lives here is what we do *beside* h11 for speed, and
the decisions the connection code acts on, each a plain function over bytes and values:

* **Head writing** (RFC 9112 §2.1, §3, §4, §5): :func:`response_head` (the listener) and
  :func:`request_head` (the upstream pool) write a head without h11's serialiser, which
  validates every header of every event twice. Our fields are constants, the configured key,
  or values h11 already parsed and validated, so the check left to make is that no CR or LF
  hides inside a value (one CRLF per line, counted) and, in a request target, no space.
  Either returns None where h11 must write the head itself (and name what is wrong).
* **Framing** (RFC 9112 §6, §7.1): which fields the writer owns (:data:`FRAMING_HEADERS`),
  which methods carry content, the last chunk of a chunked body. A chunk itself is framed
  inline where it is sent (``b"%x\\r\\n%b\\r\\n"``): it runs per SSE chunk, and a call
  there would cost more than the formatting.
* **Head checks** (RFC 9112 §3, §5, §6.3): :func:`check_request_head` holds a parsed
  request head to the configured limits and refuses Content-Length with Transfer-Encoding;
  :func:`request_error` maps h11's parse errors to the answer the client gets.
* **The connection phase** (:class:`Phase`, :data:`TRANSITIONS`): where a server
  connection is between requests, which decides what its one cancel scope firing means.
  The table is the spec; the connection assigns the phases as constants (a table lookup per
  request would cost more than it says), and a test holds every transition it makes to the
  table.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Final

import h11

from runestone_proxy import errors
from runestone_proxy.config import LimitsConfig

Headers = Sequence[tuple[bytes, bytes]]

#: Reason phrases by status, as h11 writes them.
REASONS: Final[Mapping[int, bytes]] = {s.value: s.phrase.encode() for s in HTTPStatus}
#: RFC 9112 §4 status lines as h11 writes them, for the heads we write ourselves.
STATUS_LINES: Final[Mapping[int, bytes]] = {
    code: b"HTTP/1.1 %d %b\r\n" % (code, reason) for code, reason in REASONS.items()
}
#: Statuses whose framing h11 treats specially (RFC 9112 §6.3: no body): h11 writes them.
BODYLESS: Final = frozenset({204, 304})
#: The last chunk of a chunked body, with no trailers (RFC 9112 §7.1).
LAST_CHUNK: Final = b"0\r\n\r\n"
#: RFC 9112 §9.6: the field that says this response is the connection's last.
CLOSE: Final = (b"connection", b"close")
#: The writer owns framing and Host (RFC 9112 §6, §3.2); callers' copies are dropped.
FRAMING_HEADERS: Final = frozenset(
    {b"host", b"content-length", b"transfer-encoding", b"connection"}
)
#: Methods whose request always states a length, even zero (RFC 9110 §8.6).
WITH_CONTENT: Final = frozenset({"POST", "PUT", "PATCH"})


# --- head writing -----------------------------------------------------------------------------


def response_head(
    status: int, headers: Headers, request_id: str, framing: bytes, closes: bool
) -> bytes | None:
    """A response head (RFC 9112 §4, §5) ending in its blank line: the status line, the
    handler's ``headers``, ``x-request-id``, the ``framing`` line (``content-length: N`` or
    ``transfer-encoding: chunked``, with its CRLF) and ``connection: close`` when ``closes``.

    None where h11 must write it: 1xx, 204 and 304 (framing rules of their own), or a value
    with a CR or LF in it, which h11 then refuses."""
    if status < 200 or status in BODYLESS:
        return None
    parts = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    parts += [b"%b: %b\r\n" % pair for pair in headers]
    parts.append(b"x-request-id: %b\r\n%b" % (request_id.encode(), framing))
    if closes:
        parts.append(b"connection: close\r\n")
    head = b"".join(parts)
    # Each header line ends in exactly one CRLF: no CR or LF hides inside a value.
    lines = len(parts) + 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        return None
    return head + b"\r\n"


def request_head(
    method: str, target: bytes, host: bytes, headers: Headers, length: int
) -> bytes | None:
    """A request head for a bytes body of ``length`` (RFC 9112 §3, §3.2, §6.2), or None
    when a field would not make a valid head (h11 then builds it, and says what is wrong).

    The caller's framing fields and Host are dropped (:data:`FRAMING_HEADERS`); a CR/LF
    count (one per line) and a space-free target (§3.2: the target is one token) are the
    checks left to make."""
    parts = [b"%b %b HTTP/1.1\r\nhost: %b\r\n" % (method.encode("ascii"), target, host)]
    if length or method in WITH_CONTENT:  # RFC 9110 §8.6: none for a GET without content
        parts.append(b"content-length: %d\r\n" % length)
    for name, value in headers:
        if name.lower() not in FRAMING_HEADERS:
            parts.append(b"%b: %b\r\n" % (name, value))
    head = b"".join(parts)
    lines = len(parts) + 1
    if head.count(b"\n") != lines or head.count(b"\r") != lines or b" " in target:
        return None
    return head + b"\r\n"


#: Per method, the request head h11's state machine is told we sent when we wrote the head
#: ourselves and h11 is to read the response (its bytes are dropped): with
#: ``Content-Length: 0`` and ``EndOfMessage`` our side is DONE, and h11 still knows the
#: method (a HEAD's response has no body, §6.3).
_SENT_REQUESTS: dict[str, h11.Request] = {}


def sent_request(method: str) -> h11.Request:
    """The stand-in ``h11.Request`` for a head :func:`request_head` wrote (cached)."""
    event = _SENT_REQUESTS.get(method)
    if event is None:
        event = _SENT_REQUESTS[method] = h11.Request(
            method=method, target=b"/", headers=[(b"host", b"sync"), (b"content-length", b"0")]
        )
    return event


# --- head checks ------------------------------------------------------------------------------


def check_request_head(
    target: bytes, headers: Headers, limits: LimitsConfig
) -> errors.GatewayError | None:
    """The error a parsed request head earns before any handler runs, or None.

    h11 bounds the head as a whole (``max_incomplete_event_size``); this holds the target to
    ``max_request_line_bytes`` (RFC 9112 §3: 414) and the fields to ``max_header_bytes``
    (431), refuses a body over ``max_body_bytes`` by its Content-Length (413), and both
    Content-Length and Transfer-Encoding (§6.3: how request smuggling starts)."""
    if len(target) > limits.max_request_line_bytes:
        return errors.URITooLong("Request URI too long.")
    size = 0
    content_length: bytes | None = None
    chunked = False
    for name, value in headers:
        size += len(name) + len(value) + 4
        if name == b"content-length":
            content_length = value
        elif name == b"transfer-encoding":
            chunked = True
    if size > limits.max_header_bytes:
        return errors.HeaderFieldsTooLarge("Request header fields too large.")
    if chunked and content_length is not None:
        return errors.BadRequest(
            "Both Content-Length and Transfer-Encoding were sent.", code="bad_request"
        )
    if content_length is not None and int(content_length) > limits.max_body_bytes:
        return too_large(limits)
    return None


def too_large(limits: LimitsConfig) -> errors.PayloadTooLarge:
    """413 for a body over ``max_body_bytes`` (by its length, or as it arrives)."""
    return errors.PayloadTooLarge(
        f"Request body exceeds the limit of {limits.max_body_bytes} bytes."
    )


def request_error(
    exc: h11.RemoteProtocolError, buffered: bytes | bytearray, limits: LimitsConfig
) -> errors.GatewayError:
    """The answer to a request h11 could not parse. Its 431 hint means the head outgrew
    h11's bound: a request line longer than ``max_request_line_bytes`` (no LF within it in
    ``buffered``) is 414 (RFC 9112 §3), otherwise 431; 501 is an unknown transfer coding
    (§6.1); anything else is 400."""
    if exc.error_status_hint == 431:
        if b"\n" not in buffered[: limits.max_request_line_bytes + 2]:
            return errors.URITooLong("Request line too long.")
        return errors.HeaderFieldsTooLarge("Request header fields too large.")
    if exc.error_status_hint == 501:
        return errors.GatewayError(f"Not implemented: {exc}.", code="not_implemented")
    return errors.BadRequest(f"Malformed HTTP request: {exc}.", code="bad_request")


# --- the connection phase ---------------------------------------------------------------------


class Phase(enum.Enum):
    """Where a server connection is, which decides what its one cancel scope firing means
    (see :data:`TIMEOUT_STATUS`) and what a write is bounded by."""

    #: Waiting for a request, nothing received: the keep-alive timeout runs; a drain may
    #: close the connection at once; a write (an early error) gets its own send timeout.
    IDLE = "idle"
    #: Part of a request head received: the header timeout runs, and firing answers 408.
    HEAD = "head"
    #: A handler runs: the scope is its cancel scope; a blocked write moves its deadline.
    BUSY = "busy"


class PhaseEvent(enum.Enum):
    """What moves a connection from one :class:`Phase` to the next."""

    #: A request's first wait for bytes finds none buffered (keep-alive wait).
    WAIT_EMPTY = "wait-empty"
    #: A request's first wait finds part of a head buffered (pipelined or sniffed bytes).
    WAIT_BUFFERED = "wait-buffered"
    #: Bytes arrive while idle, not yet a whole head.
    BYTES = "bytes"
    #: A whole request head is parsed.
    HEAD_DONE = "head-done"


#: The phase table: every transition a server connection may make, and nothing else. A
#: connection starts IDLE; it ends from any phase (EOF, an error answered, a timeout).
TRANSITIONS: Final[Mapping[tuple[Phase, PhaseEvent], Phase]] = {
    (Phase.IDLE, PhaseEvent.WAIT_EMPTY): Phase.IDLE,
    (Phase.IDLE, PhaseEvent.WAIT_BUFFERED): Phase.HEAD,
    (Phase.IDLE, PhaseEvent.BYTES): Phase.HEAD,
    (Phase.IDLE, PhaseEvent.HEAD_DONE): Phase.BUSY,
    (Phase.HEAD, PhaseEvent.HEAD_DONE): Phase.BUSY,
    (Phase.BUSY, PhaseEvent.WAIT_EMPTY): Phase.IDLE,
    (Phase.BUSY, PhaseEvent.WAIT_BUFFERED): Phase.HEAD,
    # A pipelined request already buffered (RFC 9112 §9.3.2) needs no wait.
    (Phase.BUSY, PhaseEvent.HEAD_DONE): Phase.BUSY,
}

#: What the connection scope firing answers, by phase: HEAD is a slow request head (408,
#: RFC 9110 §15.5.9); IDLE (keep-alive over, or a drain) and BUSY (client gone or not
#: reading) just close.
TIMEOUT_STATUS: Final[Mapping[Phase, int | None]] = {
    Phase.IDLE: None,
    Phase.HEAD: 408,
    Phase.BUSY: None,
}


def allowed(before: Phase, after: Phase) -> bool:
    """Whether the table lets a connection go from ``before`` to ``after`` (for tests and
    assertions; the connection itself assigns constants)."""
    return any(b is before and a is after for (b, _), a in TRANSITIONS.items())
