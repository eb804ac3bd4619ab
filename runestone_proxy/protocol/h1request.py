"""A client's HTTP/1.1 request head, read without h11 when it is plain. No I/O.

The listener (:mod:`runestone_proxy.server.h1conn`) reads every request through here
first: :func:`parse_request_head` turns the bytes received so far into a
:class:`RequestHead`, asks for more (None), or declines with
:class:`~.h1response.Unusual`, and the connection then hands the same bytes to h11, which
parses the request (and streams its body) or refuses it with its own error. Why: h11's
per-request machinery (its receive buffer, reader, event objects, header normalisation,
state machine, and a fresh ``h11.Connection`` per request) was about a seventh of the
gateway's CPU per request; a plain head here is one ``find``, two regex calls and a list.

**The rule** is :mod:`.h1response`'s (held by property tests against h11, on generated
requests cut at every byte): a strict subset of what h11 accepts, read exactly as h11
reads it; while it waits, h11 would too. What it accepts besides the field rules:

* the request line ``token SP target SP HTTP/1.1`` (RFC 9112 §3), the target visible
  ASCII; not ``CONNECT`` (a tunnel: h11 switches protocols);
* exactly one ``Host`` (RFC 9112 §3.2; h11 refuses none or several);
* at most one Content-Length, a plain number; no Transfer-Encoding (a chunked body is
  streamed through h11); no ``Expect`` (100-continue is h11's to answer, RFC 9110
  §10.1.1) and no ``Upgrade`` (h11 holds the connection for a switch, RFC 9110 §7.8).

Whether the body is all here, so that the request can be served without h11, is the
caller's question (:attr:`RequestHead.size` + :attr:`RequestHead.length`).
"""

from __future__ import annotations

import re
from typing import Final, NamedTuple

from runestone_proxy.protocol.h1response import Unusual, incomplete, parse_fields, tokens

__all__ = ["RequestHead", "parse_request_head"]

#: RFC 9112 §3 request-line, strictly: a method token, a visible-ASCII target, HTTP/1.1.
_REQUEST_LINE: Final = re.compile(rb"([-!#$%&'*+.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+) HTTP/1\.1")
#: Content-Length (RFC 9110 §8.6): digits; 18 of them fit any length we could take.
_LENGTH: Final = re.compile(rb"[0-9]{1,18}")
#: Fields that hand the request to h11 (see the module docstring).
_H11_FIELDS: Final = frozenset({b"transfer-encoding", b"expect", b"upgrade"})


class RequestHead(NamedTuple):
    """A request head as h11 would have read it (a tuple: cheap to build, frozen)."""

    method: bytes
    target: bytes
    #: (name lower-cased, value without surrounding whitespace), in order.
    headers: list[tuple[bytes, bytes]]
    #: The Content-Length (0 without one, RFC 9112 §6.3 rule 6).
    length: int
    #: The client did not say ``Connection: close`` (RFC 9112 §9.6).
    keep_alive: bool
    #: Bytes of the buffer the head took, its blank line included: the body starts here.
    size: int


def parse_request_head(buf: bytes, max_head_bytes: int) -> RequestHead | Unusual | None:
    """The request head at the start of ``buf``, None if more bytes are needed, or
    :class:`~.h1response.Unusual` (see the module docstring for the rule)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return incomplete(buf, max_head_bytes)
    if end + 4 > max_head_bytes:
        return Unusual("head too long")
    line_end = buf.find(b"\r\n")
    line = _REQUEST_LINE.fullmatch(buf, 0, line_end)
    if line is None:
        return Unusual("not an HTTP/1.1 request line")
    method = line[1]
    if method == b"CONNECT":
        return Unusual("CONNECT")
    headers = parse_fields(buf[line_end + 2 : end + 2])
    if headers is None:
        return Unusual("not a plain field section")
    hosts = 0
    length: int | None = None
    keep_alive = True
    for name, value in headers:
        if name == b"host":
            hosts += 1
        elif name == b"content-length":
            if length is not None or _LENGTH.fullmatch(value) is None:
                return Unusual("not a plain Content-Length")
            length = int(value)
        elif name in _H11_FIELDS:
            return Unusual(f"{name.decode()} is h11's")
        elif name == b"connection" and b"close" in tokens(value):
            keep_alive = False
    if hosts != 1:
        return Unusual("not one Host")
    return RequestHead(method, line[2], headers, length or 0, keep_alive, end + 4)
