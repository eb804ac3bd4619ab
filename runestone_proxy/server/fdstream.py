"""The raw-fd fast path shared by the listener's HTTP/1.1 connections and the upstream pool.

Both sides hold a trio stream and, when it is a plain ``SocketStream`` (not TLS), its fd.
On such a socket, ``os.read``/``os.write`` straight on the fd skip what trio adds per call
(a conflict detector and a generic non-blocking helper): a write usually goes out whole at
once, and only what the kernel refused goes through trio; a read takes what is there and
waits with ``wait_readable`` only when nothing is. One reader and one writer at a time are
the connections' own rule, and ``wait_readable`` still refuses a second waiter.

:class:`FdStream` is a mixin with no state of its own: the connection classes
(:class:`~runestone_proxy.server.h1conn.H1Connection`,
:class:`~runestone_proxy.server.upstream_h11.H11Connection`) declare ``stream`` and ``fd``
as fields and inherit these methods, so a read or write costs the same one method call it
cost when each class had its own copy. The two sides differ only in what a lost
connection means, which is the :meth:`FdStream.lost` hook (called on errors alone), and in
how a write the kernel refused is bounded, which is :meth:`FdStream.send_rest`.
"""

from __future__ import annotations

import os

import trio

#: The most one read takes.
READ_BYTES = 65536


class FdStream:
    """A trio stream with a direct non-blocking path on its fd (``fd`` is -1 for TLS)."""

    __slots__ = ()

    stream: trio.abc.Stream
    fd: int

    def lost(self, exc: Exception) -> bytes:
        """What a read that failed (a reset, or the socket closed under a waiting read)
        returns: the listener reads it as EOF (``b""``); the default raises, mapping an
        ``OSError`` to ``trio.BrokenResourceError`` as trio's own streams do."""
        if isinstance(exc, OSError):
            raise trio.BrokenResourceError(str(exc)) from exc
        raise exc

    def read_ready(self) -> bytes | None:
        """What a cleartext socket already holds (``b""`` at EOF), or None if a read would
        block. No checkpoint: the caller decides when to yield."""
        try:
            return os.read(self.fd, READ_BYTES)
        except BlockingIOError:
            return None
        except OSError as exc:
            return self.lost(exc)

    async def receive(self, *, waiting: bool = False) -> bytes:
        """The next bytes, ``b""`` at EOF (a failure: see :meth:`lost`). ``waiting``: the
        caller knows nothing is there yet (a request just sent, a client still reading its
        answer), so wait for readiness first rather than pay a read that fails."""
        fd = self.fd
        if fd < 0:
            try:
                data = await self.stream.receive_some(READ_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                return self.lost(exc)
            return data if type(data) is bytes else bytes(data)
        if not waiting:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                pass
            except OSError as exc:
                return self.lost(exc)
            else:
                await trio.lowlevel.checkpoint()  # bytes were waiting: let others run too
                return data
        while True:
            try:
                await trio.lowlevel.wait_readable(fd)
            except trio.ClosedResourceError as exc:
                return self.lost(exc)
            try:
                return os.read(fd, READ_BYTES)
            except BlockingIOError:
                continue
            except OSError as exc:
                return self.lost(exc)

    async def send_all(self, data: bytes) -> None:
        """Write all of ``data``: on cleartext straight to the fd, and only what the kernel
        refused through :meth:`send_rest`. A reset is left for trio to raise there, as its
        own ``BrokenResourceError``."""
        fd = self.fd
        if fd >= 0:
            try:
                sent = os.write(fd, data)
            except OSError:  # BlockingIOError, or a reset: trio raises its own below
                sent = 0
            if sent == len(data):
                return
            data = data[sent:]
        await self.send_rest(data)

    async def send_rest(self, data: bytes) -> None:
        """The bytes the fast path could not write, or all of them on TLS."""
        await self.stream.send_all(data)
