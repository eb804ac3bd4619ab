"""Arms per-request work only for requests that turn out to be slow.

HTTP/1.1 notices a client that went away only by reading its socket while the handler runs.
Doing that for every request costs a task, a timer and a cancellation each time, which is
most of what a fast request costs. Yet only slow requests need it: a request answered within
a few milliseconds has nothing to cancel. So connections register each request here with a
callback, and one sweeper task per process (in the app's nursery tree) runs the callbacks of
requests still in flight after ``delay_s``. A fast request costs a dict insert and delete.

The upstream pool uses a second instance the same way for its timeouts: a wait for a
provider's response head or next body bytes registers its due time (``add(..., due=)``)
instead of entering a cancel scope (about 6.5 us each, once per request and once per paced
stream chunk), and the callback of a wait still pending when it is due wakes it with
``trio.lowlevel.notify_closing``. Such a timeout fires up to ``interval_s`` late. The same
instance closes pooled connections that idled past ``idle_timeout_s`` (one entry per origin).
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
import structlog
import trio

log = structlog.get_logger("runestone.slowwatch")


@attrs.define(eq=False)
class SlowWatch:
    delay_s: float = 0.02
    #: How often the sweeper looks; disconnects are noticed within delay_s + interval_s.
    interval_s: float = 0.01
    pending: dict[object, tuple[float, Callable[[], None]]] = attrs.Factory(dict)
    running: bool = False
    #: Set while the sweeper sleeps with nothing pending (an idle gateway has no timer).
    _idle: trio.Event | None = None

    def add(self, key: object, callback: Callable[[], None], due: float | None = None) -> None:
        """Run ``callback`` once ``due`` (trio time; default ``delay_s`` from now) has passed,
        unless ``discard(key)`` came first. A key holds one callback: a new add replaces it."""
        when = trio.current_time() + self.delay_s if due is None else due
        self.pending[key] = (when, callback)
        if self._idle is not None:
            self._idle.set()
            self._idle = None

    def discard(self, key: object) -> None:
        self.pending.pop(key, None)

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self.running = True
        try:
            task_status.started()
            while True:
                if not self.pending:
                    self._idle = trio.Event()
                    await self._idle.wait()
                await trio.sleep(self.interval_s)  # a sweep period, not a wait for an event
                now = trio.current_time()
                due = [k for k, (when, _) in self.pending.items() if when <= now]
                for key in due:
                    _, callback = self.pending.pop(key)
                    try:
                        callback()
                    except Exception:  # one bad callback must not stop every timeout
                        log.exception("slowwatch.callback.failed")
        finally:
            self.running = False
