"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``, ``/v1/models/{model}`` and the legacy ``/v1/chat/stream``.

Thin handlers over the request service (:mod:`runestone_proxy.gateway.service`): read the
headers and the body, authenticate, hand the service plain values, and write what it gives
back in OpenAI's shapes: a whole answer with ``x-runestone-provider`` and
``x-runestone-routing-policy`` (its body already carries top-level ``provider``,
``routing_policy`` and ``request_id``), a parked job as ``202``, or a stream relayed as SSE.

The service hands a stream over only once the provider produced its first payloads, so an
error before that is answered as an ordinary error envelope with its status; after it, the
stream ends with ``data: {"error": ...}`` and ``data: [DONE]`` (never a made-up
``finish_reason``). Every event is flushed as it is written; nothing buffers a whole stream.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from runestone_proxy.api import models
from runestone_proxy.api.accept import accept, authenticate
from runestone_proxy.api.http import (
    JSON_HEADERS,
    SSE_HEADERS,
    Request,
    Responder,
    provider_headers,
    send_final,
    start_with,
)
from runestone_proxy.api.jobs import answer_parked
from runestone_proxy.api.router import Router
from runestone_proxy.config.aliases import is_pattern
from runestone_proxy.errors import GatewayError, InvalidParam, ModelNotFound
from runestone_proxy.gateway.admission import Parked
from runestone_proxy.gateway.auth import Principal
from runestone_proxy.gateway.service import Service, Stream
from runestone_proxy.protocol.sse import DONE, encode_data
from runestone_proxy.providers.base import Endpoint


@attrs.define(eq=False)
class Api:
    """The OpenAI endpoints, over the request service."""

    service: Service

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v1/chat/completions", self.chat_completions)
        router.add("POST", "/v1/completions", self.completions)
        router.add("POST", "/v1/embeddings", self.embeddings)
        router.add("POST", "/v1/chat/stream", self.legacy_chat_stream)
        router.add("GET", "/v1/models", self.list_models)
        router.add("GET", "/v1/models/{model}", self.get_model)

    # --- handlers ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "chat")

    async def completions(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "completions")

    async def embeddings(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "embeddings")

    async def legacy_chat_stream(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "chat", force_stream=True)

    def authenticate(self, request: Request) -> Principal:
        return authenticate(self.service, request)

    async def list_models(self, request: Request, responder: Responder) -> None:
        """Routable models, then exact aliases; in Anthropic's shape for a request that
        carries ``anthropic-version`` (:mod:`.models`). Patterns name no model: unlisted."""
        self.authenticate(request)
        rows = self.service.routing.listed_models()
        if request.header(models.ANTHROPIC_VERSION) is not None:
            body = models.page_body(rows, request.query)
        else:
            data = [_model_object(mid, owner, alias) for mid, owner, alias in rows]
            body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        await responder.respond(200, JSON_HEADERS, body)

    async def get_model(self, request: Request, responder: Responder) -> None:
        """A listed model or alias; or a name a pattern routes (an alias pattern's, or a
        provider's ``model_patterns``), so a client may check a dated id before using it."""
        self.authenticate(request)
        wanted = request.path_params["model"]
        row = self._model_row(wanted)
        if request.header(models.ANTHROPIC_VERSION) is not None:
            body = models.info_body(row)
        else:
            body = json.dumps(_model_object(*row), separators=(",", ":")).encode()
        await responder.respond(200, JSON_HEADERS, body)

    def _model_row(self, wanted: str) -> tuple[str, str, str | None]:
        routing = self.service.routing
        for row in routing.listed_models():
            if row[0] == wanted:
                return row
        try:
            # ModelNotFound from here says why (e.g. its claimant's key is unset).
            resolution = routing.resolve(wanted)
        except InvalidParam:
            resolution = None
        if resolution is not None:
            target = resolution.targets[0]
            if resolution.via == "pattern":
                return wanted, target.provider, None
            if resolution.alias is not None and is_pattern(resolution.alias):
                return wanted, "runestone", target.label
        raise ModelNotFound(
            f"The model `{wanted}` does not exist or you do not have access to it.", param="model"
        )

    async def _generate(
        self, request: Request, responder: Responder, endpoint: Endpoint, force_stream: bool = False
    ) -> None:
        """Authenticate, read the body, and let the service accept, admit and serve it."""
        gen = await accept(self.service, request, endpoint, force_stream=force_stream)
        if gen.stream:
            async with self.service.open_stream(gen) as stream:
                if type(stream) is Parked:
                    await answer_parked(responder, stream)
                else:
                    await relay(responder, stream)
            return
        answer = await self.service.complete(gen)
        if type(answer) is Parked:
            await answer_parked(responder, answer)
            return
        headers = (
            *JSON_HEADERS,
            *provider_headers(answer.target.provider, answer.policy),
            *answer.headers,
        )
        await responder.respond(200, headers, answer.body)


async def relay(responder: Responder, stream: Stream) -> None:
    """Write an open stream as SSE: the response starts with its first payloads in hand;
    an error after that ends it in-band (an error event, then ``[DONE]``)."""
    headers = (*SSE_HEADERS, *provider_headers(stream.target.provider, stream.policy))
    first = stream.first
    await start_with(responder, 200, (*headers, *stream.headers), _encode(first or []))
    try:
        payloads = None if first is None else await stream.next()
        while payloads is not None:
            await responder.send(_encode(payloads))
            payloads = await stream.next()
    except GatewayError as exc:
        await send_final(responder, encode_data(exc.body()) + DONE)
        return
    await send_final(responder, DONE)


def _encode(payloads: list[bytes]) -> bytes:
    if len(payloads) == 1:
        return encode_data(payloads[0])
    return b"".join(encode_data(p) for p in payloads)


def _model_object(model_id: str, owner: str, alias_for: str | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": model_id, "object": "model", "created": 0, "owned_by": owner}
    if alias_for is not None:
        obj["alias_for"] = alias_for
    return obj
