"""protocol.h2headers: the fast check never accepts a block h2 would reject.

``is_plain_request`` stands in for h2's inbound header validation, so its one promise is
soundness: whatever it vouches for, h2's ``validate_headers`` accepts. Hypothesis builds
blocks near the edges (upper case, separators, whitespace, pseudo-fields in odd places,
host against :authority); the examples pin what real clients send to the fast path. The
same pass splits the block: whatever it vouches for, it splits as the slow path does.
"""

from __future__ import annotations

import h2.exceptions
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.protocol.h2headers import (
    check_trailers,
    is_plain_request,
    plain_request,
    read_request,
    split_request,
)

Block = list[tuple[bytes, bytes]]

H2LOAD: Block = [
    (b":method", b"POST"),
    (b":path", b"/v1/chat/completions"),
    (b":scheme", b"http"),
    (b":authority", b"127.0.0.1:4003"),
    (b"user-agent", b"h2load nghttp2/1.52.0"),
    (b"content-type", b"application/json"),
    (b"content-length", b"88"),
]
HTTPX: Block = [
    (b":method", b"GET"),
    (b":authority", b"localhost"),
    (b":scheme", b"https"),
    (b":path", b"/v1/models?x=1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"authorization", b"Bearer sk-test"),
    (b"x-stainless-lang", b"python"),
    (b"te", b"trailers"),
    (b"cookie", b"a=1"),
    (b"cookie", b"b=2"),
    (b"x-empty", b""),
]


def h2_accepts(block: Block) -> bool:
    """h2's own verdict on a request block (what validate_inbound_headers ran)."""
    flags = HeaderValidationFlags(
        is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
    )
    try:
        for _ in validate_headers(block, flags):
            pass
    except h2.exceptions.ProtocolError:
        return False
    return True


def test_what_clients_send_takes_the_fast_path() -> None:
    assert is_plain_request(H2LOAD)
    assert is_plain_request([(n, v) for n, v in HTTPX if n != b"te"])
    assert is_plain_request([(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                             (b"host", b"example")])  # fmt: skip


@pytest.mark.parametrize(
    ("block", "why"),
    [
        ([*H2LOAD, (b"Content-Type", b"x")], "upper-case name"),
        ([*H2LOAD, (b"connection", b"close")], "connection-specific field"),
        ([*H2LOAD, (b"te", b"gzip")], "te other than trailers"),
        ([h for h in H2LOAD if h[0] != b":path"], "no :path"),
        ([h for h in H2LOAD if h[0] != b":method"], "no :method"),
        ([*H2LOAD, (b":path", b"/again")], "pseudo-field after a regular one"),
        ([(b":path", b"/"), *H2LOAD], "duplicate :path"),
        ([(b":status", b"200"), *H2LOAD], "response pseudo-field"),
        ([(b":bogus", b"1"), *H2LOAD], "unknown pseudo-field"),
        ([(n, b"" if n == b":path" else v) for n, v in H2LOAD], "empty :path"),
        ([*H2LOAD, (b"host", b"elsewhere")], "host differs from :authority"),
        ([*H2LOAD, (b"x-a", b"one\r\ntwo")], "CR LF in a value"),
        ([*H2LOAD, (b"x-a", b" padded")], "value starts with a space"),
        ([*H2LOAD, (b"", b"x")], "empty name"),
        ([h for h in H2LOAD if h[0] != b":authority"], "neither :authority nor host"),
    ],
)
def test_malformed_blocks_get_h2s_verdict(block: Block, why: str) -> None:
    assert not is_plain_request(block), why
    with pytest.raises(h2.exceptions.ProtocolError):
        read_request(block)


def test_legal_but_unusual_blocks_are_left_to_h2_and_pass() -> None:
    read_request(HTTPX)  # te: trailers is not "plain", and is legal
    read_request([*H2LOAD, (b'x-"quoted"', b"1")])


def test_trailers_with_pseudo_fields_are_rejected() -> None:
    check_trailers([(b"x-checksum", b"abc")])
    with pytest.raises(h2.exceptions.ProtocolError):
        check_trailers([(b":path", b"/")])


#: Edge cases: every rule of RFC 9113 §8.2 and §8.3 that h2 checks is broken by one of them.
_NAMES = st.sampled_from(
    [b":method", b":path", b":scheme", b":authority", b":status", b":protocol", b":x",
     b"host", b"te", b"connection", b"content-type", b"x-a", b"X-A", b"x a", b"x:a", b"",
     b"x\x7f", b'x"y', b"cookie", b"content-length", b"x-request-id"]
)  # fmt: skip
_VALUES = st.sampled_from(
    [b"", b"GET", b"CONNECT", b"/", b"http", b"example", b"trailers", b"a b", b" a", b"a ",
     b"\ta", b"a\r\nb", b"a\x00", b"\xff", b"TRAILERS"]
)  # fmt: skip
_GOOD_NAMES = st.sampled_from(
    [b"content-type", b"x-a", b"host", b"cookie", b"accept", b"content-length", b"x-request-id"]
)
_GOOD_VALUES = st.sampled_from([b"", b"example", b"a b", b"*/*", b"\xff"])
_PSEUDO = [
    (b":method", b"GET"),
    (b":scheme", b"http"),
    (b":path", b"/"),
    (b":authority", b"example"),
]


@st.composite
def blocks(draw: st.DrawFn) -> Block:
    """A well-formed request block, then up to two fields inserted or replaced from the
    edge cases: most blocks are near the line the fast path draws."""
    pseudo = draw(st.permutations(_PSEUDO))
    if draw(st.booleans()):
        pseudo = [field for field in pseudo if field[0] != b":authority"]
    regular = draw(st.lists(st.tuples(_GOOD_NAMES, _GOOD_VALUES), max_size=5))
    block = [*pseudo, *regular]
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(block)))
        field = (draw(_NAMES), draw(_VALUES))
        if at < len(block) and draw(st.booleans()):
            block[at] = field
        else:
            block.insert(at, field)
    return block


@settings(max_examples=1000, derandomize=True)
@given(blocks())
def test_the_fast_path_never_accepts_what_h2_rejects(block: Block) -> None:
    if is_plain_request(block):
        assert h2_accepts(block)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(blocks(), min_size=1, max_size=8))
def test_fields_remembered_on_a_connection_never_change_a_verdict(sequence: list[Block]) -> None:
    """A connection's memory of fields already vouched for skips their byte checks only:
    every block of a sequence gets the verdict it gets alone."""
    known: set[tuple[bytes, bytes]] = set()
    for block in sequence:
        assert is_plain_request(block, known) == is_plain_request(block)
    assert all(name != b"host" for name, _ in known)


@settings(max_examples=1000, derandomize=True)
@given(blocks())
def test_the_fast_path_splits_as_the_slow_path_does(block: Block) -> None:
    head = plain_request(block)
    if head is not None:
        assert head == split_request(block)


@settings(derandomize=True, max_examples=300, deadline=None)
@given(st.lists(blocks(), min_size=1, max_size=8))
def test_remembered_fields_never_change_a_split(sequence: list[Block]) -> None:
    known: set[tuple[bytes, bytes]] = set()
    for block in sequence:
        assert plain_request(block, known) == plain_request(block)
    assert not {name for name, _ in known} & {b"host", b"cookie", b"content-length"}


def test_the_split_joins_cookies_and_names_the_host() -> None:
    block = [*H2LOAD, (b"cookie", b"a=1"), (b"x-request-id", b"abc"), (b"cookie", b"b=2")]
    method, path, fields, length, request_id = read_request(block, set())
    assert (method, path, length, request_id) == (
        b"POST",
        b"/v1/chat/completions",
        b"88",
        b"abc",
    )
    assert fields[-2:] == [(b"cookie", b"a=1; b=2"), (b"host", b"127.0.0.1:4003")]
    # Legal but not plain (te: trailers): h2 vouches, the slow split gives the same view.
    assert read_request([*block, (b"te", b"trailers")])[2][-2:] == fields[-2:]
