"""The SSE parser and encoder, fed bytes and checked against the WHATWG rules.

https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation
No sockets, no event loop: bytes in, events out.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.protocol.sse import (
    DONE,
    SSEError,
    SSEEvent,
    SSEParser,
    encode_comment,
    encode_data,
    encode_event,
)

DATA = Path(__file__).parent.parent / "data" / "openai"

#: A stream exercising the awkward corners: BOM, CRLF, bare CR, comments, id-only and
#: retry-only blocks, a named event, multi-line data, ``data`` without a space or a colon,
#: an id reset, multibyte UTF-8.
MIXED = (
    b"\xef\xbb\xbf"
    b": keep-alive\r\n\r\n"
    b"id: 1\r\n\r\n"
    b"retry: 3000\r\n\r\n"
    b'event: ping\r\ndata: {"a":1}\r\n\r\n'
    b"data:first\rdata: second\r\r"
    b"unknown: field\ndata\n\n"
    b"id\n"
    b"data: caf\xc3\xa9 \xe2\x9c\x93\n\n"
    b": OPENROUTER PROCESSING\n\n"
    b"data: [DONE]\n\n"
)
MIXED_EVENTS = [
    SSEEvent(data=b'{"a":1}', event="ping", id="1"),
    SSEEvent(data=b"first\nsecond", id="1"),
    SSEEvent(data=b"", id="1"),
    SSEEvent(data="café ✓".encode()),
    SSEEvent(data=b"[DONE]"),
]


def parse(*chunks: bytes) -> tuple[list[SSEEvent], SSEParser]:
    parser = SSEParser()
    events = [event for chunk in chunks for event in parser.feed(chunk)]
    events += parser.close()
    return events, parser


def recorded(name: str) -> bytes:
    return (DATA / name).read_bytes()


# -- the spec's rules, one at a time --------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "expected"),
    [
        (b"data: hello\n\n", [SSEEvent(b"hello")]),
        (b"data:hello\n\n", [SSEEvent(b"hello")]),  # the space is optional
        (b"data:  two spaces\n\n", [SSEEvent(b" two spaces")]),  # only one space is removed
        (b"data: a\ndata: b\n\n", [SSEEvent(b"a\nb")]),
        (b"data: a\r\ndata: b\r\n\r\n", [SSEEvent(b"a\nb")]),
        (b"data: a\rdata: b\r\r", [SSEEvent(b"a\nb")]),
        (b"data\n\n", [SSEEvent(b"")]),  # a field name alone has an empty value
        (b"data:\n\n", [SSEEvent(b"")]),
        (b"data: x:y: z\n\n", [SSEEvent(b"x:y: z")]),  # split at the first colon only
        (b"event: ping\ndata: 1\n\n", [SSEEvent(b"1", event="ping")]),
        (b"event:\ndata: 1\n\n", [SSEEvent(b"1")]),  # empty type -> "message"
        (b"event: only\n\n", []),  # no data: not dispatched
        (b"id: 7\n\n", []),
        (b"retry: 10\n\n", []),
        (b": comment\n\n", []),
        (b"foo: bar\ndata: 1\n\n", [SSEEvent(b"1")]),  # unknown fields are ignored
        (b"DATA: 1\n\n", []),  # field names are case-sensitive
        (b"data: 1\n\n\n\n", [SSEEvent(b"1")]),  # extra blank lines dispatch nothing
    ],
)
def test_field_rules(stream: bytes, expected: list[SSEEvent]) -> None:
    assert parse(stream)[0] == expected


def test_last_event_id_persists_and_resets() -> None:
    events, parser = parse(b"id: 1\n\ndata: a\n\ndata: b\nid: 2\n\nid\ndata: c\n\n")
    assert [(e.data, e.id) for e in events] == [(b"a", "1"), (b"b", "2"), (b"c", None)]
    assert parser.last_event_id is None


def test_id_with_nul_is_ignored() -> None:
    events, _ = parse(b"id: 1\n\nid: a\x00b\ndata: x\n\n")
    assert events == [SSEEvent(b"x", id="1")]


@pytest.mark.parametrize(
    ("line", "retry"), [(b"retry: 250", 250), (b"retry: 2.5", None), (b"retry: -1", None)]
)
def test_retry_needs_ascii_digits(line: bytes, retry: int | None) -> None:
    events, parser = parse(line + b"\ndata: x\n\n")
    assert events == [SSEEvent(b"x", retry=retry)]
    assert parser.retry == retry


def test_retry_only_block_sets_the_reconnection_time() -> None:
    events, parser = parse(b"retry: 3000\n\ndata: x\n\n")
    assert events == [SSEEvent(b"x")]  # retry belongs to the block it came in
    assert parser.retry == 3000


def test_comments_are_counted() -> None:
    events, parser = parse(b": one\n:two\n\n:\ndata: x\n\n")
    assert events == [SSEEvent(b"x")]
    assert parser.comments == 3


@pytest.mark.parametrize(
    "chunks",
    [
        [b"\xef\xbb\xbfdata: x\n\n"],
        [b"\xef", b"\xbb", b"\xbfdata: x\n\n"],
        [b"\xef\xbb", b"\xbf", b"data: x\n\n"],
        [b"", b"\xef\xbb\xbf", b"", b"data: x\n\n"],
    ],
)
def test_leading_bom_is_stripped_even_when_split(chunks: list[bytes]) -> None:
    assert parse(*chunks)[0] == [SSEEvent(b"x")]


def test_only_one_leading_bom_is_stripped() -> None:
    # The second BOM is part of a field name ("\ufeffdata"), which is unknown: ignored.
    events, _ = parse(b"\xef\xbb\xbf\xef\xbb\xbfdata: x\n\ndata: y\n\n")
    assert events == [SSEEvent(b"y")]


def test_bom_like_prefix_that_is_not_a_bom_is_kept() -> None:
    events, _ = parse(b"\xef", b"\xbbdata: x\n\ndata: y\n\n")
    assert events == [SSEEvent(b"y")]


def test_crlf_split_across_feeds_is_one_line_end() -> None:
    # "\r" ends one feed, "\n" starts the next: one line end, so no blank line in between.
    events, _ = parse(b"data: a\r", b"\ndata: b\r", b"\n\r", b"\n")
    assert events == [SSEEvent(b"a\nb")]


def test_cr_then_cr_is_two_line_ends() -> None:
    assert parse(b"data: a\r", b"\r")[0] == [SSEEvent(b"a")]


def test_utf8_split_inside_a_character() -> None:
    text = "héllo ✓ 😀".encode()
    stream = b"event: \xc3\xa9v\ndata: " + text + b"\n\n"
    for cut in range(len(stream) + 1):
        events, _ = parse(stream[:cut], stream[cut:])
        assert events == [SSEEvent(text, event="év")]


# -- end of stream --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "truncated"),
    [
        (b"data: a\n\n", False),
        (b"", False),
        (b"data: a\n\n: keep-alive", False),  # a cut comment loses nothing
        (b"data: a\n\nid: 3\n", False),  # nothing that would dispatch was pending
        (b"data: a\n\ndata: b\n", True),  # the spec discards this event
        (b"data: a\n\ndata: b", True),
        (b"data: a\n\nda", True),
        (b"\xef\xbb", True),
    ],
)
def test_close_discards_and_flags_an_incomplete_event(stream: bytes, truncated: bool) -> None:
    parser = SSEParser()
    events = parser.feed(stream)
    assert parser.close() == []
    assert parser.truncated is truncated
    assert [e.data for e in events] == ([b"a"] if stream.startswith(b"data: a") else [])


def test_close_is_idempotent_and_feed_after_close_fails() -> None:
    parser = SSEParser()
    parser.feed(b"data: a\n")
    parser.close()
    assert parser.close() == []
    assert parser.truncated
    with pytest.raises(SSEError):
        parser.feed(b"\n")


# -- memory guard ---------------------------------------------------------------------------


def test_event_larger_than_limit_fails() -> None:
    parser = SSEParser(max_event_bytes=100)
    with pytest.raises(SSEError):
        parser.feed(b"data: " + b"x" * 60 + b"\ndata: " + b"y" * 60 + b"\n")


def test_unterminated_line_larger_than_limit_fails_even_in_small_pieces() -> None:
    parser = SSEParser(max_event_bytes=100)
    parser.feed(b"data: ")
    for _ in range(9):
        parser.feed(b"x" * 10)
    with pytest.raises(SSEError):
        parser.feed(b"x" * 10)


def test_limit_applies_per_event_not_per_stream() -> None:
    parser = SSEParser(max_event_bytes=100)
    events = []
    for _ in range(50):
        events += parser.feed(b"data: " + b"x" * 80 + b"\n\n")
    assert len(events) == 50


def test_large_event_fed_byte_by_byte() -> None:
    payload = b"z" * 50_000
    parser = SSEParser()
    stream = b"data: " + payload + b"\n\n"
    events = [e for i in range(len(stream)) for e in parser.feed(stream[i : i + 1])]
    assert events == [SSEEvent(payload)]


# -- recorded streams, any chunking ---------------------------------------------------------


def test_mixed_stream() -> None:
    events, parser = parse(MIXED)
    assert events == MIXED_EVENTS
    assert parser.comments == 2
    assert parser.retry == 3000
    assert not parser.truncated


def test_recorded_openai_stream() -> None:
    events, parser = parse(recorded("stream_tools.sse"))
    assert len(events) == 17
    assert events[-1] == SSEEvent(b"[DONE]")
    assert all(e.data.startswith(b'{"id":"chatcmpl-') for e in events[:-1])
    assert not parser.truncated


def test_recorded_openrouter_stream_counts_keepalives() -> None:
    events, parser = parse(recorded("openrouter_stream_error.sse"))
    assert parser.comments == 3
    assert len(events) == 3


STREAMS = {
    "stream_tools": recorded("stream_tools.sse"),
    "groq": recorded("groq_stream.sse"),
    "openrouter": recorded("openrouter_stream_error.sse"),
    "mixed": MIXED,
    "mixed_crlf_everywhere": MIXED.replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n"),
}


def rechunk(stream: bytes, cuts: list[int]) -> list[bytes]:
    bounds = [0, *sorted(set(cuts)), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


@pytest.mark.parametrize("name", sorted(STREAMS))
@settings(derandomize=True, max_examples=150, deadline=None)
@given(data=st.data())
def test_any_rechunking_yields_the_same_events(name: str, data: st.DataObject) -> None:
    stream = STREAMS[name]
    expected, whole = parse(stream)
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=40), label="cuts")
    events, parser = parse(*rechunk(stream, cuts))
    assert events == expected
    assert (parser.comments, parser.last_event_id, parser.retry, parser.truncated) == (
        whole.comments,
        whole.last_event_id,
        whole.retry,
        whole.truncated,
    )


@pytest.mark.parametrize("name", sorted(STREAMS))
def test_byte_at_a_time_yields_the_same_events(name: str) -> None:
    stream = STREAMS[name]
    one_by_one = [stream[i : i + 1] for i in range(len(stream))]
    assert parse(*one_by_one)[0] == parse(stream)[0]


# -- encoder --------------------------------------------------------------------------------


def test_encode_data() -> None:
    assert encode_data(b'{"a":1}') == b'data: {"a":1}\n\n'
    assert DONE == b"data: [DONE]\n\n"
    assert encode_comment("keep-alive") == b": keep-alive\n\n"


@pytest.mark.parametrize(
    ("payload", "framed"),
    [
        (b"a\nb", b"data: a\ndata: b\n\n"),
        (b"a\r\nb", b"data: a\ndata: b\n\n"),
        (b"a\n", b"data: a\ndata: \n\n"),
        (b"", b"data: \n\n"),
    ],
)
def test_encode_data_splits_lines(payload: bytes, framed: bytes) -> None:
    assert encode_data(payload) == framed


def test_encode_comment_splits_lines() -> None:
    assert encode_comment("a\nb") == b": a\n: b\n\n"
    assert parse(encode_comment("a\nb"))[0] == []


@settings(derandomize=True, max_examples=200)
@given(
    data=st.binary().map(lambda b: b.replace(b"\r", b"")),
    event=st.sampled_from(["message", "ping", "ëvent"]),
    id_=st.none() | st.text(st.characters(blacklist_characters="\r\n\x00"), min_size=1),
    retry=st.none() | st.integers(0, 10**6),
)
def test_encode_event_round_trips(
    data: bytes, event: str, id_: str | None, retry: int | None
) -> None:
    sent = SSEEvent(data, event=event, id=id_, retry=retry)
    assert parse(encode_event(sent))[0] == [sent]


def test_encode_event_rejects_multiline_fields() -> None:
    with pytest.raises(ValueError, match="one line"):
        encode_event(SSEEvent(b"x", event="a\nb"))


def test_a_canonical_event_fed_whole_keeps_what_came_before_it() -> None:
    """One ``data: ...\\n\\n`` per feed takes a shortcut; pending fields still apply."""
    parser = SSEParser()
    assert parser.feed(b'data: {"a":1}\n\n') == [SSEEvent(b'{"a":1}')]
    assert parser.feed(b"id: 7\nevent: delta\nretry: 5\n") == []
    assert parser.feed(b"data: x\n\n") == [SSEEvent(b"x", "delta", "7", 5)]
    assert parser.feed(b"data: y\n\n") == [SSEEvent(b"y", "message", "7")]
    assert parser.feed(b"data: par") == []
    assert parser.feed(b"data: t\n\n") == [SSEEvent(b"pardata: t", id="7")]
    assert parser.feed(b"data: a\rdata: b\n\n") == [SSEEvent(b"a\nb", id="7")]
    small = SSEParser(max_event_bytes=4)
    with pytest.raises(SSEError):
        small.feed(b"data: 12345\n\n")
