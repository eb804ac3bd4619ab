"""protocol/h1: the response head writer, the request head checks and the phase table.

Plain data, no I/O: heads are fed to an h11 peer, which must parse them into exactly the
fields written; header values are open-ended, so hypothesis tries them. The request head
writer's own tests are in ``test_h1_request_head.py``.
"""

from __future__ import annotations

import h11
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy import errors
from runestone_proxy.config import LimitsConfig
from runestone_proxy.protocol.h1 import (
    LAST_CHUNK,
    TIMEOUT_STATUS,
    TRANSITIONS,
    Phase,
    PhaseEvent,
    allowed,
    check_request_head,
    request_error,
    request_head,
    response_head,
    sent_request,
)

LENGTH_3 = b"content-length: 3\r\n"
CHUNKED = b"transfer-encoding: chunked\r\n"
LIMITS = LimitsConfig(max_request_line_bytes=64, max_header_bytes=128, max_body_bytes=1000)
HOST = b"api.example.test"


def client_reads(head: bytes, body: bytes = b"") -> tuple[h11.Response, bytes]:
    """What a client's h11 makes of a response: the head event and the body."""
    client = h11.Connection(h11.CLIENT)
    client.send(h11.Request(method="GET", target="/", headers=[("host", "x")]))
    client.send(h11.EndOfMessage())
    client.receive_data(head + body)
    response = client.next_event()
    assert isinstance(response, h11.Response)
    data = b""
    while isinstance(event := client.next_event(), h11.Data):
        data += event.data
    return response, data


# --- response_head ----------------------------------------------------------------------------


def test_a_response_head_carries_the_fields_request_id_and_length_in_order() -> None:
    headers = [(b"content-type", b"application/json"), (b"x-runestone-provider", b"mock")]
    head = response_head(200, headers, "req-1", LENGTH_3, closes=False)
    assert head is not None
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    response, body = client_reads(head, b"abc")
    assert response.status_code == 200
    assert list(response.headers) == [
        *headers,
        (b"x-request-id", b"req-1"),
        (b"content-length", b"3"),
    ]
    assert body == b"abc"


def test_a_closing_response_says_so() -> None:
    head = response_head(503, [], "r", LENGTH_3, closes=True)
    assert head is not None
    response, _ = client_reads(head, b"abc")
    assert (b"connection", b"close") in list(response.headers)
    assert response.reason == b"Service Unavailable"


def test_a_chunked_head_frames_the_body_in_chunks() -> None:
    head = response_head(200, [], "r", CHUNKED, closes=False)
    assert head is not None
    _, body = client_reads(head, b"3\r\nabc\r\n" + LAST_CHUNK)
    assert body == b"abc"


def test_an_unknown_status_gets_an_empty_reason() -> None:
    head = response_head(299, [], "r", LENGTH_3, closes=False)
    assert head is not None
    assert head.startswith(b"HTTP/1.1 299 \r\n")


@pytest.mark.parametrize("status", [100, 101, 204, 304])
def test_informational_and_bodyless_statuses_are_left_to_h11(status: int) -> None:
    assert response_head(status, [], "r", LENGTH_3, closes=False) is None


@pytest.mark.parametrize(
    ("headers", "request_id"),
    [
        ([(b"x-note", b"a\r\nx-injected: 1")], "r"),
        ([(b"x-note", b"a\nb")], "r"),
        ([(b"x-note", b"a\rb")], "r"),
        ([], "r\r\nx-injected: 1"),
    ],
    ids=["crlf", "bare-lf", "bare-cr", "request-id"],
)
def test_a_line_break_in_any_value_is_left_to_h11(
    headers: list[tuple[bytes, bytes]], request_id: str
) -> None:
    assert response_head(200, headers, request_id, LENGTH_3, closes=False) is None


# h11's field grammar (RFC 9110 §5.5): a visible value, no surrounding whitespace.
_NAME = st.from_regex(rb"\A[a-z][a-z0-9-]{0,15}\Z").filter(
    lambda n: n not in (b"content-length", b"transfer-encoding", b"connection", b"x-request-id")
)
_VALUE = st.binary(max_size=24)


def has_control_byte(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a value holds a byte h11's field grammar refuses (a control other than HTAB)."""
    return any((b < 0x20 and b != 0x09) or b == 0x7F for _, v in headers for b in v)


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(_NAME, _VALUE), max_size=4))
def test_a_response_head_is_none_or_parses_to_exactly_its_fields(
    headers: list[tuple[bytes, bytes]],
) -> None:
    head = response_head(200, headers, "r", LENGTH_3, closes=False)
    if head is None:
        # Only a line break inside a value sends a head to h11.
        assert any(b"\r" in v or b"\n" in v for _, v in headers)
        return
    try:
        response, _ = client_reads(head, b"abc")
    except h11.RemoteProtocolError:
        # A value h11 refuses (a NUL, say): no line was split, the peer refuses the whole
        # head. Never a field that was not written.
        assert has_control_byte(headers)
        return
    fields = list(response.headers)
    assert fields[: len(headers)] == [(n, v.strip(b" \t")) for n, v in headers]
    assert fields[len(headers) :] == [(b"x-request-id", b"r"), (b"content-length", b"3")]


@settings(max_examples=300, deadline=None)
@given(headers=st.lists(st.tuples(_NAME, _VALUE), max_size=4), length=st.integers(0, 99))
def test_a_request_head_never_carries_a_field_it_was_not_given(
    headers: list[tuple[bytes, bytes]], length: int
) -> None:
    head = request_head("POST", b"/v1/x", HOST, headers, length)
    if head is None:
        assert any(b"\r" in v or b"\n" in v for _, v in headers)
        return
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    try:
        event = server.next_event()
    except h11.RemoteProtocolError:
        assert has_control_byte(headers)
        return
    assert isinstance(event, h11.Request)
    assert list(event.headers) == [
        (b"host", HOST),
        (b"content-length", b"%d" % length),
        *[(n, v.strip(b" \t")) for n, v in headers],
    ]


def test_the_stand_in_request_leaves_h11_done_and_knowing_the_method() -> None:
    client = h11.Connection(h11.CLIENT)
    assert client.send(sent_request("HEAD")) is not None
    client.send(h11.EndOfMessage())
    assert client.our_state is h11.DONE
    client.receive_data(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n")
    assert isinstance(client.next_event(), h11.Response)
    assert isinstance(client.next_event(), h11.EndOfMessage)  # HEAD: no body, whatever the length
    assert sent_request("HEAD") is sent_request("HEAD")


# --- head checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("target", "headers", "expected"),
    [
        (b"/ok", [(b"host", b"x")], None),
        (b"/" + b"a" * 64, [], errors.URITooLong),
        (b"/", [(b"x-big", b"v" * 124)], errors.HeaderFieldsTooLarge),
        (b"/", [(b"x-fits", b"v" * 118)], None),
        (
            b"/",
            [(b"content-length", b"3"), (b"transfer-encoding", b"chunked")],
            errors.BadRequest,
        ),
        (b"/", [(b"content-length", b"1001")], errors.PayloadTooLarge),
        (b"/", [(b"content-length", b"1000")], None),
        (b"/", [(b"transfer-encoding", b"chunked")], None),
    ],
    ids=["fine", "uri", "fields", "fields-at-limit", "smuggling", "body", "body-at-limit", "te"],
)
def test_check_request_head(
    target: bytes, headers: list[tuple[bytes, bytes]], expected: type[errors.GatewayError] | None
) -> None:
    problem = check_request_head(target, headers, LIMITS)
    if expected is None:
        assert problem is None
    else:
        assert type(problem) is expected


def parse_error(data: bytes) -> h11.RemoteProtocolError:
    server = h11.Connection(h11.SERVER, max_incomplete_event_size=100)
    server.receive_data(data)
    with pytest.raises(h11.RemoteProtocolError) as caught:
        server.next_event()
    return caught.value


@pytest.mark.parametrize(
    ("data", "status", "code"),
    [
        (b"GET /" + b"a" * 200, 414, None),
        (b"GET / HTTP/1.1\r\nx: " + b"v" * 200, 431, None),
        (b"NOT HTTP\r\n\r\n", 400, "bad_request"),
        (b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: gzip\r\n\r\n", None, "not_implemented"),
    ],
    ids=["line", "fields", "garbage", "coding"],
)
def test_request_error_maps_h11s_hint(data: bytes, status: int | None, code: str | None) -> None:
    exc = parse_error(data)
    answer = request_error(exc, data, LIMITS)
    if status is not None:
        assert answer.http_status == status
    if code is not None:
        assert answer.code == code


# --- the phase table --------------------------------------------------------------------------


def test_every_phase_is_reachable_and_left_from_idle() -> None:
    reached = {Phase.IDLE}
    while True:
        more = {after for (before, _), after in TRANSITIONS.items() if before in reached}
        if more <= reached:
            break
        reached |= more
    assert reached == set(Phase)


def test_a_head_once_begun_never_goes_back_to_idle() -> None:
    assert not allowed(Phase.HEAD, Phase.IDLE)
    assert {e for (b, e) in TRANSITIONS if b is Phase.HEAD} == {PhaseEvent.HEAD_DONE}


def test_a_complete_head_always_means_a_running_handler() -> None:
    assert {a for (_, e), a in TRANSITIONS.items() if e is PhaseEvent.HEAD_DONE} == {Phase.BUSY}


def test_only_a_slow_head_is_answered_when_the_scope_fires() -> None:
    assert set(TIMEOUT_STATUS) == set(Phase)
    assert {p for p, status in TIMEOUT_STATUS.items() if status is not None} == {Phase.HEAD}
