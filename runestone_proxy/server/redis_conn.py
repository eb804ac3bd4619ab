"""One Redis connection, multiplexed: any number of tasks' commands share it, pipelined.

The shared-state backend (:mod:`.redis_limits`) sends one or two commands per request from
many request tasks at once. Rather than a pool of connections each held for one round trip
(a ``send`` and a ``recv`` per command), every caller appends its packed command to the
connection's out-buffer and its reply slot to ``pending``, then parks. One writer task sends
whatever accumulated in one ``send_all``; one reader task feeds what arrives to hiredis'
reader and hands each complete reply to the oldest pending slot (Redis answers in order). So
under load a hundred requests' commands cost one write and one read: pipelining across
requests, for free. It is what RESP allows (in-order replies on one connection) and what
multiplexing clients such as StackExchange.Redis do; blocking commands (BLPOP, ...) would
stall it, and Runestone sends none.

How this works
--------------
- :meth:`Connection.submit` is synchronous: append the bytes, append the slot, wake the
  writer if it is parked. The caller then parks in :meth:`Connection.wait` (``trio.lowlevel``
  park/reschedule: no Event, no channel). A slot expecting ``n`` replies (a pipeline) is
  woken with the list once the ``n``-th arrives.
- A caller cancelled while parked leaves its slot in ``pending`` with no task: the reply,
  when it comes, goes to the slot's ``orphan`` callback (the slots backend uses it to give
  back a concurrency slot that was granted to a request that had gone), or is dropped.
- A fire-and-forget script answered ``NOSCRIPT`` (the server's script cache was flushed
  since connect) goes to ``on_noscript`` with its payload: the client loads the scripts
  again and resends it (so no caller keeps its arguments around for that rare case).
- Deadlines: replies come in order, so only the oldest pending slot's age matters. The
  watchdog task looks every ``timeout_s / 4`` and fails the connection when the same slot
  has been the oldest for ``timeout_s`` (so a reply is given up on after ``timeout_s`` to
  ``1.25 * timeout_s``); every parked caller then gets :class:`RedisUnavailable`. No cancel
  scope and no clock reading per call.
- Any failure (EOF, reset, TLS error, protocol error, timeout) is final for the connection:
  every pending caller is woken with :class:`RedisUnavailable` and :meth:`serve` returns.
  The client (:mod:`.redis_client`) reconnects with backoff.

The commands' replies are hiredis values: ``bytes``, ``int``, lists, None, or a
``hiredis.ReplyError`` instance (returned, not raised: the caller decides what an error
reply means).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any, cast

import hiredis
import outcome
import trio

__all__ = ["Connection", "RedisError", "RedisUnavailable", "Reply", "pack"]

Reply = Any
#: ``hiredis.pack_command`` (its stub types the argument as a 1-tuple; it takes any tuple of
#: str, bytes, int and float).
pack = cast(Callable[[tuple[Any, ...]], bytes], hiredis.pack_command)
_READ_SIZE = 65536


class RedisUnavailable(Exception):
    """Redis did not answer: unreachable, refused, timed out, or the connection broke."""


class RedisError(Exception):
    """Redis answered with an error reply where none was expected (a bug, or AUTH)."""


class _Slot:
    """Where the replies of one submitted command (or pipeline of ``n``) go. ``payload``
    is kept for a fire-and-forget script only (resent after a ``NOSCRIPT``)."""

    __slots__ = ("n", "orphan", "payload", "replies", "task")

    def __init__(
        self,
        task: trio.lowlevel.Task | None,
        n: int,
        orphan: Callable[[Reply], None] | None,
        payload: bytes | None,
    ) -> None:
        self.task = task
        self.n = n
        self.orphan = orphan
        self.payload = payload
        self.replies: list[Reply] | None = [] if n > 1 else None

    def abort(self, _: Any) -> trio.lowlevel.Abort:
        self.task = None  # the reply will go to self.orphan
        return trio.lowlevel.Abort.SUCCEEDED


class Connection:
    """A connected (and authenticated) stream, shared by every caller. See the module doc."""

    def __init__(
        self,
        stream: trio.abc.Stream,
        timeout_s: float,
        reader: hiredis.Reader,
        on_noscript: Callable[[bytes], None] | None = None,
    ) -> None:
        self.stream = stream
        self.timeout_s = timeout_s
        self.reader = reader
        self.on_noscript = on_noscript
        self.pending: deque[_Slot] = deque()
        self.out: list[bytes] = []
        self.broken: str | None = None
        self._writer = trio.lowlevel.ParkingLot()

    # --- the callers' side ---------------------------------------------------------------------

    def submit(
        self,
        payload: bytes,
        n: int = 1,
        *,
        wait: bool = True,
        orphan: Callable[[Reply], None] | None = None,
        script: bool = False,
    ) -> _Slot:
        """Queue ``payload`` (``n`` packed commands); ``wait`` False: nobody waits for the
        replies (fire-and-forget; ``orphan`` still sees them). ``script``: a fire-and-forget
        ``EVALSHA``, resent through ``on_noscript`` if the server answers ``NOSCRIPT``."""
        if self.broken is not None:
            raise RedisUnavailable(self.broken)
        task = trio.lowlevel.current_task() if wait else None
        slot = _Slot(task, n, orphan, payload if script else None)
        self.out.append(payload)
        self.pending.append(slot)
        if self._writer:
            self._writer.unpark()
        return slot

    async def wait(self, slot: _Slot) -> Reply:
        """The reply (a list for ``n > 1``) to ``slot``; :class:`RedisUnavailable` if the
        connection fails first."""
        return await trio.lowlevel.wait_task_rescheduled(slot.abort)

    # --- the connection's tasks ---------------------------------------------------------------

    async def serve(self) -> None:
        """Run the writer, reader and watchdog until the connection fails; then wake every
        pending caller with :class:`RedisUnavailable`, close the stream and return."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._write, nursery.cancel_scope)
                nursery.start_soon(self._read, nursery.cancel_scope)
                nursery.start_soon(self._watch, nursery.cancel_scope)
        finally:
            if self.broken is None:
                self.broken = "connection closed"
            self._fail_pending()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    def _break(self, why: str, scope: trio.CancelScope) -> None:
        if self.broken is None:
            self.broken = why
        scope.cancel()

    def _fail_pending(self) -> None:
        why = self.broken or "connection closed"
        pending, self.pending = self.pending, deque()
        self.out.clear()
        for slot in pending:
            if slot.task is not None:  # an outcome is unwrapped once: one per caller
                trio.lowlevel.reschedule(slot.task, outcome.Error(RedisUnavailable(why)))

    async def _write(self, scope: trio.CancelScope) -> None:
        try:
            while True:
                if not self.out:
                    await self._writer.park()
                    continue
                data = b"".join(self.out) if len(self.out) > 1 else self.out[0]
                self.out.clear()
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(f"write failed: {exc!r}", scope)

    async def _read(self, scope: trio.CancelScope) -> None:
        reader, pending = self.reader, self.pending
        reschedule, value = trio.lowlevel.reschedule, outcome.Value
        try:
            while True:
                data = await self.stream.receive_some(_READ_SIZE)
                if not data:
                    self._break("Redis closed the connection", scope)
                    return
                reader.feed(data)  # type: ignore[arg-type]  # any buffer will do
                while (reply := reader.gets()) is not False:
                    if not pending:
                        self._break("a reply nobody asked for", scope)
                        return
                    slot = pending[0]
                    if slot.replies is not None:
                        slot.replies.append(reply)
                        if len(slot.replies) < slot.n:
                            continue
                        reply = slot.replies
                    pending.popleft()
                    if slot.task is not None:
                        reschedule(slot.task, value(reply))
                    elif slot.orphan is not None:
                        slot.orphan(reply)
                    elif slot.payload is not None and type(reply) is hiredis.ReplyError:
                        self._noscript(slot.payload, reply)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            self._break(f"read failed: {exc!r}", scope)
        except hiredis.ProtocolError as exc:
            self._break(f"protocol error: {exc}", scope)

    def _noscript(self, payload: bytes, reply: hiredis.ReplyError) -> None:
        if self.on_noscript is not None and str(reply).startswith("NOSCRIPT"):
            self.on_noscript(payload)

    async def _watch(self, scope: trio.CancelScope) -> None:
        """Fail the connection when the same command has been its oldest unanswered one
        for ``timeout_s`` (looked at every ``timeout_s / 4``: see the module docstring)."""
        timeout = self.timeout_s
        oldest: _Slot | None = None
        since = 0.0
        while True:
            await trio.sleep(timeout / 4)
            head = self.pending[0] if self.pending else None
            if head is None or head is not oldest:
                oldest, since = head, trio.current_time()
            elif trio.current_time() - since >= timeout:
                self._break(f"no reply within {timeout:g}s", scope)
                return
