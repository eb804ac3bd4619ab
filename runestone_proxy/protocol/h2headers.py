"""HTTP/2 request header blocks: one pass checks the common well-formed block and splits it.
No I/O.

h2 validates every inbound header block (RFC 9113 §8.2, §8.3) through seven chained
generators, one of which walks every byte of every name and value in Python: about a fifth
of what h2 costs per request on the non-stream bench. The connection turns that off
(``H2Configuration(validate_inbound_headers=False)``) and calls :func:`read_request`
instead, which answers in one of two ways:

1. :func:`plain_request`, one pass with C-level byte checks, vouches for the block every
   client sends: ``:method`` (not CONNECT), ``:scheme``, ``:path`` (not empty) and at most
   one ``:authority``, each once and all before the regular fields; regular names of
   lower-case token characters (RFC 9110 §5.6.2), none connection-specific (§8.2.2),
   ``te`` only as ``trailers``; values with no NUL, CR or LF and no leading or trailing
   space or tab (§8.2.1); ``:authority`` or ``host``, at most one ``host``, equal to
   ``:authority`` when both are there (§8.3.1). It is stricter than h2 (a name with ``"``
   in it is legal but not plain), never looser. The same pass splits the block as the
   handler wants it (:data:`RequestHead`): a second walk over the fields, and a third and
   fourth for the length and the request id, cost more than the checks.
2. Anything it does not vouch for goes to h2's own ``validate_headers``, so a malformed
   block gets exactly the verdict it got before: :class:`h2.exceptions.ProtocolError`,
   which the connection answers with GOAWAY(PROTOCOL_ERROR), as h2 itself did; a legal
   one is then split by :func:`split_request`, to the same result.

A connection remembers the fields it already vouched for (``known``): its requests repeat
most of their fields, and a remembered one skips its byte checks, never the rules about
where it stands. Fields the pass must look at by name (``host``, ``cookie``,
``content-length``, ``x-request-id``) are never remembered.

Trailers are rare; :func:`check_trailers` always asks h2.

Outbound, :class:`LiteralEncoder` is hpack's encoder with Huffman coding off and a memory
of the fields it encoded while the dynamic table is unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from h2.utilities import HeaderValidationFlags, validate_headers
from hpack import Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.hpack import encode_integer

__all__ = [
    "LiteralEncoder",
    "RequestHead",
    "check_trailers",
    "is_plain_request",
    "plain_request",
    "read_request",
    "split_request",
]

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
#: Regular names the pass handles itself, never remembered in ``known``.
_NOTED = frozenset({b"host", b"cookie", b"content-length", b"x-request-id"})
#: Regular fields a connection remembers as vouched for, at most.
_MAX_KNOWN = 64
_MAX_KNOWN_BYTES = 256  # per field: a big cookie is checked every time, not held
#: RFC 7541 §6.1: the top bit of an indexed field's first byte.
_INDEXED = 0x80
#: RFC 7541 §5.1, a 7-bit prefix (string lengths): below this, the length is one byte.
_SHORT = 127
_LENGTHS = [bytes((size,)) for size in range(_SHORT)]
#: RFC 7541 §6.2.3: a never-indexed literal's first four bits.
_NEVER = 0x10
_PROBE = b"\x00"
_PROBED = b"\x01" + _PROBE  # its length (one byte, no Huffman bit), then itself
#: Names whose never-indexed prefix is remembered, at most (only a handful are ever sent).
_MAX_NAMES = 32


def _length(size: int) -> bytes:
    """A string length past one byte, as hpack writes it (no Huffman bit)."""
    return bytes(encode_integer(size, 7))


#: What :func:`read_request` gives the connection: ``:method``, ``:path``, the regular fields
#: as a handler sees them (cookies joined, ``host`` from ``:authority``), and the raw values
#: of ``content-length`` and ``x-request-id`` (None when absent).
RequestHead = tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes | None, bytes | None]


def read_request(
    headers: Sequence[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> RequestHead:
    """Check a request block as h2 would (raising ``h2.exceptions.ProtocolError``) and split
    it for the handler, in one pass when :func:`plain_request` vouches for it (every block
    a client sends), else h2's ``validate_headers`` then :func:`split_request`.

    ``known``: regular fields already vouched for on this connection, which the pass adds to
    and skips the byte checks for (a connection's requests repeat most of their fields);
    emptied past ``_MAX_KNOWN`` fields."""
    if known is not None and len(known) > _MAX_KNOWN:
        known.clear()
    head = plain_request(headers, known)
    if head is None:
        for _ in validate_headers(headers, _REQUEST):
            pass
        head = split_request(headers)
    return head


def plain_request(
    headers: Sequence[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> RequestHead | None:
    """The block split as :func:`split_request` splits it, when it is one h2 surely accepts
    (see the module doc); else None, and nothing is said about it.

    ``known`` (see :func:`read_request`) holds only fields whose name needs no more thought
    than "append it": never ``host``, ``cookie``, ``content-length`` or ``x-request-id``."""
    method = path = scheme = authority = host = length = request_id = None
    cookies: list[bytes] | None = None
    fields: list[tuple[bytes, bytes]] = []
    regular = False
    if known is None:
        known = set()
        remember = False
    else:
        remember = True
    value_ok = _VALUE.fullmatch
    for field in headers:
        name, value = field
        if name[:1] == b":":
            if regular:
                return None
            if field not in known:
                if value_ok(value) is None:
                    return None
                if remember and len(value) <= _MAX_KNOWN_BYTES:
                    known.add(field)
            if name == b":method":
                if method is not None or not value or value == b"CONNECT":
                    return None
                method = value
            elif name == b":path":
                if path is not None or not value:
                    return None
                path = value
            elif name == b":scheme":
                if scheme is not None or not value:
                    return None
                scheme = value
            elif name == b":authority" and authority is None:
                authority = value
            else:
                return None  # unknown, repeated, or a response's pseudo-field
            continue
        regular = True
        if field in known:
            fields.append(field)
            continue
        if value_ok(value) is None or _NAME.fullmatch(name) is None or name in _NOT_PLAIN:
            return None
        if name in _NOTED:
            if name == b"host":
                if host is not None:
                    return None
                host = value
            elif name == b"cookie":
                if cookies is None:
                    cookies = [value]
                else:
                    cookies.append(value)
                continue
            elif name == b"content-length":
                if length is None:
                    length = value
            elif request_id is None:
                request_id = value
        elif remember and len(name) + len(value) <= _MAX_KNOWN_BYTES:
            known.add(field)
        fields.append(field)
    if method is None or path is None or scheme is None:
        return None
    if authority is None:
        if host is None:
            return None  # RFC 9113 §8.3.1: one or the other
    elif host is not None and host != authority:
        return None
    if cookies is not None:
        fields.append((b"cookie", b"; ".join(cookies)))
    if host is None and authority:
        fields.append((b"host", authority))
    return method, path, fields, length, request_id


def is_plain_request(
    headers: Sequence[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> bool:
    """True when ``headers`` is a request block h2 surely accepts (see the module doc)."""
    return plain_request(headers, known) is not None


def split_request(headers: Sequence[tuple[bytes, bytes]]) -> RequestHead:
    """The handler's view of a block h2 accepted, the slow way (what :func:`plain_request`
    gives in its pass). Split ``cookie`` fields are joined again (RFC 9113 §8.2.3) and
    ``:authority`` stands in for a missing ``host`` (§8.3.1), so handlers see what
    HTTP/1.1 would have given them."""
    method = path = authority = b""
    length = request_id = None
    fields: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if name[:1] != b":":
            if name == b"cookie":
                cookies.append(value)
                continue
            if name == b"content-length" and length is None:
                length = value
            elif name == b"x-request-id" and request_id is None:
                request_id = value
            fields.append((name, value))
        elif name == b":method":
            method = value
        elif name == b":path":
            path = value
        elif name == b":authority":
            authority = value
    if cookies:
        fields.append((b"cookie", b"; ".join(cookies)))
    if authority and not any(name == b"host" for name, _ in fields):
        fields.append((b"host", authority))
    return method, path, fields, length, request_id


def check_trailers(headers: Sequence[tuple[bytes, bytes]]) -> None:
    """Raise ``h2.exceptions.ProtocolError`` if h2 would have rejected these trailers."""
    for _ in validate_headers(headers, _TRAILER):
        pass


class LiteralEncoder(Encoder):
    """hpack's encoder, sending literal values without Huffman coding, and remembering what
    it encoded while the dynamic table stays as it was.

    Huffman coding is the encoder's choice, per string (RFC 7541 §5.2), and hpack codes in
    a Python loop per byte. The fields a response repeats are indexed after their first
    use and cost one byte either way; what is left literal is what changes per response
    (the request id, the length), where coding saves about seven bytes a response and
    costs about as much CPU as encoding all the rest of the block.

    The memory: hpack looks every field up in its table entry by entry, for every response,
    although a response repeats its fields (``:status``, content-type, the provider) and
    they soon sit in the table, where each is one index (RFC 7541 §6.1). An index is only
    valid for the table it was found in: a new entry renumbers every dynamic entry (§2.3.3)
    and a smaller table evicts some (§4.3). Such a change has only two causes here: this
    encoder adding a field it sent literal with incremental indexing (§6.2.1), or h2
    resizing the table after the peer's SETTINGS_HEADER_TABLE_SIZE. So the memory is
    emptied when either happens, and kept otherwise. It holds two things, each taken from
    what hpack itself produced, so the block is byte for byte what hpack would send:

    * a field whose representation was an index (the table holds it whole): that index;
    * a never-indexed field's (§6.2.3) representation up to its value, per name: the value
      is appended with its length, so the request id and length need no lookup either.

    Both are bounded by the table (the static one and at most a few dozen dynamic
    entries) and by ``_MAX_NAMES``.
    """

    def __init__(self) -> None:
        super().__init__()
        self._indexed: dict[tuple[bytes, bytes], bytes] = {}
        self._never: dict[bytes, bytes] = {}
        #: How many dynamic entries the table had when the memory was last right.
        self._entries = 0

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        table = self.header_table
        if table.resized or not isinstance(headers, list):
            # A size update must lead the block (§4.2), and hpack writes it; any other
            # shape is left to hpack whole. Either way, start the memory afresh.
            block = super().encode(headers, huffman=False)
            self._forget()
            return block
        if len(table.dynamic_entries) != self._entries:
            self._forget()  # shrunk and grown back without a size update: entries left
        indexed, never = self._indexed, self._never
        out: list[bytes] = []
        for header in headers:
            if type(header) is NeverIndexedHeaderTuple:
                name, value = header
                prefix = never.get(name) or self._never_prefix(name)
                if prefix is None:
                    out.append(self.add((name, value), True, huffman=False))
                    continue
                size = len(value)
                out.append(prefix + (_LENGTHS[size] if size < _SHORT else _length(size)) + value)
                continue
            encoded = indexed.get(header)
            if encoded is None:
                encoded = self._add(header)
            out.append(encoded)
        return b"".join(out)

    def _add(self, header: Any) -> bytes:
        """hpack encodes one field; remember it if it was an index, forget everything if
        the table changed."""
        if len(header) > 2:
            name, value, sensitive = header[0], header[1], bool(header[2])
        else:
            name, value = header
            sensitive = isinstance(header, HeaderTuple) and not header.indexable
        encoded = self.add((name, value), sensitive, huffman=False)
        if encoded[0] & _INDEXED:
            self._indexed[(name, value)] = encoded
        elif not sensitive:
            self._forget()  # a new entry: every dynamic index moved
        return encoded

    def _never_prefix(self, name: bytes) -> bytes | None:
        """The never-indexed representation of ``name`` up to its value's length, taken
        from hpack's own for a probe value (NUL, which no valid field holds, §8.2.1 of
        RFC 9113); None when hpack did not write that shape, and the field goes to hpack.
        Never-indexed fields leave the table as it is."""
        encoded = self.add((name, _PROBE), True, huffman=False)
        if encoded[0] & 0xF0 != _NEVER or not encoded.endswith(_PROBED):
            return None
        if len(self._never) >= _MAX_NAMES:
            self._never.clear()
        prefix = self._never[name] = encoded[: -len(_PROBED)]
        return prefix

    def _forget(self) -> None:
        self._indexed.clear()
        self._never.clear()
        self._entries = len(self.header_table.dynamic_entries)
