"""The Anthropic Messages API: ``POST /v1/messages`` and ``POST /v1/messages/count_tokens``.

Thin handlers over the same request service as the OpenAI endpoints
(:mod:`runestone_proxy.gateway.service`): routing, tenancy, rate limits, failover, hedging
and the overflow queue apply unchanged. What differs is the dialect on the wire:

* the request: Anthropic's body, ``x-api-key`` (or ``Authorization: Bearer``), the
  ``anthropic-version`` / ``anthropic-beta`` headers (passed on to a native provider with
  ``x-app`` and ``x-claude-code-session-id``; never the client's key), query strings such as
  Claude Code's ``?beta=true`` accepted and ignored;
* the answer: an Anthropic Message, or Anthropic's SSE events (each stream payload is one
  whole ``event:``/``data:`` frame, see ``providers/messages_frames.py``): native from an
  Anthropic provider, translated from any other;
* errors: Anthropic's envelope ``{"type": "error", "error": {"type", "message"}}`` with
  Anthropic's statuses (529 for overloaded), before a stream starts; after it, an
  ``event: error`` frame ends the stream (``providers/messages_errors.py``);
* rate-limit headers in Anthropic's names (``anthropic-ratelimit-*``) as well as OpenAI's.

A translated stream (whose provider sends no pings of its own) gets an ``event: ping``
after ``upstream.ping_interval_s`` without an event, as Anthropic's streams do, so that a
client's read timeout does not fire while a slow model thinks (one task for every such
stream: :mod:`.pings`).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

import attrs

from runestone_proxy.api.accept import accept, authenticate
from runestone_proxy.api.http import (
    JSON_HEADERS,
    SSE_HEADERS,
    Request,
    Responder,
    provider_headers,
    start_with,
)
from runestone_proxy.api.jobs import answer_parked
from runestone_proxy.api.pings import Pings
from runestone_proxy.api.router import Router
from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.rate_wire import Headers, anthropic_headers
from runestone_proxy.gateway.service import Service, Stream
from runestone_proxy.providers.messages_errors import (
    anthropic_error_frame,
    anthropic_error_response,
)
from runestone_proxy.providers.messages_frames import PING
from runestone_proxy.providers.messages_request import ESTIMATE_METHOD

#: Client headers a native provider receives as sent, besides every ``anthropic-*`` one.
_FORWARDED = frozenset({b"x-app", b"x-claude-code-session-id"})


def forwarded_headers(request: Request) -> tuple[tuple[bytes, bytes], ...]:
    """``anthropic-version``, ``anthropic-beta`` and the other headers a native provider
    should see, as the client sent them."""
    return tuple(
        (name, value)
        for name, value in request.headers
        if name.startswith(b"anthropic-") or name in _FORWARDED
    )


@attrs.define(eq=False)
class AnthropicApi:
    """The Messages endpoints, over the request service."""

    service: Service
    #: The app's ping task (:mod:`.pings`); None: translated streams get no pings.
    pings: Pings | None = None

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v1/messages", self.messages)
        router.add("POST", "/v1/messages/count_tokens", self.count_tokens)

    async def messages(self, request: Request, responder: Responder) -> None:
        try:
            await self._messages(request, responder)
        except GatewayError as exc:
            await send_error(responder, exc, request.request_id)

    async def count_tokens(self, request: Request, responder: Responder) -> None:
        try:
            await self._count_tokens(request, responder)
        except GatewayError as exc:
            await send_error(responder, exc, request.request_id)

    # --- the work ------------------------------------------------------------------------------

    async def _messages(self, request: Request, responder: Responder) -> None:
        gen = await accept(self.service, request, "messages", headers=forwarded_headers(request))
        if gen.stream:
            async with self.service.open_stream(gen) as stream:
                if type(stream) is Parked:
                    await answer_parked(responder, stream)
                    return
                native = self.service.providers.runtime(stream.target).speaks_messages
                interval = None if native else self.service.config.upstream.ping_interval_s
                await relay(responder, stream, interval, self.pings)
            return
        answer = await self.service.complete(gen)
        if type(answer) is Parked:
            await answer_parked(responder, answer)
            return
        headers = (
            *JSON_HEADERS,
            *provider_headers(answer.target.provider, answer.policy),
            *_rate_headers(answer.headers),
        )
        await responder.respond(200, headers, answer.body)

    async def _count_tokens(self, request: Request, responder: Responder) -> None:
        authenticate(self.service, request)
        raw = bytes(await request.body())
        target, body, estimated = await self.service.count_tokens(
            raw, request.request_id, forwarded_headers(request)
        )
        headers = [*JSON_HEADERS, (b"x-runestone-provider", target.provider.encode())]
        if estimated:
            # Not Anthropic's count: say so, and how it was made (README "Use with Claude Code").
            headers.append(
                (b"x-runestone-token-count", b"estimate; method=" + ESTIMATE_METHOD.encode())
            )
        await responder.respond(200, headers, body)


async def relay(
    responder: Responder,
    stream: Stream,
    ping_interval_s: float | None,
    pings: Pings | None = None,
) -> None:
    """Write an open Messages stream: its payloads are whole SSE frames, written as they
    come; an error after the start ends the stream with an ``event: error`` frame. With
    ``ping_interval_s`` (and the app's :class:`~.pings.Pings`), a ``ping`` frame goes out
    into each silence that long."""
    headers = (
        *SSE_HEADERS,
        *provider_headers(stream.target.provider, stream.policy),
        *_rate_headers(stream.headers),
    )
    first = stream.first
    # The head goes out with the first frames (one write fewer per stream on HTTP/1.1).
    await start_with(responder, 200, headers, _joined(first) if first else b"")
    if first is None:
        return
    if pings is None or ping_interval_s is None:
        await _relay(responder.send, stream)
        return
    quiet = pings.watch(responder, ping_interval_s, PING)
    try:
        await _relay(quiet.send, stream)
        await quiet.settled()
    finally:
        pings.unwatch(quiet)


def _joined(payloads: list[bytes]) -> bytes:
    return payloads[0] if len(payloads) == 1 else b"".join(payloads)


async def _relay(send: Callable[[bytes], Awaitable[None]], stream: Stream) -> None:
    """The frames after the first ones, as they come."""
    try:
        payloads = await stream.next()
        while payloads is not None:
            await send(_joined(payloads))
            payloads = await stream.next()
    except GatewayError as exc:
        await send(anthropic_error_frame(exc))


async def send_error(responder: Responder, exc: GatewayError, request_id: str) -> None:
    """Answer ``exc`` in Anthropic's envelope (with Anthropic's status for its type and
    ``request_id`` as Anthropic sends it), unless a response already started."""
    if responder.started:
        return
    status, headers, body = anthropic_error_response(exc, request_id)
    await responder.respond(status, (*JSON_HEADERS, *_rate_headers(headers)), body)


def _rate_headers(headers: Headers) -> Headers:
    """OpenAI's ``x-ratelimit-*`` (kept: harmless, and what dashboards already read) plus
    Anthropic's ``anthropic-ratelimit-*`` names for the same numbers."""
    if not headers:
        return headers
    renamed = anthropic_headers(headers, time.time())
    return (*headers, *(h for h in renamed if h[0].startswith(b"anthropic-")))
