"""Stored Responses in the durable store: :class:`ResponsesSide`, a base of
:class:`~runestone_proxy.server.store.Store` that makes it a
:class:`~runestone_proxy.gateway.responses_store.ResponseStore` (conversation state for
``previous_response_id``). The SQL is in :mod:`.store_sql`; the table is described in
:mod:`.store_schema`.

How this works
--------------
* **Through the writer.** Saving and deleting take the store's group commit
  (``Store._submit``): one writer, shared commits, no fsync of their own. Reads take the
  store's one way in (``Store._call``).
* **Bounded per record** (``max_record_bytes``: the cap of a job's result); a larger one is
  not stored and says so with ``responses.not_stored``.
* **Kept ``retention_s``** like finished jobs: reads hide an expired one at once (``clock``),
  the sweep (:mod:`.store_jobs`) deletes it. A save that is due for sweeping before anything
  the last sweep reported rings ``sweep_due`` (``Store._sweep_by``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import structlog

from runestone_proxy.config import OverflowConfig
from runestone_proxy.gateway.responses_store import StoredResponse, fits, report_not_stored
from runestone_proxy.server import store_sql as sql
from runestone_proxy.server.store_db import Db
from runestone_proxy.server.store_values import Answer, Delete, StoreStats, Write

__all__ = ["ResponsesSide"]

log = structlog.get_logger("runestone.store")
T = TypeVar("T")


class ResponsesSide:
    """The stored Responses' part of the store (a base of ``Store``, which owns the fields,
    the connection and the writer)."""

    config: OverflowConfig
    max_record_bytes: int
    stats: StoreStats
    clock: Callable[[], float]

    if TYPE_CHECKING:

        async def _call(self, fn: Callable[[Db], T], *, write: bool = False) -> T: ...

        async def _submit(self, item: Write, now: float) -> Answer: ...

        def _sweep_by(self, due: float | None) -> None: ...

    async def save_response(self, record: StoredResponse) -> None:
        """Commit ``record`` (group commit), or, over ``max_record_bytes``, store nothing and
        emit ``responses.not_stored``."""
        if not fits(record, self.max_record_bytes):
            self.stats.responses_not_stored += 1
            log.warning(
                "responses.not_stored",
                tenant=record.tenant,
                response_id=record.id,
                size_bytes=record.size,
                max_bytes=self.max_record_bytes,
            )
            report_not_stored(record, self.max_record_bytes)
            return
        await self._submit(record, self.clock())
        self.stats.responses_saved += 1
        self._sweep_by(record.created_at + self.config.retention_s)

    async def get_response(self, tenant: str, response_id: str) -> StoredResponse | None:
        """The tenant's record, unless it is past ``retention_s`` (swept or not yet)."""
        since = self.clock() - self.config.retention_s
        return await self._call(lambda c: sql.select_response(c, tenant, response_id, since))

    async def delete_response(self, tenant: str, response_id: str) -> bool:
        """Delete the tenant's record (through the writer); False if none was within
        retention."""
        answer = await self._submit(Delete(tenant, response_id), self.clock())
        assert isinstance(answer, bool)
        return answer
