"""The fast response-head parser and Content-Length decoder, held to h11. No sockets.

The rule (``protocol/h1response.py``): what the fast path reads, it reads as h11 does;
what it declines (:class:`Unusual`), h11 gets; while it waits for bytes, h11 would too.
Hypothesis writes responses from plain to odd (other versions and statuses, bare LFs,
obs-fold, odd bytes in values, duplicate or conflicting framing, wrong lengths, bytes past
the end), each is cut at every byte boundary, and both readers' outcomes are compared.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.protocol.chunked import ChunkedDecoder, ChunkedError
from runestone_proxy.protocol.h1response import (
    CHUNKED,
    LENGTH,
    LengthDecoder,
    ResponseHead,
    Unusual,
    parse_response_head,
)

MAX = 4096
UNUSUAL = ("unusual",)
ERROR = ("error",)

Outcome = tuple[Any, ...]


def h11_read(pieces: list[bytes]) -> Outcome:
    """What h11 makes of a response arriving as ``pieces`` then EOF, after a POST."""
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX)
    conn.send(
        h11.Request(method="POST", target="/", headers=[("host", "x"), ("content-length", "0")])
    )
    conn.send(h11.EndOfMessage())
    status, headers, body = 0, [], []
    rest = [*(p for p in pieces if p), b""]  # b"" is EOF to h11
    try:
        while rest:
            conn.receive_data(rest.pop(0))
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Response):
                    status, headers = event.status_code, [(n, bytes(v)) for n, v in event.headers]
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    for piece in rest[:-1]:
                        conn.receive_data(piece)
                    keep = conn.our_state is h11.DONE and conn.their_state is h11.DONE
                    extra = bytes(conn.trailing_data[0])
                    return ("ok", status, headers, b"".join(body), keep, extra)
                elif isinstance(event, h11.ConnectionClosed):
                    return ERROR
    except h11.RemoteProtocolError:
        return ERROR
    raise AssertionError("h11 neither finished nor failed")  # pragma: no cover


def fast_read(pieces: list[bytes]) -> Outcome:
    """The same through the fast path, as the pool uses it (EOF in the head: h11's)."""
    buf = b""
    head: ResponseHead | None = None
    decoder: LengthDecoder | ChunkedDecoder | None = None
    body = []
    for piece in pieces:
        if head is None:
            buf += piece
            parsed = parse_response_head(buf, MAX)
            if isinstance(parsed, Unusual):
                return UNUSUAL
            if parsed is None:
                continue
            head = parsed
            is_chunked = head.framing == CHUNKED
            decoder = ChunkedDecoder(MAX) if is_chunked else LengthDecoder(head.length)
            piece = buf[head.size :]
        assert decoder is not None
        try:
            body.append(decoder.feed(piece))
        except ChunkedError:
            return ERROR
    if head is None:
        return UNUSUAL
    assert decoder is not None
    if not decoder.done:
        return ERROR
    return ("ok", head.status, head.headers, b"".join(body), head.keep_alive, decoder.extra)


def agree(wire: bytes) -> Outcome:
    """Both readers on ``wire`` whole and cut at every byte; the fast outcome must be
    h11's or UNUSUAL, the same for every cutting. Returns the fast outcome."""
    seen = set()
    for cut in range(len(wire) + 1):
        pieces = [wire[:cut], wire[cut:]]
        fast = fast_read(pieces)
        if fast != UNUSUAL:
            assert fast == h11_read(pieces), (pieces, fast)
        seen.add(repr(fast))
    assert len(seen) == 1, seen  # the cutting never changes the answer
    return fast_read([wire])


# --- hand-picked cases -----------------------------------------------------------------------


def test_a_typical_json_response_is_read_fast() -> None:
    wire = (
        b"HTTP/1.1 200 OK\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
        b'Content-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'
    )
    head = parse_response_head(wire, MAX)
    assert isinstance(head, ResponseHead)
    assert head.headers[1] == (b"content-type", b"application/json")
    assert (head.status, head.framing, head.length, head.keep_alive) == (200, LENGTH, 11, True)
    assert wire[head.size :] == b'{"ok":true}'
    assert agree(wire)[3] == b'{"ok":true}'


def test_a_chunked_stream_head_is_read_fast() -> None:
    wire = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
    assert agree(wire)[:4] == ("ok", 200, [(b"transfer-encoding", b"chunked")], b"hello")


def test_connection_close_is_read_as_h11_does() -> None:
    wire = b"HTTP/1.1 503 x\r\nconnection: Keep-Alive ,CLOSE\r\ncontent-length: 0\r\n\r\n"
    assert agree(wire)[4] is False


@pytest.mark.parametrize(
    "wire",
    [
        b"HTTP/1.0 200 OK\r\ncontent-length: 0\r\n\r\n",  # 1.0 closes by default
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nto the end",  # no framing: read to EOF
        b"HTTP/1.1 200 OK\ncontent-length: 0\n\n",  # bare LF
        b"HTTP/1.1 200 OK\r\ncontent-length: 0\n\r\n",
        b"HTTP/1.1 200 OK\r\nx: a\r\n b\r\ncontent-length: 0\r\n\r\n",  # obs-fold
        b"HTTP/1.1 200 OK\r\nx: caf\xc3\xa9\r\ncontent-length: 0\r\n\r\n",  # obs-text
        b"HTTP/1.1 200 OK\r\ncontent-length: 1, 1\r\n\r\nx",  # a list
        b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: Chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 3\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 1234567890123456789\r\n\r\n",
        b"HTTP/1.1 99 odd\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 600 odd\r\ncontent-length: 0\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b" HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nbad name: 1\r\ncontent-length: 0\r\n\r\n",
    ],
)
def test_unusual_heads_go_to_h11(wire: bytes) -> None:
    assert isinstance(parse_response_head(wire, MAX), Unusual)
    agree(wire)


def test_a_head_over_the_bound_goes_to_h11() -> None:
    wire = b"HTTP/1.1 200 OK\r\nx: " + b"a" * MAX + b"\r\ncontent-length: 0\r\n\r\n"
    assert isinstance(parse_response_head(wire, MAX), Unusual)
    assert isinstance(parse_response_head(wire[: MAX + 1], MAX), Unusual)  # still incomplete
    assert h11_read([wire[: MAX + 1]]) == ERROR


def test_a_partial_head_waits() -> None:
    wire = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"
    for cut in range(len(wire)):
        assert parse_response_head(wire[:cut], MAX) is None


def test_a_long_run_of_spaces_is_refused_in_linear_time() -> None:
    # The field regex has one way to match a line, so a hostile value cannot make it
    # backtrack quadratically.
    wire = b"HTTP/1.1 200 OK\r\nx: a" + b" " * 60_000 + b"\x00\r\n\r\n"
    assert isinstance(parse_response_head(wire, 100_000), Unusual)


def test_the_length_decoder() -> None:
    decoder = LengthDecoder(5)
    assert decoder.feed(b"ab") == b"ab"
    assert decoder.missing() == "received 2 bytes, expected 5"
    assert decoder.feed(b"cdeXY") == b"cde"
    assert decoder.done
    assert decoder.extra == b"XY"
    assert decoder.feed(b"Z") == b""
    assert decoder.extra == b"XYZ"
    assert LengthDecoder(0).done


# --- generated ---------------------------------------------------------------------------------

OWS = st.sampled_from([b"", b" ", b"  ", b"\t", b" \t"])
EOL = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r"])
NAMES = st.sampled_from(
    [
        b"content-type",
        b"Content-Type",
        b"x-request-id",
        b"date",
        b"connection",
        b"Connection",
        b"x-odd_name!",
        b"server",
        b"content-length",
        b"transfer-encoding",
        b"bad name",
        b"",
    ]
)
PLAIN_VALUES = st.sampled_from(
    [b"application/json", b"close", b"keep-alive", b"Close, upgrade", b"a b\tc", b"", b"x"]
)
VALUES = st.one_of(
    PLAIN_VALUES,
    st.binary(max_size=12).filter(lambda v: b"\n" not in v),
    st.text(max_size=8).map(lambda t: t.encode()).filter(lambda v: b"\n" not in v),
)
STATUS_LINES = st.one_of(
    st.sampled_from(
        [
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 200 OK",
            b"HTTP/1.1 404 Not Found",
            b"HTTP/1.1 429",
            b"HTTP/1.1 500 ",
            b"HTTP/1.0 200 OK",
            b"HTTP/1.1 100 Continue",
            b"HTTP/1.1 204 No",
            b"HTTP/1.1 304 x",
            b"HTTP/2.0 200 OK",
            b"http/1.1 200 OK",
            b"HTTP/1.1 2000 OK",
            b"HTTP/1.1 200 \xff",
            b"HTTP/1.1 200\tOK",
            b"HTTP/1.1  200 OK",
            b"",
        ]
    ),
    st.builds(lambda c: b"HTTP/1.1 %d x" % c, st.integers(0, 999)),
)


def sometimes(odd: st.SearchStrategy[Any], plain: Any) -> st.SearchStrategy[Any]:
    """Mostly ``plain``, one time in four something from ``odd``."""
    return st.one_of(st.just(plain), st.just(plain), st.just(plain), odd)


@st.composite
def responses(draw: st.DrawFn, plain: bool = False) -> bytes:
    """A response: plain ones follow the rule's common path; the rest bend it here and
    there (each bend one time in four), so that every outcome is common."""
    body = draw(st.binary(max_size=40))
    names = st.sampled_from([b"content-type", b"x-a", b"date", b"connection"])
    fields = draw(st.lists(st.tuples(names, PLAIN_VALUES), max_size=3))
    if plain:
        status, eol, ows = b"HTTP/1.1 %d OK" % draw(st.sampled_from([200, 429, 500])), [], b" "
    else:
        status = draw(sometimes(STATUS_LINES, b"HTTP/1.1 200 OK"))
        fields += draw(sometimes(st.lists(st.tuples(NAMES, VALUES), max_size=3), []))
        eol = draw(sometimes(st.lists(st.tuples(st.integers(0, 7), EOL), max_size=2), []))
        ows = draw(sometimes(OWS, b" "))
    chunked = draw(st.booleans())
    if chunked:
        fields.append((b"transfer-encoding", b"chunked"))
        sizes = draw(st.lists(st.integers(1, 9), max_size=4))
        parts, rest = [], body
        for size in sizes:
            parts.append(b"%x\r\n%b\r\n" % (len(rest[:size]), rest[:size]) if rest[:size] else b"")
            rest = rest[size:]
        if rest:
            parts.append(b"%x\r\n%b\r\n" % (len(rest), rest))
        wire_body = b"".join(parts) + b"0\r\n\r\n"
    else:
        delta = 0 if plain else draw(sometimes(st.sampled_from([-1, 1]), 0))
        fields.append((b"content-length", b"%d" % max(0, len(body) + delta)))
        wire_body = body
    if not plain:
        fields = draw(st.permutations(fields))
        if draw(sometimes(st.just(True), False)):
            fields.insert(draw(st.integers(0, len(fields))), (b" folded", b"x"))
        if draw(sometimes(st.just(True), False)):
            drop = (b"content-length", b"transfer-encoding")
            fields = [f for f in fields if f[0] not in drop]
    ends = [b"\r\n"] * (len(fields) + 2)
    for where, end in eol:
        ends[where % len(ends)] = end
    head = status + ends[0]
    for i, (name, value) in enumerate(fields):
        head += name + b":" + ows + value + ows + ends[i + 1]
    extra = b"" if plain else draw(sometimes(st.just(b"HTTP/1.1 200 OK\r\n"), b""))
    return head + ends[-1] + wire_body + extra


@settings(derandomize=True, max_examples=200, deadline=None)
@given(wire=responses())
def test_the_fast_path_agrees_with_h11_or_declines(wire: bytes) -> None:
    agree(wire)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(wire=responses(plain=True))
def test_plain_responses_take_the_fast_path(wire: bytes) -> None:
    outcome = agree(wire)
    assert outcome[0] == "ok"


@settings(derandomize=True, max_examples=200, deadline=None)
@given(wire=responses())
def test_while_the_fast_path_waits_h11_waits_too(wire: bytes) -> None:
    for cut in range(1, len(wire) + 1):  # (b"" would be EOF to h11)
        if parse_response_head(wire[:cut], MAX) is None:
            conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX)
            conn.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
            conn.send(h11.EndOfMessage())
            conn.receive_data(wire[:cut])
            assert conn.next_event() is h11.NEED_DATA
