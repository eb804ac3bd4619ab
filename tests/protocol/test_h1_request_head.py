"""The upstream request head written without h11's serialiser (protocol/h1.request_head)."""

from __future__ import annotations

import h11
import pytest

from runestone_proxy.protocol.h1 import request_head

HOST = b"api.example.test"


def parsed(head: bytes) -> h11.Request:
    """What a server's h11 makes of ``head``: the head must be valid HTTP/1.1."""
    server = h11.Connection(h11.SERVER)
    server.receive_data(head)
    event = server.next_event()
    assert isinstance(event, h11.Request)
    return event


def test_a_post_head_carries_host_length_and_the_callers_fields_in_order() -> None:
    headers = [(b"authorization", b"Bearer sk-test"), (b"content-type", b"application/json")]
    head = request_head("POST", b"/v1/chat/completions", HOST, headers, 42)
    assert head is not None
    event = parsed(head)
    assert (event.method, event.target) == (b"POST", b"/v1/chat/completions")
    assert list(event.headers) == [
        (b"host", HOST),
        (b"content-length", b"42"),
        (b"authorization", b"Bearer sk-test"),
        (b"content-type", b"application/json"),
    ]


def test_the_callers_framing_fields_are_dropped() -> None:
    headers = [
        (b"Host", b"elsewhere"),
        (b"Content-Length", b"9"),
        (b"transfer-encoding", b"chunked"),
        (b"connection", b"close"),
        (b"accept", b"*/*"),
    ]
    head = request_head("POST", b"/v1/x", HOST, headers, 3)
    assert head is not None
    assert list(parsed(head).headers) == [
        (b"host", HOST),
        (b"content-length", b"3"),
        (b"accept", b"*/*"),
    ]


def test_a_get_without_content_has_no_content_length() -> None:
    head = request_head("GET", b"/v1/models", HOST, [], 0)
    assert head == b"GET /v1/models HTTP/1.1\r\nhost: api.example.test\r\n\r\n"


@pytest.mark.parametrize(
    ("target", "headers"),
    [
        (b"/v1/x", [(b"x-note", b"a\r\nx-injected: 1")]),
        (b"/v1/x", [(b"x-note", b"a\nb")]),
        (b"/v1/x", [(b"x-note", b"a\rb")]),
        (b"/v1/x HTTP/1.0\r\nx-injected: 1\r\nx:", []),
        (b"/v1/a b", []),
    ],
    ids=["crlf", "bare-lf", "bare-cr", "target-crlf", "target-space"],
)
def test_anything_that_could_split_the_head_falls_back_to_h11(
    target: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    assert request_head("POST", target, HOST, headers, 0) is None
