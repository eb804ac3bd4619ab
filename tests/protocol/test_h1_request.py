"""The fast request-head parser, held to h11 (server side). No sockets.

The rule (``protocol/h1request.py``, after ``protocol/h1response.py``): what the fast path
reads, it reads as h11 does; what it declines, h11 gets; while it waits, h11 would too.
Hypothesis writes requests from plain to odd (other versions, methods and targets, no or
two Hosts, bare LFs, obs-fold, odd bytes, chunked or conflicting framing, Expect, Upgrade,
a pipelined request behind), each is cut at every byte boundary, and both readers'
outcomes are compared. The body counts as read fast only if it is all in the buffer, as
the listener takes it.
"""

from __future__ import annotations

from typing import Any

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.protocol.h1request import RequestHead, parse_request_head
from runestone_proxy.protocol.h1response import Unusual

MAX = 4096
UNUSUAL = ("unusual",)
ERROR = ("error",)

Outcome = tuple[Any, ...]


def h11_read(pieces: list[bytes]) -> Outcome:
    """What h11 (a server) makes of a request arriving as ``pieces`` then EOF."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX)
    head: h11.Request | None = None
    body = []
    rest = [*(p for p in pieces if p), b""]  # b"" is EOF to h11
    try:
        while rest:
            conn.receive_data(rest.pop(0))
            while (event := conn.next_event()) is not h11.NEED_DATA:
                if isinstance(event, h11.Request):
                    head = event
                elif isinstance(event, h11.Data):
                    body.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    assert head is not None
                    for piece in rest[:-1]:
                        conn.receive_data(piece)
                    keep = conn.their_state is h11.DONE
                    headers = [(n, bytes(v)) for n, v in head.headers]
                    extra = bytes(conn.trailing_data[0])
                    return ("ok", head.method, head.target, headers, b"".join(body), keep, extra)
                else:
                    return ERROR  # ConnectionClosed, PAUSED
    except h11.RemoteProtocolError:
        return ERROR
    raise AssertionError("h11 neither finished nor failed")  # pragma: no cover


def fast_read(pieces: list[bytes]) -> Outcome:
    """The same through the fast path: the head parsed, the body taken from the buffer."""
    buf = b""
    for piece in pieces:
        buf += piece
        parsed = parse_request_head(buf, MAX)
        if isinstance(parsed, Unusual):
            return UNUSUAL
        if parsed is not None:
            break
    else:
        return UNUSUAL  # EOF mid-head: the listener hands that to h11
    buf = b"".join(pieces)
    end = parsed.size + parsed.length
    if len(buf) < end:
        return UNUSUAL  # the body is not all here: h11 streams it
    head = parsed
    body, extra = buf[head.size : end], buf[end:]
    return ("ok", head.method, head.target, head.headers, body, head.keep_alive, extra)


def agree(wire: bytes) -> Outcome:
    """Both readers on ``wire`` cut at every byte: the fast outcome is h11's or UNUSUAL."""
    for cut in range(len(wire) + 1):
        pieces = [wire[:cut], wire[cut:]]
        fast = fast_read(pieces)
        if fast != UNUSUAL:
            assert fast == h11_read(pieces), (pieces, fast)
    return fast_read([wire])


def test_a_typical_sdk_request_is_read_fast() -> None:
    body = b'{"model":"m","messages":[]}'
    wire = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
        b"Accept: application/json\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer sk-x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    )
    head = parse_request_head(wire, MAX)
    assert isinstance(head, RequestHead)
    assert (head.method, head.target, head.length, head.keep_alive) == (
        b"POST",
        b"/v1/chat/completions",
        len(body),
        True,
    )
    assert head.headers[0] == (b"host", b"127.0.0.1:8080")
    assert agree(wire)[4] == body


def test_a_get_without_length_and_a_pipelined_one() -> None:
    one = b"GET /health/live HTTP/1.1\r\nhost: x\r\nConnection: close\r\n\r\n"
    outcome = agree(one + one)
    assert outcome[4:] == (b"", False, one)


@pytest.mark.parametrize(
    "wire",
    [
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",  # no Host
        b"GET / HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
        b"CONNECT a:443 HTTP/1.1\r\nhost: a:443\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\nexpect: 100-continue\r\ncontent-length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1,1\r\n\r\nx",
        b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 1\r\ncontent-length: 1\r\n\r\nx",
        b"GET / HTTP/1.1\nhost: a\n\n",
        b"GET /a b HTTP/1.1\r\nhost: a\r\n\r\n",
        b"\r\nGET / HTTP/1.1\r\nhost: a\r\n\r\n",
        b"GET / HTTP/1.1\r\nhost: a\r\n folded\r\n\r\n",
        b"GET /caf\xc3\xa9 HTTP/1.1\r\nhost: a\r\n\r\n",
    ],
)
def test_unusual_requests_go_to_h11(wire: bytes) -> None:
    assert isinstance(parse_request_head(wire, MAX), Unusual)
    agree(wire)


def test_a_partial_head_waits_and_an_overlong_one_does_not() -> None:
    wire = b"GET / HTTP/1.1\r\nhost: a\r\n\r\n"
    for cut in range(len(wire)):
        assert parse_request_head(wire[:cut], MAX) is None
    assert isinstance(parse_request_head(b"GET /" + b"a" * MAX, MAX), Unusual)


# --- generated ---------------------------------------------------------------------------------


def sometimes(odd: st.SearchStrategy[Any], plain: Any) -> st.SearchStrategy[Any]:
    """Mostly ``plain``, one time in four something from ``odd``."""
    return st.one_of(st.just(plain), st.just(plain), st.just(plain), odd)


ODD_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.0",
        b"get / HTTP/1.1",
        b"GET  / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET / http/1.1",
        b"GET /\x7f HTTP/1.1",
        b"CONNECT a:1 HTTP/1.1",
        b"G@T / HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET / HTTP/2.0",
        b"",
    ]
)
ODD_FIELDS = st.lists(
    st.tuples(
        st.sampled_from(
            [b"host", b"Host", b"expect", b"upgrade", b"transfer-encoding", b"x y", b"", b"x"]
        ),
        st.one_of(
            st.sampled_from([b"100-continue", b"chunked", b"h2c", b"a\x01b", b"caf\xc3\xa9"]),
            st.binary(max_size=8).filter(lambda v: b"\n" not in v),
        ),
    ),
    max_size=2,
)
VALUES = st.sampled_from([b"application/json", b"keep-alive", b"close", b"a b\tc", b"", b"x"])


@st.composite
def requests(draw: st.DrawFn, plain: bool = False) -> bytes:
    """A request: plain ones follow the rule's common path; the rest bend it here and there."""
    body = draw(st.binary(max_size=40))
    method = draw(st.sampled_from([b"POST", b"GET", b"DELETE", b"PATCH"]))
    target = draw(st.sampled_from([b"/v1/chat/completions", b"/", b"/a?b=c&d=%20", b"/x#y"]))
    line = method + b" " + target + b" HTTP/1.1"
    names = st.sampled_from([b"content-type", b"authorization", b"connection", b"accept"])
    fields = [(b"host", b"127.0.0.1:8080"), *draw(st.lists(st.tuples(names, VALUES), max_size=3))]
    eol: list[tuple[int, bytes]] = []
    ows = b" "
    if not plain:
        line = draw(sometimes(ODD_LINES, line))
        fields += draw(sometimes(ODD_FIELDS, []))
        ends = st.sampled_from([b"\n", b"\r"])
        eol = draw(sometimes(st.lists(st.tuples(st.integers(0, 7), ends), max_size=2), []))
        ows = draw(sometimes(st.sampled_from([b"", b"\t", b"  "]), b" "))
    if body or method != b"GET":
        delta = 0 if plain else draw(sometimes(st.sampled_from([-1, 1]), 0))
        fields.append((b"content-length", b"%d" % max(0, len(body) + delta)))
    else:
        body = b""
    if not plain:
        fields = draw(st.permutations(fields))
        if draw(sometimes(st.just(True), False)):
            fields.insert(draw(st.integers(0, len(fields))), (b" folded", b"x"))
    ends_at = [b"\r\n"] * (len(fields) + 2)
    for where, end in eol:
        ends_at[where % len(ends_at)] = end
    head = line + ends_at[0]
    for i, (name, value) in enumerate(fields):
        head += name + b":" + ows + value + ows + ends_at[i + 1]
    extra = draw(st.sampled_from([b"", b"GET / HTTP/1.1\r\nhost: a\r\n\r\n", b"GE"]))
    return head + ends_at[-1] + body + extra


@settings(derandomize=True, max_examples=200, deadline=None)
@given(wire=requests())
def test_the_fast_path_agrees_with_h11_or_declines(wire: bytes) -> None:
    agree(wire)


@settings(derandomize=True, max_examples=50, deadline=None)
@given(wire=requests(plain=True))
def test_plain_requests_take_the_fast_path(wire: bytes) -> None:
    assert agree(wire)[0] == "ok"


@settings(derandomize=True, max_examples=200, deadline=None)
@given(wire=requests())
def test_while_the_fast_path_waits_h11_waits_too(wire: bytes) -> None:
    for cut in range(1, len(wire) + 1):  # (b"" would be EOF to h11)
        if parse_request_head(wire[:cut], MAX) is None:
            conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX)
            conn.receive_data(wire[:cut])
            assert conn.next_event() is h11.NEED_DATA
