"""What the request flow needs from stored Responses: the conversation-state interface.

The OpenAI Responses API keeps conversation state on the server
(https://platform.openai.com/docs/api-reference/responses): a response created with
``store`` (the default) can be continued with ``previous_response_id``, read back with
``GET /v1/responses/{id}``, deleted, and its input listed with ``.../input_items``. Runestone
keeps that state itself, per tenant, for every provider, so these three operations are the
whole interface: a ``typing.Protocol`` that an implementation fits by its shape. The embedded
one is :class:`runestone_proxy.server.store.Store` (SQLite, beside the overflow queue, same
group commit); :class:`MemoryResponses` here serves unit tests.

A record is bounded: one larger than the store's cap (the cap of a job's result) is not
stored, and says so with a ``responses.not_stored`` event (:func:`fits`,
:func:`report_not_stored`); a later ``previous_response_id`` naming it is then a 404, as is
one past retention. Ids leak nothing: another tenant's id reads as unknown.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import attrs

from runestone_proxy import telemetry

__all__ = ["MemoryResponses", "ResponseStore", "StoredResponse", "fits", "report_not_stored"]


@attrs.frozen
class StoredResponse:
    """One stored Response of one tenant, as the client got it, and the input it answered."""

    id: str
    tenant: str
    #: Unix seconds; retention counts from here.
    created_at: float
    #: JSON array: the whole input the response answered, history included.
    input_items: bytes = attrs.field(repr=False)
    #: JSON object: the Response as the client got it.
    response: bytes = attrs.field(repr=False)

    @property
    def size(self) -> int:
        """The bytes a record costs (what the cap bounds)."""
        return len(self.input_items) + len(self.response)


class ResponseStore(Protocol):
    """Stored Responses, each owned by one tenant."""

    async def save_response(self, record: StoredResponse) -> None:
        """Store ``record`` durably before returning (replacing one with the same tenant and
        id). A record over the store's cap is not stored (``responses.not_stored``)."""

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The record, if it exists, belongs to ``tenant`` and is within retention."""

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        """Delete the record; False if :meth:`get_response` would not have found it."""


def fits(record: StoredResponse, max_bytes: int) -> bool:
    """May ``record`` be stored under a cap of ``max_bytes``?"""
    return record.size <= max_bytes


def report_not_stored(record: StoredResponse, max_bytes: int) -> None:
    """The ``responses.not_stored`` event for a record over the cap (ids and sizes only)."""
    telemetry.emit(
        "responses.not_stored",
        tenant=record.tenant,
        response_id=record.id,
        reason="too_large",
        size_bytes=record.size,
        max_bytes=max_bytes,
    )


def expired(record: StoredResponse, now: float, retention_s: float) -> bool:
    """Past retention: what the store's sweep deletes (``created_at <= now - retention_s``)."""
    return record.created_at <= now - retention_s


@attrs.define
class MemoryResponses:
    """An in-memory :class:`ResponseStore` for unit tests: the same cap and retention
    rules as the SQLite store, nothing durable."""

    max_bytes: int = 32 * 1024 * 1024
    retention_s: float = 7 * 86400.0
    clock: Callable[[], float] = time.time
    records: dict[tuple[str, str], StoredResponse] = attrs.Factory(dict)

    async def save_response(self, record: StoredResponse) -> None:
        if not fits(record, self.max_bytes):
            report_not_stored(record, self.max_bytes)
            return
        self.records[record.tenant, record.id] = record

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse | None:
        record = self.records.get((tenant, response_id))
        if record is None or expired(record, self.clock(), self.retention_s):
            return None
        return record

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        if await self.get_response(tenant, response_id) is None:
            return False
        del self.records[tenant, response_id]
        return True
