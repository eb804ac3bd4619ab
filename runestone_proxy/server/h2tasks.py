"""An HTTP/2 connection's stream tasks: each serves one stream at a time, inside a cancel
scope that cancelling the stream cancels, and waits for the connection's next stream once
its own ended uncancelled. :class:`StreamTasks` is that half of
:class:`~runestone_proxy.server.h2conn.H2ServerConnection` (a mixin, as ``FdStream`` is):
running a stream's handler, what a finished stream leaves to do (credit for unread body,
RST_STREAM for an unfinished one), and the window credit the streams hand back. Why the
tasks are kept: the connection's module docstring ("Stream tasks").
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import attrs
import h2.connection
import h2.exceptions
import structlog
import trio
from h2.errors import ErrorCodes

from runestone_proxy import errors
from runestone_proxy.api.dispatch import log_access, send_error
from runestone_proxy.api.http import Request, ResponseAborted
from runestone_proxy.config import LimitsConfig
from runestone_proxy.server.frontend import Frontend
from runestone_proxy.server.h2stream import H2Stream

__all__ = ["Idle", "StreamTasks"]

log = structlog.get_logger("runestone.h2")

_NO_RESPONSE = 499  # access-log status when no response went out (nginx's "client closed")


#: A stream's scope once its stream is done: cancelling a done stream changes nothing, as
#: cancelling an exited scope did, whatever its task serves next.
_SPENT = trio.CancelScope()


@attrs.define(eq=False)
class Idle:
    """A stream task waiting for its next stream (``StreamTasks._serve_streams``)."""

    task: trio.lowlevel.Task
    scope: trio.CancelScope
    next: tuple[H2Stream, Request] | None = None


class StreamTasks:
    """The stream tasks' half of ``H2ServerConnection`` (see the module docstring). It
    declares the connection's fields it uses; the connection (an attrs class) holds them."""

    gateway: Frontend
    limits: LimitsConfig
    proto: h2.connection.H2Connection
    streams: dict[int, H2Stream]
    _idle: list[Idle]
    _idle_since: float | None
    _owed: int
    _closing: bool

    if TYPE_CHECKING:

        def _take_output(self) -> None: ...

        def _wake_reader(self) -> None: ...

    async def _serve_streams(self, st: H2Stream, request: Request) -> None:
        """A stream task: serve ``st``, then the streams the reader hands it, until one of
        them cancels its scope or the connection closes (see the docstring)."""
        scope = st.scope
        idle = Idle(trio.lowlevel.current_task(), scope)

        def abort(_: object) -> trio.lowlevel.Abort:
            self._idle.remove(idle)  # cancelled while idle: the reader no longer sees it
            return trio.lowlevel.Abort.SUCCEEDED

        with scope:
            while True:
                await self._run_stream(st, request)
                if scope.cancel_called or self._closing:
                    return
                self._idle.append(idle)
                await trio.lowlevel.wait_task_rescheduled(abort)
                assert idle.next is not None
                (st, request), idle.next = idle.next, None

    async def _run_stream(self, st: H2Stream, request: Request) -> None:
        started = time.perf_counter()
        try:
            if st.too_large:
                limit = self.limits.max_body_bytes
                exc = errors.PayloadTooLarge(f"Request body exceeds the limit of {limit} bytes.")
                await send_error(st, exc)
            else:
                await self.gateway.dispatch(request, st)
            if not st.started:
                await send_error(st, errors.GatewayError("The server sent no response."))
            if not st.ended:
                await st.finish()
        except ResponseAborted:
            pass  # logged by dispatch; _stream_done resets the unfinished stream (CANCEL)
        except Exception:
            log.exception("h2.stream.crashed", request_id=request.request_id)
        finally:
            self._stream_done(st)
            status = st.status or _NO_RESPONSE
            log_access(self.gateway, request, status, st.sent_bytes, started)

    def _stream_done(self, st: H2Stream) -> None:
        del self.streams[st.sid]
        st.scope = _SPENT  # the task's scope may serve another stream: hands off
        if self._closing:
            return
        if st.unacked:
            self.credit(st.sid, st.unacked)  # unread body: the connection window gets it back
            self._take_output()
        if not st.gone and not st.ended:
            self.reset(st, ErrorCodes.CANCEL)
            self._take_output()
        elif not st.gone and not st.body_ended:
            # RFC 9113 §8.1: the response is complete; stop the rest of the request.
            self.reset(st, ErrorCodes.NO_ERROR)
            self._take_output()
        # Anything else the stream wrote, it handed to the writer itself.
        if not self.streams:
            self._idle_since = trio.current_time()
            self._wake_reader()

    def reset(self, st: H2Stream, code: ErrorCodes) -> None:
        """Send RST_STREAM (queued) and mark the stream gone."""
        st.gone = True
        try:
            self.proto.reset_stream(st.sid, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed on h2's side

    def credit(self, sid: int, flow: int) -> None:
        """Give ``flow`` bytes of window back to the client (WINDOW_UPDATE when h2 sees fit)."""
        if flow:
            try:
                self.proto.acknowledge_received_data(flow, sid)
            except h2.exceptions.ProtocolError:
                pass  # the stream is long forgotten; nothing to credit

    def credit_connection(self, flow: int) -> bool:
        """Give ``flow`` bytes back to the connection window alone (a stream whose body is
        complete needs no more of its own), one WINDOW_UPDATE per stream window's worth:
        the connection window has one stream window to spare for it (``h2setup``). True
        when a frame was queued in h2."""
        self._owed += flow
        if self._owed < self.limits.h2_initial_window_bytes:
            return False
        self.proto.increment_flow_control_window(self._owed)
        self._owed = 0
        return True
