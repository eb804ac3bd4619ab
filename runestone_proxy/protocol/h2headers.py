"""HTTP/2 request header blocks: a one-pass check for the common well-formed block. No I/O.

h2 validates every inbound header block (RFC 9113 §8.2, §8.3) through seven chained
generators, one of which walks every byte of every name and value in Python: about a fifth
of what h2 costs per request on the non-stream bench. The connection turns that off
(``H2Configuration(validate_inbound_headers=False)``) and calls :func:`check_request`
instead, which answers in two steps:

1. :func:`is_plain_request`, one pass with C-level byte checks, vouches for the block every
   client sends: ``:method`` (not CONNECT), ``:scheme``, ``:path`` (not empty) and at most
   one ``:authority``, each once and all before the regular fields; regular names of
   lower-case token characters (RFC 9110 §5.6.2), none connection-specific (§8.2.2),
   ``te`` only as ``trailers``; values with no NUL, CR or LF and no leading or trailing
   space or tab (§8.2.1); ``:authority`` or ``host``, at most one ``host``, equal to
   ``:authority`` when both are there (§8.3.1). It is stricter than h2 (a name with ``"``
   in it is legal but not plain), never looser.
2. Anything it does not vouch for goes to h2's own ``validate_headers``, so a malformed
   block gets exactly the verdict it got before: :class:`h2.exceptions.ProtocolError`,
   which the connection answers with GOAWAY(PROTOCOL_ERROR), as h2 itself did.

Trailers are rare; :func:`check_trailers` always asks h2.

Outbound, :class:`LiteralEncoder` is hpack's encoder with Huffman coding off.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from h2.utilities import HeaderValidationFlags, validate_headers
from hpack import Encoder

__all__ = ["LiteralEncoder", "check_request", "check_trailers", "is_plain_request"]

_REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
_TRAILER = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)
#: RFC 9110 §5.6.2 token characters, upper case left out (RFC 9113 §8.2.1).
_NAME = re.compile(rb"[a-z0-9!#$%&'*+\-.^_`|~]+")
#: RFC 9113 §8.2.1: no NUL, CR or LF; no space or tab at either end. Empty is allowed.
_VALUE = re.compile(rb"(?:[^\x00\n\r\t ](?:[^\x00\n\r]*[^\x00\n\r\t ])?)?")
#: RFC 9113 §8.2.2, and ``te`` (allowed only as "trailers", so left to h2).
_NOT_PLAIN = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)
_PSEUDO = frozenset({b":method", b":scheme", b":path", b":authority"})
_REQUIRED = 3  # :method, :scheme and :path


def is_plain_request(headers: Sequence[tuple[bytes, bytes]]) -> bool:
    """True when ``headers`` is a request block h2 surely accepts (see the module doc)."""
    seen: set[bytes] = set()
    authority: bytes | None = None
    host: bytes | None = None
    regular = False
    name_ok, value_ok = _NAME.fullmatch, _VALUE.fullmatch
    for name, value in headers:
        if value_ok(value) is None:
            return False
        if name[:1] == b":":
            if regular or name in seen or name not in _PSEUDO:
                return False
            seen.add(name)
            if name == b":authority":
                authority = value
            elif not value or (name == b":method" and value == b"CONNECT"):
                return False  # an empty :path (or :method, :scheme), or CONNECT
            continue
        regular = True
        if name_ok(name) is None or name in _NOT_PLAIN:
            return False
        if name == b"host":
            if host is not None:
                return False
            host = value
    if len(seen) - (authority is not None) != _REQUIRED:
        return False
    if authority is None:
        return host is not None
    return host is None or host == authority


def check_request(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Raise ``h2.exceptions.ProtocolError`` if h2 would have rejected this request block."""
    if not is_plain_request(headers):
        for _ in validate_headers(headers, _REQUEST):
            pass


def check_trailers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Raise ``h2.exceptions.ProtocolError`` if h2 would have rejected these trailers."""
    for _ in validate_headers(headers, _TRAILER):
        pass


class LiteralEncoder(Encoder):
    """hpack's encoder, sending literal values without Huffman coding.

    Huffman coding is the encoder's choice, per string (RFC 7541 §5.2), and hpack codes in
    a Python loop per byte. The fields a response repeats are indexed after their first
    use and cost one byte either way; what is left literal is what changes per response
    (the request id, the length), where coding saves about seven bytes a response and
    costs about as much CPU as encoding all the rest of the block.
    """

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        return super().encode(headers, huffman=False)
