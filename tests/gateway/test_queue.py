"""The job-queue interface: the SQLite store is what it describes, at run time too."""

from __future__ import annotations

import inspect
from pathlib import Path

import trio

from runestone_proxy.config import OverflowConfig
from runestone_proxy.gateway.overflow import NewJob
from runestone_proxy.gateway.queue import JobQueue
from runestone_proxy.server.store import Store


def members(cls: type) -> set[str]:
    return {name for name in vars(cls) if not name.startswith("_")}


def test_the_interface_is_the_request_flows_four_operations() -> None:
    assert members(JobQueue) == {"is_open", "enqueue", "get", "find_idempotent"}


async def test_the_store_answers_through_the_interface(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    # mypy proves the signatures where server/app.py hands the Store over; this drives one.
    store = Store(tmp_path / "q.sqlite3", OverflowConfig(), inline=True)
    queue: JobQueue = store
    assert not queue.is_open
    await nursery.start(store.run)
    assert queue.is_open
    job = NewJob("t1", "req-1", "chat", b"{}", idempotency_key="k1")
    enqueued = await queue.enqueue(job)
    assert enqueued.created
    assert (await queue.get(job.id, "t1")) == enqueued.job
    assert await queue.get(job.id, "t2") is None
    assert (await queue.find_idempotent("t1", "k1")) == enqueued.job
    assert await queue.find_idempotent("t2", "k1") is None
    for name in members(JobQueue) - {"is_open"}:
        assert inspect.iscoroutinefunction(getattr(Store, name))
