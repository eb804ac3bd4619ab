"""The protocol-neutral request and response interface shared by HTTP/1.1 and HTTP/2.

Handlers see a :class:`Request` and a :class:`Responder` and never know which protocol
carried them. The connection layer (``h1.py``, ``h2.py``) builds both: the request's body
comes from a :class:`BodySource` fed by that connection's single reader task, and the
responder serialises its writes onto that connection.

A handler is ``async def handler(request, responder) -> None``. It either calls
``responder.respond(...)`` once with a whole body, or ``responder.start(...)`` followed by any
number of ``responder.send(chunk)`` calls (each one is flushed to the client before it
returns, which is what SSE needs). Returning ends the response. An exception from the
:mod:`runestone_proxy.errors` tree raised before the response started becomes an error
envelope; after it started the connection layer can only end the stream, so streaming
handlers report their own mid-stream errors in-band.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import attrs

from runestone_proxy.errors import PayloadTooLarge

HeaderList = Sequence[tuple[bytes, bytes]]


class BodySource(Protocol):
    """Where a request body comes from. ``receive`` returns ``b""`` once the body is over."""

    async def receive(self) -> bytes: ...


@attrs.define(eq=False)
class BytesBody:
    """A body that arrived whole with the headers (the common case for small JSON)."""

    data: bytes
    _done: bool = False

    async def receive(self) -> bytes:
        if self._done:
            return b""
        self._done = True
        return self.data


EMPTY_BODY_BYTES = b""


@attrs.define(eq=False, repr=False)
class Request:
    """One HTTP request, as a handler sees it. Header names are lower-case bytes."""

    method: str
    path: str
    query: str
    headers: HeaderList
    http_version: str
    body_source: BodySource
    request_id: str = ""
    client: str | None = None
    path_params: dict[str, str] = attrs.Factory(dict)
    max_body_bytes: int = 8 * 1024 * 1024
    #: Filled by middleware (auth) for later stages; opaque to the HTTP layer.
    context: dict[str, object] = attrs.Factory(dict)
    _body: bytes | None = None

    def header(self, name: bytes) -> bytes | None:
        """The first value of header ``name`` (lower-case bytes), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def body(self) -> bytes:
        """The whole body, read once and cached; 413 past ``max_body_bytes``."""
        if self._body is None:
            parts = []
            size = 0
            while chunk := await self.body_source.receive():
                size += len(chunk)
                if size > self.max_body_bytes:
                    raise PayloadTooLarge(
                        f"Request body exceeds the limit of {self.max_body_bytes} bytes."
                    )
                parts.append(chunk)
            self._body = parts[0] if len(parts) == 1 else b"".join(parts)
        return self._body

    async def stream(self) -> AsyncIterator[bytes]:
        """The body chunk by chunk, as the client sends it (for streamed uploads)."""
        while True:
            chunk = await self.body_source.receive()
            if not chunk:
                return
            yield chunk

    def __repr__(self) -> str:
        return f"<Request {self.method} {self.path} HTTP/{self.http_version} id={self.request_id}>"


class Responder(Protocol):
    """Writes one response. Implementations add ``x-request-id`` and serialise writes."""

    @property
    def started(self) -> bool: ...

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        """Send a whole response (headers and body) in one write."""

    async def start(self, status: int, headers: HeaderList) -> None:
        """Send the status line and headers of a streamed response."""

    async def send(self, data: bytes) -> None:
        """Send one chunk of a streamed response; returns once it is handed to the socket."""


async def start_with(responder: Responder, status: int, headers: HeaderList, first: bytes) -> None:
    """``start`` then ``send(first)``; a responder with its own ``start_with`` (HTTP/1.1)
    writes both at once: one write fewer per stream, for a relay with its first payloads
    in hand."""
    both: Callable[[int, HeaderList, bytes], Awaitable[None]] | None = getattr(
        responder, "start_with", None
    )
    if both is not None:
        await both(status, headers, first)
        return
    await responder.start(status, headers)
    await responder.send(first)


async def send_final(responder: Responder, data: bytes) -> None:
    """Send the last bytes of a streamed body. A responder with its own ``send_final``
    (HTTP/1.1: written with the last chunk once the handler returned, one write instead of
    two per stream) uses it; any other sends them as a chunk."""
    final: Callable[[bytes], Awaitable[None]] | None = getattr(responder, "send_final", None)
    await (responder.send(data) if final is None else final(data))


Handler = Callable[[Request, Responder], Awaitable[None]]


class ResponseAborted(Exception):
    """A handler failed after its response started: the connection layer must cut the
    response short (HTTP/1.1: close without the last chunk; HTTP/2: RST_STREAM) so the
    client sees a broken response, never one that looks complete."""


JSON_HEADERS: tuple[tuple[bytes, bytes], ...] = ((b"content-type", b"application/json"),)
SSE_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
)


def provider_headers(provider: str, policy: str) -> tuple[tuple[bytes, bytes], ...]:
    """``x-runestone-provider`` and ``x-runestone-routing-policy`` for an answer."""
    return (
        (b"x-runestone-provider", provider.encode()),
        (b"x-runestone-routing-policy", policy.encode()),
    )
