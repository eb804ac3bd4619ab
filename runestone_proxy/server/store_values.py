"""The values the durable store (:mod:`.store`) exchanges with its callers and its writer
task: where the database lives, the doorbell, statistics, the claim schedule, and the
items the single writer commits in groups (a job to enqueue, a stored Response to save or
delete) with their answers.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import attrs
import trio

from runestone_proxy.errors import GatewayError
from runestone_proxy.gateway.overflow import Enqueued, NewJob
from runestone_proxy.gateway.responses_store import StoredResponse

#: Room for the gateway's own fields on top of ``upstream.max_response_bytes``: the same as
#: the drainer's ``RESULT_OVERHEAD_BYTES``, so a stored Response is capped like a job result.
RECORD_OVERHEAD_BYTES = 64 * 1024


def resolve_path(database: str, env: Mapping[str, str]) -> Path:
    path = Path(database)
    if path.is_absolute():
        return path
    state_dir = env.get("RUNESTONE_STATE_DIR")
    return (Path(state_dir) if state_dir else Path.cwd()) / path


@attrs.define
class Wakeup:
    """A level-triggered doorbell for one waiter: a ``set`` before ``wait`` is not lost."""

    _event: trio.Event = attrs.Factory(trio.Event)

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


@attrs.define
class StoreStats:
    #: Committed write transactions (every kind).
    transactions: int = 0
    #: Of which group commits (of enqueues and stored Responses), and the jobs they created.
    enqueue_batches: int = 0
    enqueued: int = 0
    #: Responses saved, and those not stored (over ``max_record_bytes``).
    responses_saved: int = 0
    responses_not_stored: int = 0
    #: Jobs buried as dead (claimed ``max_claims`` times with no outcome recorded).
    dead: int = 0
    #: Usage records handed to the store, written, dropped (pending buffer full, a record
    #: SQLite refused), and the writer passes that wrote some.
    ledger_recorded: int = 0
    ledger_written: int = 0
    ledger_dropped: int = 0
    ledger_batches: int = 0


@attrs.frozen
class Schedule:
    """What is claimable now (per tenant) and when the next thing becomes claimable."""

    due: Mapping[str, int]
    next_at: float | None

    @property
    def depth(self) -> int:
        return sum(self.due.values())


@attrs.frozen
class Delete:
    """Delete the tenant's stored Response ``id``."""

    tenant: str
    id: str


@attrs.frozen
class Barrier:
    """Nothing to write: a caller waiting for the writer's next commit (and the usage
    records it takes)."""


#: What the writer commits: a job to enqueue, a Response to save, a Response to delete; and
#: the answers (the enqueue's, True for a save or a barrier, whether a delete found its
#: record).
Write = NewJob | StoredResponse | Delete | Barrier
Answer = Enqueued | bool


@attrs.define(eq=False)
class Pending:
    """One item handed to the writer; ``done`` is set once ``answer`` is."""

    item: Write = attrs.field(repr=False)
    now: float
    done: trio.Event = attrs.Factory(trio.Event)
    answer: Answer | GatewayError | None = None
