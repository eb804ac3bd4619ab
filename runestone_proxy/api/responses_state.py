"""Stored Responses over HTTP: ``GET`` and ``DELETE /v1/responses/{response_id}`` and
``GET /v1/responses/{response_id}/input_items``, as the OpenAI Responses API answers them
(https://platform.openai.com/docs/api-reference/responses: retrieve, delete, list input
items; the ``openai`` SDK's ``responses.retrieve``, ``responses.delete`` and
``responses.input_items.list``).

The records come from a :class:`~runestone_proxy.gateway.responses_store.ResponseStore`
(the SQLite store in production), scoped to the caller's tenant: another tenant's id, an
unknown one and one past retention all answer the same 404, in OpenAI's words (``Response
with id '...' not found.``, ``code`` null), so ids leak nothing.

The input list is the whole input the response answered (history included), oldest first
as stored; OpenAI lists it newest first by default (``order=desc``). An item keeps its
``id``; one without gets a deterministic one (``msg_`` for a message, ``item_`` otherwise)
from the response id and its index, so pages agree with each other and with a later read.
A page is ``{"object": "list", "data", "first_id", "last_id", "has_more"}``, cut by
``limit`` (1-100, default 20) and ``after`` (an item id: the SDK's cursor).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any
from urllib.parse import parse_qs

from runestone_proxy.api.http import JSON_HEADERS, Request, Responder
from runestone_proxy.api.jobs import Authenticate
from runestone_proxy.api.router import Router
from runestone_proxy.errors import InvalidParam, NotFound
from runestone_proxy.gateway.responses_store import ResponseStore, StoredResponse

DEFAULT_LIMIT = 20
MAX_LIMIT = 100
ORDERS = ("asc", "desc")


def not_found(response_id: str) -> NotFound:
    """404 as OpenAI answers an unknown response id: ``invalid_request_error``, code null."""
    error = NotFound(f"Response with id '{response_id[:100]}' not found.")
    error.code = None
    return error


def _dumps(value: Any) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def item_id(response_id: str, index: int, item: dict[str, Any]) -> str:
    """The id an id-less input item is listed with: stable for (response, index)."""
    is_message = item.get("type", "message") == "message" and "role" in item
    prefix = "msg" if is_message else "item"
    digest = hashlib.sha256(f"{response_id}/input/{index}".encode()).hexdigest()[:32]
    return f"{prefix}_{digest}"


def listed_items(response_id: str, input_items: bytes) -> list[dict[str, Any]]:
    """The stored input as listed, oldest first: every item (an object) with an ``id``.
    Bytes this gateway did not write as a JSON array of objects list what objects there are."""
    try:
        items = json.loads(input_items)
    except (ValueError, RecursionError):
        return []
    if not isinstance(items, list):
        return []
    listed = []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            continue
        if not (isinstance(item.get("id"), str) and item["id"]):
            item = {"id": item_id(response_id, index, item), **item}
        listed.append(item)
    return listed


def _one(params: dict[str, list[str]], name: str) -> str:
    values = params.get(name, [])
    return values[-1] if values else ""


def _limit(text: str) -> int:
    if not text:
        return DEFAULT_LIMIT
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise InvalidParam(f"limit: must be an integer from 1 to {MAX_LIMIT}.", param="limit")
    return int(text)


def input_items_page(record: StoredResponse, query: str) -> bytes:
    """A page of ``record``'s input items as OpenAI's list answer, cut as ``query`` asks
    (``include`` and unknown parameters are accepted and change nothing)."""
    params = parse_qs(query, keep_blank_values=True)
    limit = _limit(_one(params, "limit"))
    order = _one(params, "order") or "desc"
    if order not in ORDERS:
        raise InvalidParam("order: must be 'asc' or 'desc'.", param="order")
    items = listed_items(record.id, record.input_items)
    if order == "desc":
        items.reverse()
    start = 0
    after = _one(params, "after")
    if after:
        ids = [item["id"] for item in items]
        if after not in ids:
            raise InvalidParam(f"after: no input item with id '{after[:100]}'.", param="after")
        start = ids.index(after) + 1
    rest = items[start:]
    page = rest[:limit]
    return _dumps(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(rest) > limit,
        }
    )


def deleted_body(response_id: str) -> bytes:
    return _dumps({"id": response_id, "object": "response.deleted", "deleted": True})


def add_routes(router: Router, store: ResponseStore, authenticate: Authenticate) -> None:
    """Register the three routes. ``authenticate`` is ``Api.authenticate`` (the current key
    table across reloads; it emits ``auth.failure``)."""

    async def find(request: Request) -> StoredResponse:
        principal = authenticate(request)
        response_id = request.path_params["response_id"]
        record = await store.get_response(principal.tenant, response_id)
        if record is None:
            raise not_found(response_id)
        return record

    async def get_response(request: Request, responder: Responder) -> None:
        record = await find(request)
        await responder.respond(200, JSON_HEADERS, record.response)

    async def delete_response(request: Request, responder: Responder) -> None:
        principal = authenticate(request)
        response_id = request.path_params["response_id"]
        if not await store.delete_response(principal.tenant, response_id):
            raise not_found(response_id)
        await responder.respond(200, JSON_HEADERS, deleted_body(response_id))

    async def list_input_items(request: Request, responder: Responder) -> None:
        record = await find(request)
        await responder.respond(200, JSON_HEADERS, input_items_page(record, request.query))

    router.add("GET", "/v1/responses/{response_id}", get_response)
    router.add("DELETE", "/v1/responses/{response_id}", delete_response)
    router.add("GET", "/v1/responses/{response_id}/input_items", list_input_items)
