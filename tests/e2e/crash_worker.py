"""The gateway process the crash test kills: ``python crash_worker.py DB RUN_S LEASE_S``.

It serves the real listener (``App.build``) with the overflow store, ``POST /test/async``
(``accept_async``), ``GET /v1/jobs/{id}`` and the drainer, wired as
``jobs_helpers.start_jobs_gateway`` wires them, on the database ``DB``. Its runner takes
``RUN_S`` seconds per job and answers a chat.completion naming this process. Auth is off
(tenant ``default``); the webhook secret comes from ``$RUNESTONE_WEBHOOK_SECRET``.

It talks to the test on stdout, one JSON object per line: ``{"event": "ready", "port": N,
"pid": P}`` once listening, ``{"event": "started", "job_id": ..., "attempt": N}`` as each
run begins. Logs go to stderr. (When the product API enqueues on its own, the test can
start ``python -m runestone_proxy`` instead.)
"""

from __future__ import annotations

import json
import os
import sys

import attrs
import trio
from jobs_helpers import FakeCapacity, start_jobs_gateway

from runestone_proxy import logs
from runestone_proxy.config import AuthConfig, Config, LoggingConfig, OverflowConfig
from runestone_proxy.gateway.overflow import Job, JobOutcome
from runestone_proxy.server.drainer import Runner


def say(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def slow_runner(run_s: float) -> Runner:
    async def run(job: Job) -> JobOutcome:
        say(event="started", job_id=job.id, attempt=job.attempts)
        await trio.sleep(run_s)
        body = {
            "id": f"chatcmpl-{job.id}",
            "object": "chat.completion",
            "model": "mock-1",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "done"}}],
            "pid": os.getpid(),
            "attempt": job.attempts,
        }
        return JobOutcome(200, json.dumps(body).encode())

    return run


async def main(database: str, run_s: float, lease_s: float) -> None:
    base = Config()
    config = Config(
        server=attrs.evolve(base.server, host="127.0.0.1", port=0),
        logging=LoggingConfig(level="warning", format="json", access_log=False),
        auth=AuthConfig(enabled=False),
        overflow=OverflowConfig(
            database=database, lease_s=lease_s, backoff_base_s=0.05, backoff_max_s=0.2
        ),
    )
    async with trio.open_nursery() as nursery:
        gateway = await start_jobs_gateway(
            nursery, config, os.environ, lambda port: slow_runner(run_s), FakeCapacity(3)
        )
        say(event="ready", port=gateway.port, pid=os.getpid())


if __name__ == "__main__":
    logs.configure("warning", "json")
    trio.run(main, sys.argv[1], float(sys.argv[2]), float(sys.argv[3]))
