"""Crash test: the gateway process killed with SIGKILL, with jobs queued and running, loses
no acknowledged job.

The child is the product, ``python -m runestone_proxy --config cfg``: tenant ``default``
(auth off) runs one request at a time and queues whatever finds it busy
(``on_limit = "queue"``); jobs go to the mock provider, which takes 300 ms. A live request to
a slower mock model takes the slot first, so each of the 12 requests that follow (each with
a ``webhook_url``) is committed and answered 202. Once the drainer has a job running and the
rest queued, the process is killed: no shutdown code runs, a lease is left held. A second
process on the same database recovers the expired lease, runs what is left and delivers
every webhook. Then every acknowledged job has succeeded with exactly one stored result
(its own request id in it), its request redacted to a digest, and a delivery whose HMAC
signature the receiver verified.

Test rules: 127.0.0.1, port 0 (the child's port comes from its ``gateway.ready`` log line);
waits are for log lines and webhook deliveries; where the child offers no event to await
(the holder taking the slot, a job starting to run) a bounded loop polls its API.
"""

from __future__ import annotations

import json
import signal
import sqlite3
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import trio
from fleet_helpers import gateway_config, mock_models
from helpers import gateway_process
from jobs_helpers import SECRET, WebhookReceiver

from runestone_proxy.gateway.overflow import digest

JOBS = 12
TIMEOUT_S = 40
POLL_S = 0.02
ENV = {"RUNESTONE_WEBHOOK_SECRET": SECRET}


def config_text(database: Path) -> str:
    return gateway_config(
        {"shutdown_grace_s": 1.0},
        [
            ("[auth]", {"enabled": False}),
            ("[tenants.default]", {"max_concurrent": 1, "on_limit": "queue"}),
            (
                "[overflow]",
                {
                    "database": str(database),
                    "lease_s": 1.0,
                    "backoff_base_s": 0.05,
                    "backoff_max_s": 0.2,
                },
            ),
            *mock_models(300.0),
        ],
    )


def body(i: int, hook: str) -> bytes:
    message = {"role": "user", "content": f"secret prompt number {i}"}
    return json.dumps({"model": "mock-1", "messages": [message], "webhook_url": hook}).encode()


def table(database: Path) -> list[sqlite3.Row]:
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row
    try:
        return conn.execute("SELECT * FROM jobs ORDER BY created_at").fetchall()
    finally:
        conn.close()


async def poll_until(check: Callable[[], Awaitable[bool]]) -> None:
    """For what the child reports no event for; the caller's ``fail_after`` bounds it."""
    while not await check():
        await trio.sleep(POLL_S)


async def hold_slot(http: httpx.AsyncClient, answers: list[int], done: trio.Event) -> None:
    """A live request holding the tenant's one slot for the slow model's 1.5 s."""
    chat = {"model": "hold-1", "messages": [{"role": "user", "content": "hold"}]}
    try:
        answers.append((await http.post("/v1/chat/completions", json=chat)).status_code)
    finally:
        done.set()


async def test_a_killed_gateway_loses_no_acknowledged_job(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    receiver = WebhookReceiver()
    await nursery.start(receiver.serve)
    database, config = tmp_path / "jobs.sqlite3", tmp_path / "config.toml"
    config.write_text(config_text(database))
    bodies = {f"req-crash-{i}": body(i, receiver.url) for i in range(JOBS)}

    with trio.fail_after(TIMEOUT_S):
        async with gateway_process(config, ENV) as first:
            base = f"http://127.0.0.1:{first.port}"
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                holder: list[int] = []
                holder_done = trio.Event()
                nursery.start_soon(hold_slot, http, holder, holder_done)

                async def slot_taken() -> bool:
                    capacity = (await http.get("/health")).json()["components"]["capacity"]
                    return bool(capacity["tenants"]["default"]["in_flight"])

                await poll_until(slot_taken)
                answers = [
                    await http.post(
                        "/v1/chat/completions", content=raw, headers={"x-request-id": rid}
                    )
                    for rid, raw in bodies.items()
                ]
                assert [a.status_code for a in answers] == [202] * JOBS, answers[-1].text
                jobs = {a.json()["job_id"]: a.json()["request_id"] for a in answers}
                assert sorted(jobs.values()) == sorted(bodies)
                first_job = answers[0].json()["job_id"]

                async def first_job_running() -> bool:
                    status = (await http.get(f"/v1/jobs/{first_job}")).json()["status"]
                    assert status in ("queued", "running"), status
                    return bool(status == "running")

                await poll_until(first_job_running)  # the holder is done; jobs run one by one
                await holder_done.wait()
                assert holder == [200]
                first.send_signal(signal.SIGKILL)
                assert await first.wait() == -signal.SIGKILL

        at_kill = table(database)
        assert {r["id"] for r in at_kill} == set(jobs)  # every 202 was on disk
        statuses = [r["status"] for r in at_kill]
        assert "running" in statuses
        assert "queued" in statuses

        async with gateway_process(config, ENV) as second:
            delivered = await receiver.wait_for(set(jobs))
            base = f"http://127.0.0.1:{second.port}"
            async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                views = [(await http.get(f"/v1/jobs/{job_id}")).json() for job_id in jobs]
            second.send_signal(signal.SIGTERM)
            assert await second.wait() == 0

    assert {v["status"] for v in views} == {"succeeded"}
    rows = table(database)
    assert len(rows) == JOBS
    for row in rows:
        request_id = row["request_id"]
        assert jobs[row["id"]] == request_id
        assert row["status"] == "succeeded"
        assert row["result_status"] == 200
        assert bytes(row["body"]) == digest(bodies[request_id])  # redacted to its digest
        assert row["webhook_status"] == "delivered"
        result: dict[str, Any] = json.loads(row["result"])
        assert result["object"] == "chat.completion"
        assert result["provider"] == "mock"
        assert result["request_id"] == request_id  # its own result, the one stored
        payload = json.loads(delivered[row["id"]].body)
        assert (payload["id"], payload["request_id"]) == (row["id"], request_id)
        assert payload["status"] == "succeeded"
        assert payload["result"] == result
    assert {d.job_id for d in receiver.deliveries} == set(jobs)
    assert all(d.verified for d in receiver.deliveries)
    assert all(d.status == 200 for d in receiver.deliveries)
