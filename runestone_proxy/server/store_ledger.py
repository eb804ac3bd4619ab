"""The usage ledger in the durable store: the pending buffer and :class:`LedgerSide`, the
ledger's half of :class:`~runestone_proxy.server.store.Store` (``record``, the shutdown
flush, ``usage_totals``, ``usage_report``, ``spend``), which makes the store a
:class:`~runestone_proxy.gateway.ledger.UsageLedger`. The SQL is in
:mod:`.store_ledger_sql`; the tables are described in :mod:`.store_schema` (v5).

How this works
--------------
* **Off the hot path.** ``Store.record`` appends to a :class:`LedgerBuffer` (on the event
  loop: no I/O, no lock) and rings the store's single writer once. Each writer pass takes up
  to :data:`PASS_MAX` records and writes them in the same transaction as the pass's
  enqueues and Response saves: the ledger adds no fsync of its own.
* **Bounded.** At most :data:`MAX_PENDING` records wait; past that the oldest is dropped
  (``ledger.dropped`` telemetry per drop, one warning log per episode) rather than making a
  request wait or the process grow.
* **Isolated.** The records of a pass go in under their own savepoint: if SQLite refuses
  them, they are retried one by one, each in its own savepoint, and only those refused are
  dropped; the pass's other items commit all the same. A pass whose whole transaction
  fails (locked, disk full) puts its records back at the front of the buffer.
* **Rollups.** ``usage_hourly`` and ``usage_daily`` are updated in the raw insert's
  transaction (``INSERT ... ON CONFLICT DO UPDATE SET x = x + excluded.x``), from the
  batch's records summed per bucket first, so they always equal the raw rows' sums (until
  retention deletes raw rows). Buckets are UTC hour and day starts in unix seconds.
* **Retention.** Each sweep deletes at most ``SWEEP_BATCH`` (10,000) rows per table (a
  large backlog is deleted over several passes, none holding the writer long; the next pass
  is due at once). Raw records are swept a minute (``RAW_SWEEP_SLACK_S``) after they pass
  ``retention_days``, so a busy ledger is swept once a minute, not once per record.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.errors import GatewayError, ServiceUnavailable
from runestone_proxy.gateway.ledger import UsageRow
from runestone_proxy.gateway.usage_report import UsageQuery, UsageReport
from runestone_proxy.server import store_ledger_sql as sql
from runestone_proxy.server import usage_report_sql
from runestone_proxy.server.store_db import Backend, Db
from runestone_proxy.server.store_values import Answer, Barrier, Pending, StoreStats, Write

__all__ = ["MAX_PENDING", "PASS_MAX", "LedgerBuffer", "LedgerSide"]

log = structlog.get_logger("runestone.store")
T = TypeVar("T")

#: Records that may wait for the writer; past this the oldest are dropped.
MAX_PENDING = 10_000
#: Records written per writer pass (the rest wait for the next pass, rung at once).
PASS_MAX = 4096


# --- the pending buffer (event loop side) ------------------------------------------------------


@attrs.define(eq=False)
class LedgerBuffer:
    """Records waiting for the writer: bounded, the oldest dropped first."""

    stats: StoreStats
    max_pending: int = MAX_PENDING
    #: The writer has been rung for what is pending (cleared when it takes records).
    rung: bool = False
    _pending: deque[UsageRow] = attrs.Factory(deque)
    _warned: bool = False

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, record: UsageRow) -> bool:
        """Queue ``record``; True if the writer needs ringing now: a pass's worth is
        waiting (otherwise the flush timer, or any earlier write, takes the records: one
        commit, and one fsync, per interval rather than per request)."""
        self.stats.ledger_recorded += 1
        pending = self._pending
        if len(pending) >= self.max_pending:
            pending.popleft()
            self.dropped(1, "buffer_full")
        pending.append(record)
        if self.rung or len(pending) < PASS_MAX:
            return False
        self.rung = True
        return True

    def take(self, limit: int = PASS_MAX) -> list[UsageRow]:
        """Up to ``limit`` of the oldest records, for one writer pass."""
        pending = self._pending
        self.rung = False
        if len(pending) <= limit:  # the usual pass: all of them, copied and cleared in C
            records = list(pending)
            pending.clear()
            return records
        return [pending.popleft() for _ in range(limit)]

    def put_back(self, records: Sequence[UsageRow]) -> None:
        """Records a failed transaction did not write: first in line again, as room allows
        (the oldest of them are dropped first)."""
        room = max(0, self.max_pending - len(self._pending))
        kept = list(records[len(records) - room :]) if room < len(records) else list(records)
        if len(kept) < len(records):
            self.dropped(len(records) - len(kept), "buffer_full")
        self._pending.extendleft(reversed(kept))

    def discard(self) -> None:
        """Drop everything pending (the store closed and cannot write it)."""
        if self._pending:
            self.dropped(len(self._pending), "store_closed")
            self._pending.clear()

    def written(self, count: int) -> None:
        self.stats.ledger_written += count
        self.stats.ledger_batches += 1
        self._warned = False

    def dropped(self, count: int, reason: str) -> None:
        self.stats.ledger_dropped += count
        telemetry.emit("ledger.dropped", count=count, reason=reason)
        if not self._warned:  # once per episode: a full buffer would log per request
            self._warned = True
            log.warning("ledger.dropped", count=count, reason=reason, pending=len(self))


class LedgerSide:
    """The ledger's half of the store (a base of ``Store``, which owns the fields and the
    writer: it takes the buffer's records in each pass, see ``Store._writer``)."""

    ledger_config: LedgerConfig
    backend: Backend
    inline: bool
    stats: StoreStats
    clock: Callable[[], float]
    _ledger: LedgerBuffer
    _send: trio.MemorySendChannel[Pending | None] | None

    if TYPE_CHECKING:

        async def _call(self, fn: Callable[[Db], T], *, write: bool = False) -> T: ...

        async def _submit(self, item: Write, now: float) -> Answer: ...

        def _sweep_by(self, due: float | None) -> None: ...

    def record(self, record: UsageRow) -> None:
        """Buffer ``record`` for the writer's next group commit; never blocks (past
        :data:`MAX_PENDING` waiting, the oldest is dropped: ``ledger.dropped``)."""
        if self._ledger.add(record):
            self._ring()

    def _ring(self) -> None:
        self._ledger.rung = True
        if self._send is not None:
            try:
                self._send.send_nowait(None)
            except trio.WouldBlock:  # the writer has items waiting: its next pass takes them
                pass

    def _ledger_written(self, records: list[UsageRow], refused: list[UsageRow]) -> None:
        self._ledger_counted(len(records), refused, sql.first_due(records, self.ledger_config))

    def _ledger_counted(self, count: int, refused: list[UsageRow], due: float | None) -> None:
        """A pass wrote ``count`` records but ``refused``; the earliest falls due at ``due``."""
        if refused:
            self._ledger.dropped(len(refused), "refused")
        if count > len(refused):
            self._ledger.written(count - len(refused))
        self._sweep_by(due)

    async def _flush_ledger(self) -> None:
        """Shutdown: write what is pending, a pass's worth per transaction (what cannot be
        written is dropped and reported)."""
        while self._ledger:
            records = self._ledger.take()
            try:
                refused = await self._call(
                    functools.partial(sql.write, records=records), write=True
                )
            except GatewayError:
                self._ledger.put_back(records)
                self._ledger.discard()
                return
            self._ledger_written(records, refused)

    async def sync_ledger(self) -> None:
        """Wait until every record handed over before this call is written (or dropped):
        for reads that must see them (tests, an accuracy check)."""
        target = self.stats.ledger_recorded
        while self.stats.ledger_written + self.stats.ledger_dropped < target:
            await self._submit(Barrier(), self.clock())

    async def usage_totals(
        self,
        *,
        since: float,
        until: float,
        group_by: Sequence[str],
        granularity: sql.Granularity | None = None,
        tenant: str | None = None,
    ) -> list[dict[str, Any]]:
        """Usage summed over the rollup buckets that start in ``[since, until)``, one dict
        per ``group_by`` combination (of tenant, key_id, model, provider; 400 for another)
        and, with a ``granularity``, per UTC hour or day (``bucket_start``): requests,
        errors, the four token counts and cost_usd. ``None`` reads the hourly rollup, or the
        daily one when ``since`` is before the hourly retention. Records still buffered
        are not counted (:meth:`sync_ledger`)."""
        hourly_kept_from = self.clock() - self.ledger_config.hourly_retention_days * sql.DAY_S
        daily = granularity == "day" or (granularity is None and since < hourly_kept_from)
        return await self._call(
            lambda c: sql.totals(
                c,
                since=since,
                until=until,
                group_by=group_by,
                granularity=granularity,
                tenant=tenant,
                daily=daily,
            )
        )

    async def usage_report(self, query: UsageQuery) -> UsageReport:
        """``GET /admin/usage``: the records buffered so far written first (a report right
        after a request sees it), then ``query`` read on a connection of its own, off the
        writer's, on a worker thread of its own (:func:`.usage_report_sql.read`: a long
        report never stalls commits; the store's one thread is not taken either)."""
        await self.sync_ledger()
        read = functools.partial(
            usage_report_sql.read, self.backend, query, self.ledger_config, self.clock
        )
        try:
            return read() if self.inline else await trio.to_thread.run_sync(read)
        except usage_report_sql.Unreadable as exc:
            log.error("store.error", error=str(exc), kind=type(exc).__name__)
            raise ServiceUnavailable(f"The usage ledger cannot be read: {exc}") from exc

    async def spend(self, tenant: str, key_id: str | None, since: float) -> tuple[float, int]:
        """USD and tokens (prompt + completion) of ``tenant`` (only ``key_id``'s, if given)
        since ``since``: exact (hourly rollup + the raw records before the first hour
        boundary: :func:`.store_sql.spend`), but for records still buffered."""
        return await self._call(lambda c: sql.spend(c, tenant, key_id, since))
