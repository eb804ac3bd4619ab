"""OpenAI's Responses API: ``POST /v1/responses`` (the stored turns' ``GET``/``DELETE`` and
``input_items`` live in :mod:`.responses_state`).

A thin handler over the same request service as chat completions and the Messages dialect:
routing, tenancy, rate limits, failover, hedging and the overflow queue apply unchanged.
What is particular to the dialect:

* conversation state (:mod:`runestone_proxy.gateway.conversation`): ``previous_response_id``
  expands the input from the durable store before the request is served; the answer is
  saved afterwards unless ``"store": false``, whatever provider gave it;
* the answer: a Response object, or the Responses event stream (each payload one whole
  ``event:``/``data:`` frame carrying ``sequence_number``): native from a provider that
  speaks the Responses API (``responses_api``), translated from chat for any other;
* a failure after the stream started ends it with the Responses ``error`` event (its
  ``sequence_number`` the next in the stream); before that, OpenAI's error envelope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import attrs

from runestone_proxy.api.accept import accept
from runestone_proxy.api.http import (
    JSON_HEADERS,
    SSE_HEADERS,
    Request,
    Responder,
    provider_headers,
    start_with,
)
from runestone_proxy.api.jobs import answer_parked
from runestone_proxy.api.router import Router
from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway import conversation
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.service import Service, Stream
from runestone_proxy.providers.responses_stream import error_frame


@attrs.define(eq=False)
class ResponsesApi:
    """``POST /v1/responses``, over the request service."""

    service: Service

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v1/responses", self.create)

    async def create(self, request: Request, responder: Responder) -> None:
        service = self.service
        gen = await accept(service, request, "responses")
        turn = await conversation.expand(service.responses, gen)

        async def keep(response: bytes | None) -> None:
            # Saved before the client can see the end of the answer, so that a next turn
            # sent the moment it arrives finds this one (read-your-writes).
            await conversation.keep(service.responses, gen, turn, response)

        if gen.stream:
            async with service.open_stream(gen) as stream:
                if type(stream) is Parked:
                    await answer_parked(responder, stream)
                    return
                await relay(responder, stream, keep, turn)
            return
        answer = await service.complete(gen)
        if type(answer) is Parked:
            await answer_parked(responder, answer)
            return
        body = turn.echo(answer.body)
        await keep(body)
        headers = (
            *JSON_HEADERS,
            *provider_headers(answer.target.provider, answer.policy),
            *answer.headers,
        )
        await responder.respond(200, headers, body)


async def relay(
    responder: Responder,
    stream: Stream,
    keep: Callable[[bytes | None], Awaitable[None]],
    turn: conversation.Turn,
) -> None:
    """Write an open Responses stream (its payloads are whole frames, one event each); an
    error after the start ends it with an ``error`` event. The batch that carries the
    terminal event (``response.completed`` / ``.incomplete``) goes out only after ``keep``
    saved the final Response."""
    headers = (
        *SSE_HEADERS,
        *provider_headers(stream.target.provider, stream.policy),
        *stream.headers,
    )
    payloads = stream.first
    sent = 0
    kept = False
    started = False
    try:
        while payloads is not None:
            if not kept and stream.final is not None:
                kept = True
                await keep(stream.final)
            sent += len(payloads)
            data = payloads[0] if len(payloads) == 1 else b"".join(payloads)
            if turn.previous is not None:
                data = turn.echo(data)
            if started:
                await responder.send(data)
            else:  # the head with the first frames: one write fewer per stream on HTTP/1.1
                started = True
                await start_with(responder, 200, headers, data)
            payloads = await stream.next()
    except GatewayError as exc:
        if not started:
            started = True
            await responder.start(200, headers)
        await responder.send(error_frame(exc, sent))
    if not started:  # a stream that ended before any frame
        await responder.start(200, headers)
