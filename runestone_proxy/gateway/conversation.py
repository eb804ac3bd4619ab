"""Conversation state for the Responses dialect: ``previous_response_id`` and ``store``.

Runestone keeps the state itself, per tenant, in the durable store
(:class:`~.responses_store.ResponseStore`), so a conversation continues on any provider:

    expand(store, gen)   before routing: a request naming ``previous_response_id`` gets
                         its ``input`` expanded to the stored turn's whole input, that
                         turn's output, then the new input; the id is removed (a native
                         provider is sent the whole history too). An unknown id, or
                         another tenant's, is 404 ``previous_response_not_found``.
                         Returns the input items this turn answers.
    keep(store, gen, items, response)
                         after the answer: unless the request said ``"store": false``, the
                         Response (as the client got it) and its input items are saved,
                         for the next turn and ``GET /v1/responses/{id}``.

``instructions`` are not carried over (OpenAI: "the instructions from a previous response
will not be carried over to the next response").
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING, Any

import attrs

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, InvalidParam, NotFound
from runestone_proxy.gateway.responses_store import ResponseStore, StoredResponse
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.responses_request import input_items, output_to_input

if TYPE_CHECKING:
    from runestone_proxy.gateway.service import Generation

__all__ = ["Turn", "expand", "keep"]


@attrs.frozen
class Turn:
    """What :func:`expand` found: the input items this turn answers, and the
    ``previous_response_id`` it continues (None for a first turn)."""

    items: list[dict[str, Any]]
    previous: str | None = None

    def echo(self, data: bytes) -> bytes:
        """``data`` (an answer, or stream frames carrying the Response) naming the previous
        response as OpenAI's answers do: the id was taken out of the request before it was
        served (the history went instead), so the provider or translator answered null."""
        if self.previous is None or _NULL_PREVIOUS not in data:
            return data
        named = b'"previous_response_id":' + dumps(self.previous)
        return data.replace(_NULL_PREVIOUS, named)


_NULL_PREVIOUS = b'"previous_response_id":null'


async def expand(store: ResponseStore | None, gen: Generation) -> Turn:
    """The whole input of this turn (see the module docstring); ``gen`` is updated."""
    body = gen.body
    items = input_items(body)
    previous = body.pop("previous_response_id", None)
    if previous is None:
        return Turn(items)
    if not isinstance(previous, str) or not previous:
        raise InvalidParam(
            "'previous_response_id' must be a non-empty string.", param="previous_response_id"
        )
    record = None if store is None else await store.get_response(gen.principal.tenant, previous)
    if record is None:
        raise NotFound(
            f"Previous response with id '{previous}' not found.",
            param="previous_response_id",
            code="previous_response_not_found",
        )
    prior = json.loads(record.input_items)
    answered = json.loads(record.response)
    output = answered.get("output") if isinstance(answered, dict) else None
    items = [*prior, *output_to_input(output if isinstance(output, list) else []), *items]
    body["input"] = items
    gen.raw = dumps(body)  # what a native provider is sent: the expanded history
    return Turn(items, previous)


async def keep(
    store: ResponseStore | None,
    gen: Generation,
    turn: Turn,
    response: bytes | None,
) -> None:
    """Save the answered turn, unless ``store`` is false or there is nothing to save."""
    if store is None or response is None or gen.body.get("store") is False:
        return
    try:
        answer = json.loads(response)
    except ValueError:
        answer = None
    response_id = answer.get("id") if isinstance(answer, dict) else None
    if not isinstance(response_id, str) or not response_id:
        telemetry.emit("responses.not_stored", request_id=gen.request_id, reason="no id")
        return
    record = StoredResponse(
        id=response_id,
        tenant=gen.principal.tenant,
        created_at=time.time(),
        input_items=dumps(turn.items),
        response=turn.echo(response),
    )
    try:
        await store.save_response(record)
    except GatewayError as exc:
        # The answer stands (the model gave it; the client is owed it): only the next turn's
        # ``previous_response_id`` will not find this one.
        telemetry.emit("responses.not_stored", request_id=gen.request_id, reason=exc.message)
