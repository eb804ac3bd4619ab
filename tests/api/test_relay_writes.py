"""How the Messages and Responses relays (api/anthropic.py, api/responses.py) write a
stream: the head goes out with the first frames (``start_with``: one write on HTTP/1.1),
then each batch as it comes; a stream that fails after its start ends in-band. A recording
responder stands in for the connection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import attrs

from runestone_proxy.api import anthropic, responses
from runestone_proxy.api.http import HeaderList
from runestone_proxy.errors import UpstreamError
from runestone_proxy.gateway.conversation import Turn
from runestone_proxy.gateway.routing import Target
from runestone_proxy.gateway.service_stream import Stream


@attrs.define(eq=False)
class Recorder:
    calls: list[tuple[Any, ...]] = attrs.Factory(list)
    started: bool = False

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        raise AssertionError("a stream is not a whole answer")

    async def start(self, status: int, headers: HeaderList) -> None:
        self.started = True
        self.calls.append(("start", status))

    async def start_with(self, status: int, headers: HeaderList, first: bytes) -> None:
        self.started = True
        self.calls.append(("start_with", status, first))

    async def send(self, data: bytes) -> None:
        self.calls.append(("send", data))


def stream(
    first: list[bytes] | None, *rest: list[bytes] | Exception, final: bytes | None = None
) -> Stream:
    left = list(rest)

    async def next_() -> list[bytes] | None:
        if not left:
            return None
        item = left.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    committed = cast(
        Any, attrs.make_class("Committed", ["stream"])(attrs.make_class("S", ["final"])(final))
    )
    return Stream(Target("p", "m", "m"), "explicit", (), first, next_, committed)


async def test_a_messages_stream_starts_with_its_first_frames() -> None:
    rec = Recorder()
    await anthropic.relay(rec, stream([b"a", b"b"], [b"c"], [b"d", b"e"]), None)
    assert rec.calls == [("start_with", 200, b"ab"), ("send", b"c"), ("send", b"de")]


async def test_a_messages_stream_that_fails_later_ends_with_an_error_frame() -> None:
    rec = Recorder()
    await anthropic.relay(rec, stream([b"a"], UpstreamError("the provider went away")), None)
    assert rec.calls[0] == ("start_with", 200, b"a")
    ((kind, frame),) = rec.calls[1:]
    assert kind == "send"
    assert frame.startswith(b"event: error\n")


async def test_an_empty_messages_stream_still_starts() -> None:
    rec = Recorder()
    await anthropic.relay(rec, stream(None), None)
    assert rec.calls == [("start_with", 200, b"")]


def keeper() -> tuple[list[bytes | None], Callable[[bytes | None], Awaitable[None]]]:
    kept: list[bytes | None] = []

    async def keep(final: bytes | None) -> None:
        kept.append(final)

    return kept, keep


async def test_a_responses_stream_keeps_the_answer_before_its_terminal_batch_goes() -> None:
    rec = Recorder()
    kept, keep = keeper()
    await responses.relay(rec, stream([b"x", b"y"], final=b"{}"), keep, Turn([]))
    assert kept == [b"{}"]
    assert rec.calls == [("start_with", 200, b"xy")]


async def test_a_responses_stream_with_no_frames_starts_and_one_that_fails_ends_in_band() -> None:
    rec = Recorder()
    _, keep = keeper()
    await responses.relay(rec, stream(None), keep, Turn([]))
    assert rec.calls == [("start", 200)]
    rec = Recorder()
    await responses.relay(rec, stream([b"x"], [b"y"], UpstreamError("gone")), keep, Turn([]))
    assert rec.calls[:2] == [("start_with", 200, b"x"), ("send", b"y")]
    ((kind, frame),) = rec.calls[2:]
    assert kind == "send"
    assert b"error" in frame
