"""Keep-alive pings for streams that go quiet: one task for all of them.

A translated Anthropic Messages stream (its provider sends no pings of its own) gets an
``event: ping`` after ``upstream.ping_interval_s`` without an event, as Anthropic's streams
do, so a client's read timeout does not fire while a slow model thinks. The pings are
written by one task that the app's nursery owns (:meth:`Pings.run`), not by a task per
stream: a stream registers a :class:`Quiet` (``pings.watch``) and writes through it.

The relay and a ping share the connection, and a socket takes one writer at a time: a ping
is written only while the relay is not writing, and the relay waits out a ping in flight
(rare: once per silent interval). So the relay's common write costs a flag, not a lock
(``trio.Lock`` yields to the scheduler on every acquire: a cost per chunk). The task wakes
every half interval while streams are watched (a ping goes out after one to one and a half
intervals of silence) and sleeps on an event while none are.
"""

from __future__ import annotations

import attrs
import trio

from runestone_proxy.api.http import Responder


@attrs.define(eq=False)
class Quiet:
    """One watched stream: its writes, and the ping written into its silences."""

    responder: Responder
    interval_s: float
    frame: bytes
    last: float = attrs.Factory(trio.current_time)
    #: A write (the relay's or a ping) is in progress.
    writing: bool = False
    #: Set once the ping in flight is written (None: no ping in flight).
    pinged: trio.Event | None = None
    #: The stream is over: no ping may start.
    closed: bool = False

    async def send(self, data: bytes) -> None:
        """The relay's write (after any ping in flight)."""
        if self.pinged is not None:
            await self.pinged.wait()
        self.writing = True
        try:
            await self.responder.send(data)
        finally:
            self.writing = False
        self.last = trio.current_time()

    async def settled(self) -> None:
        """Wait out a ping in flight (the response must not end halfway through one)."""
        if self.pinged is not None:
            await self.pinged.wait()

    async def ping(self) -> None:
        if self.closed or self.writing or self.pinged is not None:
            return
        self.writing = True
        pinged = self.pinged = trio.Event()
        try:
            await self.responder.send(self.frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away: the relay finds out on its own next write
        finally:
            self.writing = False
            self.pinged = None
            pinged.set()
        self.last = trio.current_time()


@attrs.define(eq=False)
class Pings:
    """The watched streams and the one task that pings them."""

    streams: set[Quiet] = attrs.Factory(set)
    _wake: trio.Event = attrs.Factory(trio.Event)

    def watch(self, responder: Responder, interval_s: float, frame: bytes) -> Quiet:
        quiet = Quiet(responder, interval_s, frame)
        self.streams.add(quiet)
        self._wake.set()
        return quiet

    def unwatch(self, quiet: Quiet) -> None:
        quiet.closed = True
        self.streams.discard(quiet)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Ping every watched stream that has been silent for its interval, until cancelled."""
        async with trio.open_nursery() as writes:
            task_status.started()
            while True:
                if not self.streams:
                    self._wake = trio.Event()
                    await self._wake.wait()
                    continue
                now = trio.current_time()
                tick = min(q.interval_s for q in self.streams) / 2
                for quiet in self.streams:
                    if not quiet.writing and now - quiet.last >= quiet.interval_s:
                        writes.start_soon(quiet.ping)  # one slow client delays no other
                await trio.sleep(tick)
