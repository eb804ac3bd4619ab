"""The chunked-body decoder (RFC 9112 §7.1), fed bytes cut anywhere. No sockets, no loop."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.protocol.chunked import ChunkedDecoder, ChunkedError


def encode(parts: list[bytes], trailer: bytes = b"") -> bytes:
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts if p)
    return body + b"0\r\n" + trailer + b"\r\n"


def decode_all(pieces: list[bytes]) -> tuple[bytes, ChunkedDecoder]:
    decoder = ChunkedDecoder()
    return b"".join(decoder.feed(piece) for piece in pieces), decoder


def test_one_whole_chunk_per_feed() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"6\r\ndata: \r\n") == b"data: "
    assert decoder.chunks == 1
    assert decoder.feed(b"1A\r\n" + b"x" * 26 + b"\r\n") == b"x" * 26
    assert not decoder.done
    assert decoder.feed(b"0\r\n\r\n") == b""
    assert decoder.done
    assert decoder.extra == b""


def test_several_chunks_in_one_feed_are_joined() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\none\r\n3\r\ntwo\r\n5\r\nthree\r\n") == b"onetwothree"
    assert decoder.chunks == 3
    assert not decoder.done


def test_chunk_data_is_handed_out_before_its_chunk_ends() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"a\r\nhello") == b"hello"
    assert decoder.chunks == 0
    assert decoder.feed(b"world\r") == b"world"
    assert decoder.chunks == 1
    assert decoder.feed(b"\n0\r\n\r\n") == b""
    assert decoder.done


def test_extensions_and_trailers_are_ignored() -> None:
    body = b"3;name=value\r\nabc\r\n4 ; x\r\ndefg\r\n000;end\r\nExpires: never\r\nX: y\r\n\r\n"
    out, decoder = decode_all([body])
    assert out == b"abcdefg"
    assert decoder.done


def test_bytes_after_the_end_are_kept_as_extra() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"1\r\na\r\n0\r\n\r\nHTTP/1.1") == b"a"
    assert decoder.done
    assert decoder.extra == b"HTTP/1.1"
    assert decoder.feed(b" 200") == b""
    assert decoder.extra == b"HTTP/1.1 200"


@pytest.mark.parametrize(
    "raw",
    [
        b"zz\r\n",  # not hex
        b"\r\n",  # no size
        b"0x1a\r\n",  # a prefix int() would take
        b"+5\r\n",
        b"1_0\r\n",
        b"12345678901234567\r\n",  # over 16 digits
        b"3\r\nabcXY",  # chunk data not closed by CRLF
        b"3\r\nabc\n",  # a bare LF after the data
    ],
)
def test_malformed_bodies_raise(raw: bytes) -> None:
    with pytest.raises(ChunkedError):
        ChunkedDecoder().feed(raw)


def test_a_size_line_without_end_is_bounded() -> None:
    decoder = ChunkedDecoder(max_line_bytes=16)
    decoder.feed(b"1" * 16)
    with pytest.raises(ChunkedError, match="over 16 bytes"):
        decoder.feed(b"1")


def test_a_trailer_line_is_bounded() -> None:
    decoder = ChunkedDecoder(max_line_bytes=16)
    with pytest.raises(ChunkedError, match="over 16 bytes"):
        decoder.feed(b"0\r\n" + b"X" * 20 + b"\r\n")


def test_a_lone_cr_after_data_waits_for_its_lf() -> None:
    decoder = ChunkedDecoder()
    assert decoder.feed(b"2\r\nab\r") == b"ab"
    with pytest.raises(ChunkedError):
        decoder.feed(b"x")


@settings(derandomize=True, max_examples=200, deadline=None)
@given(
    parts=st.lists(st.binary(max_size=40), max_size=8),
    trailer=st.sampled_from([b"", b"X-A: 1\r\n", b"A: 1\r\nB: 2\r\n"]),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=12),
)
def test_any_cutting_of_a_body_decodes_to_its_data(
    parts: list[bytes], trailer: bytes, cuts: list[int]
) -> None:
    wire = encode(parts, trailer)
    points = sorted({c % (len(wire) + 1) for c in cuts})
    pieces = [wire[a:b] for a, b in zip([0, *points], [*points, len(wire)], strict=True)]
    out, decoder = decode_all(pieces)
    assert out == b"".join(parts)
    assert decoder.done
    assert decoder.extra == b""
