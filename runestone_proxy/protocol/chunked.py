"""The chunked transfer coding of a response body, decoded incrementally. No I/O.

Owns :class:`ChunkedDecoder`, which the upstream pool uses instead of h11 to read a
streamed (``Transfer-Encoding: chunked``) response body: h11 still parses the head and
decides the framing, and still frames every non-chunked body. A paced SSE stream arrives
as one HTTP chunk per event, and h11's generic event machinery (two ``next_event`` calls,
a state-machine pass and an event object per chunk) cost more than the rest of the relay's
per-chunk parsing together; here a whole chunk in one read is one ``find``, one regex
match and two slices.

Implements RFC 9112 §7.1 (https://www.rfc-editor.org/rfc/rfc9112#section-7.1)::

    chunked-body   = *chunk last-chunk trailer-section CRLF
    chunk          = chunk-size [ chunk-ext ] CRLF chunk-data CRLF
    chunk-size     = 1*HEXDIG
    last-chunk     = 1*("0") [ chunk-ext ] CRLF
    trailer-section = *( field-line CRLF )

Chunk extensions are ignored (§7.1.1: a recipient MUST ignore unrecognized ones), and so
are trailer fields (§7.1.2: nothing here needs them). Lines must end with CRLF. A size
line or trailer line longer than ``max_line_bytes`` (like h11's
``max_incomplete_event_size``) is an error, so a peer cannot make the buffer grow without
bound between chunks; chunk data is handed out as it arrives, never buffered whole.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["ChunkedDecoder", "ChunkedError"]

#: ``chunk-size [ chunk-ext ]`` (§7.1, §7.1.1); at most 16 hex digits (a 64-bit size).
_SIZE_LINE: Final = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[^\r\n]*)?")
_HEX: Final = b"0123456789abcdefABCDEF"


class ChunkedError(ValueError):
    """The body broke the chunked coding (a bad size line, a chunk not closed by CRLF, a
    line over the limit)."""


class ChunkedDecoder:
    """``feed(bytes) -> bytes``: the body bytes the fed bytes complete; :attr:`done` once
    the last chunk and the trailer section arrived. Bytes fed after that are kept in
    :attr:`extra` (a peer that wrote past the end of the body)."""

    __slots__ = ("_buf", "_crlf", "_left", "_trailers", "chunks", "done", "extra", "max_line")

    def __init__(self, max_line_bytes: int = 64 * 1024) -> None:
        self.max_line = max_line_bytes
        self.done = False
        self.extra = b""
        #: Chunks whose data the last :meth:`feed` completed (how bunched the body arrives).
        self.chunks = 0
        self._buf = b""
        #: Bytes of the current chunk's data still to come.
        self._left = 0
        #: The current chunk's data is complete; its closing CRLF is next.
        self._crlf = False
        #: The last chunk arrived: trailer lines until an empty one.
        self._trailers = False

    def feed(self, data: bytes) -> bytes:
        if self.done:
            self.extra += data
            return b""
        if not self._buf and not self._left and not self._crlf and not self._trailers:
            # The common case: exactly one whole chunk, as a paced stream sends it.
            end = data.find(b"\r\n")
            # A bare size line (hex digits only, no extension) is read without the regex:
            # ``strip`` of every hex digit leaves nothing exactly when it is all hex digits.
            if 0 < end <= 16 and not data[:end].strip(_HEX):
                size = int(data[:end], 16)
                stop = end + 2 + size
                if size and len(data) == stop + 2 and data[stop:] == b"\r\n":
                    self.chunks = 1
                    return data[end + 2 : stop]
        return self._decode(self._buf + data if self._buf else data)

    def _decode(self, buf: bytes) -> bytes:
        out: list[bytes] = []
        pos, n, chunks = 0, len(buf), 0
        while pos < n:
            if self._left:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._crlf = True
                    chunks += 1
            elif self._crlf:
                if n - pos < 2:
                    if buf[pos:] != b"\r":
                        raise ChunkedError("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise ChunkedError("chunk data not followed by CRLF")
                pos += 2
                self._crlf = False
            else:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if n - pos > self.max_line:
                        raise ChunkedError(f"chunk line over {self.max_line} bytes")
                    break
                if end - pos > self.max_line:
                    raise ChunkedError(f"chunk line over {self.max_line} bytes")
                line = buf[pos:end]
                pos = end + 2
                if self._trailers:
                    if not line:  # the empty line that ends the trailer section
                        self.done = True
                        self.extra = buf[pos:]
                        pos = n
                        break
                elif (size := _size(line)) == 0:
                    self._trailers = True
                else:
                    self._left = size
        self._buf = buf[pos:]
        self.chunks = chunks
        return out[0] if len(out) == 1 else b"".join(out)

    def missing(self) -> str:
        """What an EOF now cuts short, in h11's words."""
        return "incomplete chunked read"


def _size(line: bytes) -> int:
    m = _SIZE_LINE.fullmatch(line)
    if m is None:
        raise ChunkedError(f"invalid chunk size line {line[:40]!r}")
    return int(m[1], 16)
