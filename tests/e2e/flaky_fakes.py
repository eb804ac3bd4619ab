"""OpenAI-compatible fake providers that fail on demand, for the resilience tests.

A :class:`Flaky` is a small ASGI app served by hypercorn's trio worker on 127.0.0.1, port 0,
speaking ``/v1/chat/completions`` (whole and streamed). What it does is its ``mode``, which a
test may change at any time:

    ok      answer "Hello from <name>." (four stream chunks, then ``[DONE]``)
    500     OpenAI's 500 ``server_error`` body
    429     OpenAI's 429 ``rate_limit_exceeded`` with ``retry-after: <retry_after_s>``
    stall   no response head; wait for the client to leave, then set ``disconnected``
    die     start the stream, send two chunks, then drop the connection mid-body
    hold    send the first chunk, set ``first_sent``, wait for ``release``, then the rest

A provider that *refuses* is a port bound but not listening (:func:`refusing_port`). Every
request's
body is kept in ``requests``; the model a fake answers with is the one it was sent, so a
test can tell which upstream model routing chose.

Wire formats: https://platform.openai.com/docs/api-reference/chat/streaming and
https://platform.openai.com/docs/guides/error-codes.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio
from fakes import lifespan, serve_asgi

HOST = "127.0.0.1"
KEY = "sk-flaky-0123456789abcdef"

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_ERRORS = {
    "500": (
        500,
        {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        },
    ),
    "429": (
        429,
        {
            "message": "Rate limit reached for requests. Please try again later.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
    ),
}


def pieces(name: str) -> list[str]:
    return ["Hello", " from", f" {name}", "."]


def text(name: str) -> str:
    return "".join(pieces(name))


@contextmanager
def refusing_port() -> Iterator[int]:
    """A 127.0.0.1 port that refuses connections at once: bound but not listening, so no
    other test can take it while the block runs (a closed port could be reused)."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        yield port


@attrs.define(eq=False)
class Flaky:
    name: str
    mode: str = "ok"
    retry_after_s: int = 1
    port: int = 0
    requests: list[dict[str, Any]] = attrs.Factory(list)
    disconnected: trio.Event = attrs.Factory(trio.Event)
    first_sent: trio.Event = attrs.Factory(trio.Event)
    release: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def models(self) -> list[str]:
        return [r.get("model", "") for r in self.requests]

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_asgi, self)
            task_status.started()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw)
        self.requests.append(body)
        mode = self.mode
        if mode in _ERRORS:
            status, error = _ERRORS[mode]
            headers = [(b"content-type", b"application/json")]
            if mode == "429":
                headers.append((b"retry-after", str(self.retry_after_s).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send(
                {"type": "http.response.body", "body": json.dumps({"error": error}).encode()}
            )
            return
        if mode == "stall":
            await self._wait_gone(receive)
            return
        model = body.get("model", "")
        if not body.get("stream"):
            answer = completion(model, text(self.name))
            headers = [(b"content-type", b"application/json")]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": json.dumps(answer).encode()})
            return
        headers = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        deltas: list[dict[str, Any]] = [{"role": "assistant", "content": ""}]
        deltas += [{"content": piece} for piece in pieces(self.name)]
        for index, delta in enumerate(deltas):
            if mode == "die" and index == 2:
                return  # the app ends mid-body: hypercorn drops the connection
            await _event(send, _chunk(model, delta, None))
            if mode == "hold" and index == 0:
                self.first_sent.set()
                await self.release.wait()
        await _event(send, _chunk(model, {}, "stop"))
        await _event(send, "[DONE]")
        await send({"type": "http.response.body", "body": b""})

    async def _wait_gone(self, receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()


async def _event(send: Send, data: object) -> None:
    payload = data if isinstance(data, str) else json.dumps(data)
    frame = f"data: {payload}\n\n".encode()
    await send({"type": "http.response.body", "body": frame, "more_body": True})


def _chunk(model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-flaky",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def completion(model: str, content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-flaky",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9},
    }
