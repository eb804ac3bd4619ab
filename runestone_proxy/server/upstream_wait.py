"""The bounded wait of an upstream connection: the pool's sweeper when it runs, else a scope.

The two waits on the upstream hot path (a response head, the next body bytes) would each
cost a cancel scope; :class:`Wait` registers them with the pool's sweeper
(:class:`~runestone_proxy.server.slowwatch.SlowWatch`) instead, and falls back to a scope
when no sweeper runs.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING

import trio

from runestone_proxy.server.slowwatch import SlowWatch

if TYPE_CHECKING:
    from runestone_proxy.server.upstream_h11 import H11Connection


class Wait:
    """``with Wait(conn, due) as wait:`` bounds one wait on ``conn`` by ``due`` (trio time).

    While the connection's sweeper runs, the wait registers with it: a dict insert and
    delete instead of a cancel scope (about 6.5 us, paid per request for the head and per
    chunk of a paced stream). The sweeper wakes an overdue wait with ``notify_closing``,
    which surfaces as ``ClosedResourceError`` (or as a broken TLS stream, or whatever the
    code in the block made of either); the block's exception is then swallowed here, as a
    fired cancel scope swallows its ``Cancelled``, and ``wait.timed_out`` is true. Without a
    running sweeper (a pool used on its own), it is a plain cancel scope. Either way,
    ``Cancelled`` from an outer scope passes through untouched."""

    __slots__ = ("caught", "conn", "due", "scope", "watch")

    def __init__(self, conn: H11Connection, due: float) -> None:
        self.conn = conn
        self.due = due
        self.scope: trio.CancelScope | None = None
        self.watch: SlowWatch | None = None
        self.caught = False

    def __enter__(self) -> Wait:
        conn, watch = self.conn, self.conn.watch
        if watch is not None and watch.running:
            conn.expired = False
            watch.add(conn, conn.expire, self.due)
            self.watch = watch
        else:
            self.scope = trio.CancelScope(deadline=self.due)
            self.scope.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        if self.scope is not None:
            return bool(self.scope.__exit__(exc_type, exc, tb))
        assert self.watch is not None
        self.watch.discard(self.conn)
        # An expiry that raced a wait which had already ended well is no timeout.
        self.caught = self.conn.expired and isinstance(exc, Exception)
        return self.caught

    @property
    def timed_out(self) -> bool:
        return self.scope.cancelled_caught if self.scope is not None else self.caught
