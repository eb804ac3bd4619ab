"""Crash test: a gateway killed with SIGKILL, with jobs queued and running, loses nothing.

``crash_worker.py`` (a real gateway process: listener, store, jobs routes, drainer) accepts
a burst of jobs, each 202 meaning "committed to disk". Once its first runs have started it
is killed with SIGKILL: no shutdown code runs, leases are left held, some webhooks are still
pending. A second process on the same database must recover the expired leases, run what
is left, and deliver every webhook. Then every acknowledged job has succeeded, with exactly
one stored result, its request redacted to a digest, and a delivery whose HMAC signature
the receiver verified.

Test rules: 127.0.0.1, port 0; the child reports its port and each run's start on stdout,
and the test waits for those lines (and for webhook deliveries), never for time.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import httpx
import trio
from jobs_helpers import SECRET, WebhookReceiver

from runestone_proxy.gateway.overflow import digest

WORKER = Path(__file__).with_name("crash_worker.py")
JOBS = 12
TIMEOUT_S = 40


@attrs.define(eq=False)
class Worker:
    process: trio.Process
    lines: list[dict[str, Any]] = attrs.Factory(list)
    closed: bool = False
    _changed: trio.Event = attrs.Factory(trio.Event)

    async def read(self) -> None:
        assert self.process.stdout is not None
        pending = b""
        while data := await self.process.stdout.receive_some(65536):
            *complete, pending = (pending + data).split(b"\n")
            self.lines.extend(json.loads(line) for line in complete if line.strip())
            self._changed.set()
        self.closed = True
        self._changed.set()

    async def wait_until(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        while len(found := [x for x in self.lines if x["event"] == event]) < count:
            assert not self.closed, f"the worker exited; its log is in {self.log_hint}"
            self._changed = trio.Event()
            await self._changed.wait()
        return found

    log_hint: str = ""


@asynccontextmanager
async def worker(database: Path, log: Path, run_s: float, lease_s: float) -> AsyncIterator[Worker]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNESTONE_", "PORT"))}
    env.update({"RUNESTONE_WEBHOOK_SECRET": SECRET, "PYTHONUNBUFFERED": "1"})
    with log.open("ab") as stderr:
        process = await trio.lowlevel.open_process(
            [sys.executable, str(WORKER), str(database), str(run_s), str(lease_s)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
    child = Worker(process, log_hint=str(log))
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child.read)
            yield child
            nursery.cancel_scope.cancel()
    finally:
        if process.returncode is None:
            process.kill()
        with trio.CancelScope(shield=True):
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


def table(database: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
    finally:
        conn.close()


def body(i: int, hook: str) -> bytes:
    content = f"secret prompt number {i}"
    message = {"role": "user", "content": content}
    return json.dumps({"model": "mock-1", "messages": [message], "webhook_url": hook}).encode()


async def test_a_killed_gateway_loses_no_acknowledged_job(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = WebhookReceiver()
    await nursery.start(receiver.serve)
    database, log = tmp_path / "jobs.sqlite3", tmp_path / "workers.log"
    with trio.fail_after(TIMEOUT_S):
        async with worker(database, log, run_s=0.5, lease_s=1.0) as first:
            (ready,) = await first.wait_until("ready")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['port']}") as http:
                answers = [
                    await http.post("/test/async", content=body(i, receiver.url))
                    for i in range(JOBS)
                ]
            assert [a.status_code for a in answers] == [202] * JOBS
            acknowledged = {a.json()["job_id"] for a in answers}
            await first.wait_until("started", 3)  # runs in flight (capacity 3), more queued
            first.process.send_signal(signal.SIGKILL)
            assert await first.process.wait() == -signal.SIGKILL

        at_kill = table(database)
        assert {r["id"] for r in at_kill} == acknowledged  # every 202 was on disk
        statuses = [r["status"] for r in at_kill]
        assert "running" in statuses
        assert "queued" in statuses

        async with worker(database, log, run_s=0.05, lease_s=1.0) as second:
            (ready,) = await second.wait_until("ready")
            delivered = await receiver.wait_for(acknowledged)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ready['port']}") as http:
                views = [(await http.get(f"/v1/jobs/{job_id}")).json() for job_id in acknowledged]

    assert {v["status"] for v in views} == {"succeeded"}
    second_pid = ready["pid"]
    rows = table(database)
    assert len(rows) == JOBS
    sent = {digest(body(i, receiver.url)) for i in range(JOBS)}
    assert {bytes(r["body"]) for r in rows} == sent  # requests redacted to their digests
    for row in rows:
        assert row["status"] == "succeeded"
        assert row["result_status"] == 200
        assert row["webhook_status"] == "delivered"
        result = json.loads(row["result"])
        assert result["id"] == f"chatcmpl-{row['id']}"  # its own result, exactly one
    killed_runs = {x["job_id"] for x in first.lines if x["event"] == "started"}
    finished_by_second = {r["id"] for r in rows if json.loads(r["result"])["pid"] == second_pid}
    assert (
        killed_runs - {r["id"] for r in at_kill if r["status"] == "succeeded"} <= finished_by_second
    )
    assert all(d.verified for d in receiver.deliveries)
    for job_id, delivery in delivered.items():
        assert json.loads(delivery.body)["result"]["id"] == f"chatcmpl-{job_id}"
