"""Helpers for the overflow-queue end-to-end tests: the two real HTTP servers the gateway
talks to while it drains jobs, both trio + h11 on 127.0.0.1, port 0.

* :class:`WebhookReceiver` records every webhook delivery, checks its
  ``x-runestone-signature`` and answers with scripted statuses.
* :class:`FakeUpstream` is an OpenAI-compatible provider (``POST /v1/chat/completions``,
  non-stream) whose behaviour the model name picks: ``held-1`` answers only once the test
  releases that request, ``flaky-1`` answers OpenAI's 500 to its first ``failures``
  requests, anything else answers at once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from typing import Any

import attrs
import h11
import trio

from runestone_proxy.gateway.webhooks import verify

HOST = "127.0.0.1"
SECRET = "whsec_e2e_0123456789"

Answer = tuple[int, list[tuple[str, str]], bytes]
Handle = Callable[[h11.Request, dict[str, str], bytes], Awaitable[Answer]]


async def _serve(
    handle: Handle, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """An HTTP/1.1 server on 127.0.0.1, port 0; reports its port. ``handle`` answers each
    request; keep-alive is honoured."""
    listeners = await trio.open_tcp_listeners(0, host=HOST)
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(partial(_connection, handle), listeners)


async def _connection(handle: Handle, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    request: h11.Request | None = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request, body = event, b""
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                headers = {k.decode(): v.decode() for k, v in request.headers}
                status, extra, content = await handle(request, headers, body)
                head = [*extra, ("content-length", str(len(content)))]
                response = h11.Response(status_code=status, headers=head)
                data = conn.send(response) + conn.send(h11.Data(data=content))
                await stream.send_all(data + conn.send(h11.EndOfMessage()))
                conn.start_next_cycle()
            else:  # ConnectionClosed
                return
    except (h11.RemoteProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await trio.aclose_forcefully(stream)


@attrs.frozen
class Delivery:
    job_id: str
    headers: Mapping[str, str]
    body: bytes
    verified: bool
    status: int


@attrs.define(eq=False)
class WebhookReceiver:
    """Answers ``script`` statuses in order (then 200) and records every delivery."""

    secret: bytes = SECRET.encode()
    script: list[int] = attrs.Factory(list)
    deliveries: list[Delivery] = attrs.Factory(list)
    port: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}/hooks/runestone"

    def delivered(self) -> dict[str, Delivery]:
        """job id -> its first accepted (2xx) delivery."""
        found: dict[str, Delivery] = {}
        for d in self.deliveries:
            if 200 <= d.status < 300:
                found.setdefault(d.job_id, d)
        return found

    async def wait_for(self, job_ids: set[str]) -> dict[str, Delivery]:
        while not job_ids <= set(self.delivered()):
            self._changed = trio.Event()
            await self._changed.wait()
        return self.delivered()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(_serve, self._handle)
            task_status.started()

    async def _handle(self, _request: h11.Request, headers: dict[str, str], body: bytes) -> Answer:
        status = self.script.pop(0) if self.script else 200
        signature = headers.get("x-runestone-signature", "")
        verified = verify(self.secret, signature, body, now=int(time.time()))
        job_id = headers.get("x-runestone-job-id", "")
        self.deliveries.append(Delivery(job_id, headers, body, verified, status))
        self._changed.set()
        return status, [], b""


_SERVER_ERROR = {
    "error": {
        "message": "The server had an error while processing your request. Sorry about that!",
        "type": "server_error",
        "param": None,
        "code": None,
    }
}


@attrs.define(eq=False)
class Arrival:
    """One request the fake provider received; ``release`` lets a ``held-1`` one answer."""

    body: dict[str, Any]
    release: trio.Event = attrs.Factory(trio.Event)


@attrs.define(eq=False)
class FakeUpstream:
    """An OpenAI-compatible provider; see the module docstring for what each model does."""

    failures: int = 1
    arrivals: list[Arrival] = attrs.Factory(list)
    port: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    async def wait_arrivals(self, count: int) -> list[Arrival]:
        """Once at least ``count`` requests arrived: all of them, in order."""
        while len(self.arrivals) < count:
            self._changed = trio.Event()
            await self._changed.wait()
        return self.arrivals

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(_serve, self._handle)
            task_status.started()

    async def _handle(self, request: h11.Request, _headers: dict[str, str], raw: bytes) -> Answer:
        json_type = [("content-type", "application/json")]
        if request.method != b"POST" or request.target != b"/v1/chat/completions":
            return (
                404,
                json_type,
                b'{"error":{"message":"not found","type":"invalid_request_error"}}',
            )
        arrival = Arrival(json.loads(raw))
        self.arrivals.append(arrival)
        self._changed.set()
        model = str(arrival.body.get("model", ""))
        if model == "held-1":
            await arrival.release.wait()
        elif model == "flaky-1" and self.failures > 0:
            self.failures -= 1
            return 500, json_type, json.dumps(_SERVER_ERROR).encode()
        return 200, json_type, json.dumps(_completion(model, len(self.arrivals))).encode()


def _completion(model: str, number: int) -> dict[str, Any]:
    return {
        "id": f"chatcmpl-upstream-{number}",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hello from upstream."},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }
