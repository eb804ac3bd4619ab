"""The ping task (api/pings.py) on a mock clock: pings go into silences only, never into
a write in progress, never after the stream is over; one task serves every stream."""

from __future__ import annotations

import attrs
import pytest
import trio
import trio.testing

from runestone_proxy.api.http import HeaderList
from runestone_proxy.api.pings import Pings

PING = b"event: ping\n\n"


@attrs.define(eq=False)
class Recorder:
    """A responder that records writes; ``gate`` (if set) holds each write until set."""

    writes: list[tuple[float, bytes]] = attrs.Factory(list)
    gate: trio.Event | None = None
    writing: int = 0
    overlapped: bool = False

    @property
    def started(self) -> bool:
        return True

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        raise AssertionError("not used")

    async def start(self, status: int, headers: HeaderList) -> None:
        raise AssertionError("not used")

    async def send(self, data: bytes) -> None:
        self.writing += 1
        self.overlapped |= self.writing > 1
        try:
            if self.gate is not None:
                await self.gate.wait()
            await trio.lowlevel.checkpoint()
            self.writes.append((trio.current_time(), data))
        finally:
            self.writing -= 1


@pytest.fixture
def clock() -> trio.testing.MockClock:
    return trio.testing.MockClock(autojump_threshold=0)


async def test_a_silence_gets_pings_and_writes_reset_the_clock(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    pings = Pings()
    await nursery.start(pings.run)
    responder = Recorder()
    quiet = pings.watch(responder, 10.0, PING)
    await trio.sleep(9.0)
    await quiet.send(b"chunk")  # at 9 s: no ping yet
    await trio.sleep(12.0)  # silent from 9 s to 21 s: one ping between 19 and 24 s
    pings.unwatch(quiet)
    await trio.sleep(30.0)  # over: nothing more
    kinds = [(round(t), d) for t, d in responder.writes]
    assert kinds[0] == (9, b"chunk")
    assert [d for _, d in kinds[1:]] == [PING]
    assert 19 <= kinds[1][0] <= 24


async def test_a_ping_never_overlaps_a_write_and_the_relay_waits_out_a_ping(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    pings = Pings()
    await nursery.start(pings.run)
    responder = Recorder(gate=trio.Event())
    quiet = pings.watch(responder, 1.0, PING)
    await trio.sleep(1.6)  # a ping has started and is held by the gate
    assert quiet.pinged is not None
    async with trio.open_nursery() as inner:
        inner.start_soon(quiet.send, b"chunk")  # must wait for the ping
        await trio.sleep(0.1)
        assert [d for _, d in responder.writes] == []
        responder.gate.set()  # type: ignore[union-attr]
    await quiet.settled()
    pings.unwatch(quiet)
    assert [d for _, d in responder.writes] == [PING, b"chunk"]
    assert not responder.overlapped


async def test_a_long_write_is_not_a_silence(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    pings = Pings()
    await nursery.start(pings.run)
    responder = Recorder(gate=trio.Event())
    quiet = pings.watch(responder, 1.0, PING)
    async with trio.open_nursery() as inner:
        inner.start_soon(quiet.send, b"slow")  # a slow reader holds this write for 5 s
        await trio.sleep(5.0)
        responder.gate.set()  # type: ignore[union-attr]
    pings.unwatch(quiet)
    assert [d for _, d in responder.writes] == [b"slow"]
    assert not responder.overlapped


async def test_one_task_serves_many_streams(
    nursery: trio.Nursery, clock: trio.testing.MockClock
) -> None:
    pings = Pings()
    await nursery.start(pings.run)
    responders = [Recorder() for _ in range(50)]
    quiets = [pings.watch(r, 2.0, PING) for r in responders]
    await trio.sleep(2.5)
    for quiet in quiets:
        pings.unwatch(quiet)
    assert all([d for _, d in r.writes] == [PING] for r in responders)
    assert not pings.streams
