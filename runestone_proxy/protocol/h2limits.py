"""HTTP/2 flood accounting over raw frame headers. No I/O.

Owns the abuse limits that h2 does not enforce itself, or enforces too late: it sees the
bytes a connection reads *before* h2 parses them, so a flood is caught before h2 buffers
CONTINUATION fragments, decodes header blocks or queues PING/SETTINGS acknowledgements.

How this works:

* Every HTTP/2 frame starts with a 9-byte header (RFC 9113 §4.1): length (24 bits), type
  (8), flags (8), reserved bit and stream id (31). :class:`FrameGuard` reads only those
  headers and skips payloads by count, so a 16 KiB DATA frame costs one header parse. A
  header cut between two reads is kept (at most 8 bytes) until the rest arrives. The
  24-byte client connection preface (RFC 9113 §3.4) is skipped first (h2 checks it), and
  the first frame after it must be SETTINGS, else the preface is invalid (PROTOCOL_ERROR).
* A header block is a HEADERS (or PUSH_PROMISE) frame without END_HEADERS followed by
  CONTINUATION frames up to one with END_HEADERS (RFC 9113 §6.10). The guard counts the
  CONTINUATION frames and the encoded bytes of the block. The encoded size stands in for
  the decoded header list size that SETTINGS_MAX_HEADER_LIST_SIZE bounds (§6.5.2): HPACK
  rarely makes a block larger than the list it encodes (each field costs 32 octets of
  list size, RFC 9113 §6.5.2, far more than its length prefixes), so a block over the
  limit is a list over the limit.
* Rapid reset (CVE-2023-44487) is counted on client RST_STREAM frames (§6.4), plus the
  streams the server refuses (:meth:`FrameGuard.note_reset`). SETTINGS (§6.5), PING
  (§6.7), PRIORITY (§6.3) and empty DATA frames without END_STREAM (the "empty frames"
  flood, CVE-2019-9518) count as control frames. Both are limited per rolling second by
  :class:`RollingCounter`, which keeps at most ``limit + 1`` timestamps.
* The guard decides; the connection acts. :meth:`FrameGuard.feed` returns a
  :class:`Violation` carrying the GOAWAY error code (RFC 9113 §7), or None. Time comes in
  as an argument, so tests drive it by hand.
"""

from __future__ import annotations

import collections

import attrs

__all__ = [
    "ENHANCE_YOUR_CALM",
    "PREFACE",
    "PROTOCOL_ERROR",
    "FrameGuard",
    "RollingCounter",
    "Violation",
]

#: RFC 9113 §3.4: the client connection preface.
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# RFC 9113 §7 error codes, as the integers that go on the wire.
PROTOCOL_ERROR = 0x1
ENHANCE_YOUR_CALM = 0xB

# RFC 9113 §6 frame types and the flags the guard reads.
_DATA, _HEADERS, _PRIORITY, _RST_STREAM, _SETTINGS = 0x0, 0x1, 0x2, 0x3, 0x4
_PUSH_PROMISE, _PING, _CONTINUATION = 0x5, 0x6, 0x9
_END_STREAM, _ACK, _END_HEADERS = 0x1, 0x1, 0x4
_CONTROL = frozenset({_SETTINGS, _PING, _PRIORITY})
_HEADER_SIZE = 9


@attrs.frozen
class Violation:
    """Why a connection must go: the GOAWAY error code and a short reason for the log."""

    error_code: int
    reason: str


@attrs.define
class RollingCounter:
    """Counts hits in the last ``window_s`` seconds; ``hit`` says whether ``limit`` is passed."""

    limit: int
    window_s: float = 1.0
    _times: collections.deque[float] = attrs.Factory(collections.deque)

    def hit(self, now: float) -> bool:
        times = self._times
        times.append(now)
        cutoff = now - self.window_s
        while times[0] <= cutoff:
            times.popleft()
        return len(times) > self.limit


@attrs.define
class FrameGuard:
    """Scans inbound bytes frame header by frame header and reports the first flood."""

    max_continuation_frames: int
    max_header_block_bytes: int
    resets: RollingCounter
    control: RollingCounter
    _preface_left: int = len(PREFACE)
    _want_settings: bool = True
    _partial: bytearray = attrs.Factory(bytearray)
    _skip: int = 0
    _in_block: bool = False
    _block_frames: int = 0
    _block_bytes: int = 0

    @classmethod
    def from_limits(
        cls,
        *,
        max_resets_per_s: int,
        max_control_frames_per_s: int,
        max_continuation_frames: int,
        max_header_list_bytes: int,
    ) -> FrameGuard:
        return cls(
            max_continuation_frames=max_continuation_frames,
            max_header_block_bytes=max_header_list_bytes,
            resets=RollingCounter(max_resets_per_s),
            control=RollingCounter(max_control_frames_per_s),
        )

    def feed(self, data: bytes | bytearray, now: float) -> Violation | None:
        """Account for ``data`` (the next bytes read from the client)."""
        pos, end = 0, len(data)
        header: bytes | bytearray
        if self._preface_left:
            pos = min(self._preface_left, end)
            self._preface_left -= pos
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if self._partial or end - pos < _HEADER_SIZE:
                take = min(_HEADER_SIZE - len(self._partial), end - pos)
                self._partial += data[pos : pos + take]
                pos += take
                if len(self._partial) < _HEADER_SIZE:
                    return None
                header, at = bytes(self._partial), 0
                self._partial.clear()
            else:
                header, at = data, pos
                pos += _HEADER_SIZE
            length = (header[at] << 16) | (header[at + 1] << 8) | header[at + 2]
            self._skip = length
            violation = self._frame(header[at + 3], header[at + 4], length, now)
            if violation is not None:
                return violation
        return None

    def note_reset(self, now: float) -> Violation | None:
        """Count a stream the server refused; refusals feed the rapid-reset budget too."""
        if self.resets.hit(now):
            return Violation(ENHANCE_YOUR_CALM, "too many refused or reset streams")
        return None

    def _frame(self, kind: int, flags: int, length: int, now: float) -> Violation | None:
        if self._want_settings:
            # RFC 9113 §3.4: the preface continues with a SETTINGS frame (not an ACK).
            if kind != _SETTINGS or flags & _ACK:
                return Violation(PROTOCOL_ERROR, "connection preface without SETTINGS")
            self._want_settings = False
        if self._in_block:
            # RFC 9113 §6.10: only CONTINUATION frames may follow until END_HEADERS.
            if kind != _CONTINUATION:
                return Violation(PROTOCOL_ERROR, "frame interleaved in a header block")
            self._block_frames += 1
            self._block_bytes += length
            if self._block_frames > self.max_continuation_frames:
                return Violation(ENHANCE_YOUR_CALM, "CONTINUATION flood")
            if self._block_bytes > self.max_header_block_bytes:
                return Violation(ENHANCE_YOUR_CALM, "header block too large")
            if flags & _END_HEADERS:
                self._in_block = False
            return None
        if kind == _HEADERS or kind == _PUSH_PROMISE:
            if length > self.max_header_block_bytes:
                return Violation(ENHANCE_YOUR_CALM, "header block too large")
            if not flags & _END_HEADERS:
                self._in_block, self._block_frames, self._block_bytes = True, 0, length
        elif kind == _RST_STREAM:
            if self.resets.hit(now):
                return Violation(ENHANCE_YOUR_CALM, "rapid reset")
        elif kind in _CONTROL or (kind == _DATA and length == 0 and not flags & _END_STREAM):
            if self.control.hit(now):
                return Violation(ENHANCE_YOUR_CALM, "control frame flood")
        return None
