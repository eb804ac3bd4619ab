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


def is_plain_request(
    headers: Sequence[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> bool:
    """True when ``headers`` is a request block h2 surely accepts (see the module doc).

    ``known``: regular fields (``host`` aside) this check already vouched for, which it
    adds to and skips the byte checks for: a connection's requests repeat most of their
    fields. The caller bounds it (:func:`check_request`)."""
    seen: set[bytes] = set()
    authority: bytes | None = None
    host: bytes | None = None
    regular = False
    name_ok, value_ok = _NAME.fullmatch, _VALUE.fullmatch
    for field in headers:
        name, value = field
        if name[:1] == b":":
            if regular or name in seen or name not in _PSEUDO or value_ok(value) is None:
                return False
            seen.add(name)
            if name == b":authority":
                authority = value
            elif not value or (name == b":method" and value == b"CONNECT"):
                return False  # an empty :path (or :method, :scheme), or CONNECT
            continue
        regular = True
        if known is not None and field in known:
            continue
        if value_ok(value) is None or name_ok(name) is None or name in _NOT_PLAIN:
            return False
        if name == b"host":
            if host is not None:
                return False
            host = value
        elif known is not None and len(name) + len(value) <= _MAX_KNOWN_BYTES:
            known.add(field)
    if len(seen) - (authority is not None) != _REQUIRED:
        return False
    if authority is None:
        return host is not None
    return host is None or host == authority


def check_request(
    headers: Sequence[tuple[bytes, bytes]], known: set[tuple[bytes, bytes]] | None = None
) -> None:
    """Raise ``h2.exceptions.ProtocolError`` if h2 would have rejected this request block.
    ``known``: see :func:`is_plain_request`; emptied past ``_MAX_KNOWN`` fields."""
    if known is not None and len(known) > _MAX_KNOWN:
        known.clear()
    if not is_plain_request(headers, known):
        for _ in validate_headers(headers, _REQUEST):
            pass


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
