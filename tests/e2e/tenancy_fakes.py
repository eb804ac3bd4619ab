"""A fake OpenAI-compatible upstream for the tenancy tests: counts concurrent calls per tenant.

:class:`TenancyFake` is a small HTTP/1.1 server on raw trio + h11 (127.0.0.1, port 0, with
keep-alive, so the gateway's pool reuses connections as it would with a real provider). It
answers ``/v1/chat/completions``, whole or streamed, in OpenAI's wire format.

The tenant of each call is the request's ``user`` field: an OpenAI field the gateway forwards
untouched, so the fake sees exactly which tenant's request the gateway let through. Per
tenant it keeps the calls in flight now and the peak; ``admitted`` lists every call's tenant
in arrival order (the gateway's admission order).

What a call does is chosen by the model the gateway sends upstream:

    t-fast   answer at once (five content chunks, usage if asked, ``[DONE]``)
    t-500    OpenAI's 500 ``server_error``
    t-hold   streams only: send the first chunk, then hold until the test releases the call
             (:meth:`release_oldest`, :meth:`release_all`) or the gateway goes away

A call counts as in flight from the moment its request is read until its answer starts to
end: the count drops *before* the last bytes go out, so the gateway can never release a slot
(and admit the next request) while the fake still counts the previous call.

``wait_until(predicate)`` awaits a change of the counters, without polling.
"""

from __future__ import annotations

import json
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import attrs
import h11
import trio

HOST = "127.0.0.1"
CREATED = 1_700_000_000
PIECES = ("Hello", " from", " the", " tenancy", " fake.")
USAGE = {"prompt_tokens": 9, "completion_tokens": 5, "total_tokens": 14}
_READ = 65536
SERVER_ERROR = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


class _Gone(Exception):
    """The gateway closed the connection."""


@attrs.define(eq=False)
class Held:
    """A held stream: the tenant, and the event that lets it finish."""

    tenant: str
    release: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class TenancyFake:
    port: int = 0
    in_flight: Counter[str] = attrs.Factory(Counter)
    peak: Counter[str] = attrs.Factory(Counter)
    admitted: list[str] = attrs.Factory(list)
    completed: int = 0
    disconnects: int = 0
    held: deque[Held] = attrs.Factory(deque)
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    @property
    def total_in_flight(self) -> int:
        return sum(self.in_flight.values())

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    def release_oldest(self) -> str:
        """Let the longest-held stream finish; returns its tenant."""
        held = self.held.popleft()
        held.release.set()
        return held.tenant

    def release_all(self) -> None:
        while self.held:
            self.release_oldest()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host=HOST)
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            await nursery.start(trio.serve_listeners, self._connection, listeners)
            task_status.started()

    # --- one connection ---------------------------------------------------------------------

    async def _connection(self, stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(conn, stream)
                if request is None:
                    return
                await self._answer(conn, stream, request, body)
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (_Gone, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
            return
        finally:
            await stream.aclose()

    async def _answer(
        self, conn: h11.Connection, stream: trio.SocketStream, request: h11.Request, raw: bytes
    ) -> None:
        if request.target != b"/v1/chat/completions":
            await _send_json(conn, stream, 404, {"error": {"message": "not found"}})
            return
        body = json.loads(raw)
        if body.get("model") == "t-500":
            await _send_json(conn, stream, 500, SERVER_ERROR)
            return
        tenant = str(body.get("user", "-"))
        self.in_flight[tenant] += 1
        self.peak[tenant] = max(self.peak[tenant], self.in_flight[tenant])
        self.admitted.append(tenant)
        self._notify()
        counted = True

        def done() -> None:
            nonlocal counted
            if counted:
                counted = False
                self.in_flight[tenant] -= 1
                self._notify()

        try:
            if body.get("stream"):
                await self._stream(conn, stream, body, tenant, done)
            else:
                done()
                await _send_json(conn, stream, 200, _completion(body["model"]))
            self.completed += 1
        except (_Gone, trio.BrokenResourceError, trio.ClosedResourceError):
            self.disconnects += 1
            raise
        finally:
            done()

    async def _stream(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        body: dict[str, Any],
        tenant: str,
        done: Callable[[], None],
    ) -> None:
        model = body["model"]
        head = h11.Response(
            status_code=200,
            headers=[("content-type", "text/event-stream"), ("cache-control", "no-cache")],
        )
        first = _chunk(model, {"role": "assistant", "content": ""})
        await stream.send_all(conn.send(head) + _event(conn, first))
        if model == "t-hold":
            held = Held(tenant)
            self.held.append(held)
            self._notify()
            try:
                await _hold(conn, stream, held.release)
            finally:
                if held in self.held:
                    self.held.remove(held)
        rest = [_chunk(model, {"content": piece}) for piece in PIECES]
        rest.append(_chunk(model, {}, "stop"))
        options = body.get("stream_options") or {}
        if options.get("include_usage"):
            rest.append({**_chunk(model, None), "choices": [], "usage": USAGE})
        data = b"".join(_event(conn, c) for c in rest) + _event(conn, "[DONE]")
        done()
        await stream.send_all(data + conn.send(h11.EndOfMessage()))


async def _hold(conn: h11.Connection, stream: trio.SocketStream, release: trio.Event) -> None:
    """Wait for ``release``; raise :class:`_Gone` if the gateway closes the connection first."""
    gone = False
    async with trio.open_nursery() as nursery:

        async def watch() -> None:
            nonlocal gone
            try:
                data = await stream.receive_some(_READ)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                data = b""
            if not data:
                gone = True
                nursery.cancel_scope.cancel()
            else:
                conn.receive_data(data)  # not expected mid-response; h11 keeps it

        nursery.start_soon(watch)
        await release.wait()
        nursery.cancel_scope.cancel()
    if gone:
        raise _Gone


async def _read_request(
    conn: h11.Connection, stream: trio.SocketStream
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    parts: list[bytes] = []
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(await stream.receive_some(_READ))
        elif isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            assert request is not None
            return request, b"".join(parts)
        elif isinstance(event, h11.ConnectionClosed):
            if request is None:
                return None, b""
            raise _Gone
        else:
            raise _Gone


async def _send_json(
    conn: h11.Connection, stream: trio.SocketStream, status: int, obj: object
) -> None:
    payload = json.dumps(obj).encode()
    head = h11.Response(
        status_code=status,
        headers=[("content-type", "application/json"), ("content-length", str(len(payload)))],
    )
    await stream.send_all(
        conn.send(head) + conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage())
    )


def _event(conn: h11.Connection, data: object) -> bytes:
    text = data if isinstance(data, str) else json.dumps(data)
    return conn.send(h11.Data(data=f"data: {text}\n\n".encode()))


def _chunk(model: str, delta: dict[str, Any] | None, finish: str | None = None) -> dict[str, Any]:
    choices = (
        []
        if delta is None
        else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]
    )
    return {
        "id": "chatcmpl-tenancy",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_tenancy",
        "choices": choices,
    }


def _completion(model: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": "".join(PIECES), "refusal": None}
    return {
        "id": "chatcmpl-tenancy",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_tenancy",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}],
        "usage": USAGE,
    }
