"""What the domain needs from an upstream HTTP client: the transport interface.

:class:`~runestone_proxy.gateway.pipeline.Providers` sends each provider request through a
:class:`Transport` and reads the answer from a :class:`Response`; both are
``typing.Protocol`` s, so an implementation fits by its shape and inherits nothing. The one
the gateway runs on is :class:`runestone_proxy.server.upstream.UpstreamPool` (pooled h11,
with httpx behind the same interface where an outbound proxy applies); mypy proves it fits
where ``server`` hands the pool to ``Providers.build``. A second transport (HTTP/2 upstream,
a test double) plugs in the same way. Typing only: nothing here runs per request, and the
pipeline calls the pool's methods directly, with no wrapper between.

    async with transport.request("POST", url, headers, body, timeouts, deadline) as resp:
        if resp.status >= 300: ... await resp.read(max_bytes)
        while chunk := await resp.receive(): ...

Errors reach the caller only as :mod:`runestone_proxy.errors` (``UpstreamConnectError``,
``UpstreamTimeout``, ``UpstreamProtocolError``, ``UpstreamError``): the transport maps its
own (socket, TLS, h11, httpx) once, at its edge.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Protocol

import attrs

#: Request or response header fields; response names are lower-case.
Headers = Sequence[tuple[bytes, bytes]]
#: A request body: bytes (sent with Content-Length) or an async iterable (sent chunked).
Body = bytes | AsyncIterable[bytes]


@attrs.frozen
class UpstreamTimeouts:
    """Limits for one upstream request, in seconds. ``total_s`` bounds the whole exchange."""

    connect_s: float = 10
    first_byte_s: float = 60
    between_chunks_s: float = 60
    total_s: float = 600


class Response(Protocol):
    """A response whose head has arrived and whose body is read incrementally."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Headers:
        """The response's fields, names lower-case bytes."""

    async def receive(self) -> bytes:
        """The next body chunk, ``b""`` at the end; each wait bounded by ``between_chunks_s``
        and the exchange's deadline."""

    @property
    def body_done(self) -> bool:
        """The body was read to its end (``receive`` would return ``b""`` at once); False
        when unknown."""

    async def read(self, max_bytes: int | None = None) -> bytes:
        """The rest of the body; ``UpstreamError`` if it exceeds ``max_bytes``."""


class Transport(Protocol):
    """Sends one request and yields its response for the life of an ``async with``."""

    def request(
        self,
        method: str,
        url: str,
        headers: Headers,
        body: Body = b"",
        timeouts: UpstreamTimeouts | None = None,
        deadline: float | None = None,
    ) -> AbstractAsyncContextManager[Response]:
        """``headers`` carry no framing (the transport writes Host and the length).
        ``deadline`` (trio time) tightens ``timeouts.total_s`` for this exchange: every wait
        in it raises ``UpstreamTimeout`` once it passes. Leaving the block with the body
        read to its end lets the transport reuse the connection; any other exit closes it."""
