"""The one writer of an HTTP/2 connection: queued bytes go out in order, whole, in time.

Any task may :meth:`SerialWriter.queue` bytes (synchronously, so what h2 produced is never
held by a task that might be cancelled). :meth:`SerialWriter.run`, the connection's writer
task, sends everything queued so far in one ``send_all``: what all the streams answered in
one scheduler pass goes out in one write.

Queuing does not wait for the write. Back-pressure is :meth:`SerialWriter.wait_below`: a
task that finds more than a high-water mark unwritten waits until the writer has brought it
down, so a peer that reads slowly holds up the tasks that write to it, while the common
small answer costs its stream no wake-up at all. (Waiting for every write to land took a
park and a wake per stream event, and bought nothing: ``send_timeout_s`` bounds the writer
itself, and a broken writer stops the whole connection.)

Each send is shielded: cancelling a stream's task never cuts a frame in half, which would
corrupt every other stream on the connection (RFC 9113 §4.1). Only the send's own deadline
ends it early: ``send_timeout_s`` when the peer stops reading, or a short grace set by
:meth:`SerialWriter.cut_short` when the connection closes. A send that ends early, or fails,
leaves the writer ``broken``: nothing more may be written, and ``on_broken`` is called.

After a graceful GOAWAY the connection closes by :func:`discard_input`: a half-close, then
the client's last bytes read and dropped, so that a TCP reset cannot destroy what is still
in flight.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs
import trio

__all__ = ["SerialWriter", "discard_input"]

_READ_BYTES = 65536
_LINGER_BYTES = 1 << 20


@attrs.define(eq=False)
class SerialWriter:
    stream: trio.abc.Stream
    send_timeout_s: float
    on_broken: Callable[[], None]
    #: The socket's fd on cleartext (a plain ``trio.SocketStream``), else -1 (TLS).
    fd: int = -1
    broken: bool = False
    _out: list[bytes] = attrs.Factory(list)
    _queued_bytes: int = 0
    _written_bytes: int = 0
    _has_output: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    _wrote: trio.lowlevel.ParkingLot = attrs.Factory(trio.lowlevel.ParkingLot)
    _scope: trio.CancelScope | None = None

    def queue(self, data: bytes, *, now: bool = False) -> None:
        """Add ``data`` to the output (the writer task sends it). ``now``: the caller knows
        no other stream will add to this write (it is the connection's only stream), so
        on cleartext, with nothing queued before it, it goes to the socket at once, without
        waking the writer task; what the kernel does not take is queued as usual."""
        if not data:
            return
        if now and not self._out and self.fd >= 0 and not self.broken:
            try:
                sent = os.write(self.fd, data)
            except OSError:  # BlockingIOError, or a reset: the writer task finds out
                sent = 0
            self._queued_bytes += sent
            self._written_bytes += sent
            if sent == len(data):
                return
            data = data[sent:]
        if data:
            self._out.append(data)
            self._queued_bytes += len(data)
            if self._has_output:  # the writer is parked (unpark_all costs even when it is not)
                self._has_output.unpark_all()

    @property
    def backlog(self) -> int:
        """Bytes queued and not yet on the wire."""
        return self._queued_bytes - self._written_bytes

    async def wait_below(self, limit: int) -> None:
        """Return once at most ``limit`` queued bytes are still unwritten (no checkpoint if
        that is already so: the caller yields at its own next wait)."""
        while self._queued_bytes - self._written_bytes > limit:
            await self._wrote.park()

    async def run(self) -> None:
        """The writer task. Returns when the writer breaks; cancel it to stop it."""
        while True:
            while not self._out:
                await self._has_output.park()
            count = len(self._out)
            data = b"".join(self._out) if count > 1 else self._out[0]
            size = len(data)
            if self.fd >= 0:
                # Cleartext: straight to the socket, as FdStream does for HTTP/1.1; only what
                # the kernel refused takes the shielded, bounded send below.
                try:
                    sent = os.write(self.fd, data)
                except OSError:  # BlockingIOError, or a reset: trio raises its own below
                    sent = 0
                if sent == size:
                    self._sent(count, size)
                    continue
                data = data[sent:]
            failed = False
            deadline = trio.current_time() + self.send_timeout_s
            with trio.CancelScope(shield=True, deadline=deadline) as scope:
                self._scope = scope
                try:
                    await self.stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    failed = True
            self._scope = None
            if failed or scope.cancelled_caught:
                self.broken = True
                self.on_broken()
                return
            self._sent(count, size)

    def _sent(self, count: int, size: int) -> None:
        del self._out[:count]
        self._written_bytes += size
        if self._wrote:
            self._wrote.unpark_all()

    def cut_short(self, grace_s: float) -> None:
        """The connection is closing: give the send in flight at most ``grace_s`` more."""
        if self._scope is not None:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + grace_s)

    async def send_rest(self) -> None:
        """Once :meth:`run` is over: send what is still queued (the closing GOAWAY)."""
        if self._out and not self.broken:
            data, self._out = b"".join(self._out), []
            try:
                await self.stream.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self.broken = True


async def discard_input(stream: trio.abc.Stream) -> None:
    """Half-close ``stream``, then read and drop what the peer still sends (at most
    ``_LINGER_BYTES``) until it closes; the caller bounds the time."""
    try:
        if isinstance(stream, trio.abc.HalfCloseableStream):
            await stream.send_eof()
        received = 0
        while received < _LINGER_BYTES:
            data = await stream.receive_some(_READ_BYTES)
            if not data:
                return
            received += len(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
