"""Durable enqueue rate of the overflow store (group commit; SQLite: WAL, ``synchronous=FULL``;
PostgreSQL: ``synchronous_commit=on``, fsync on).

``C`` concurrent callers each ``await store.enqueue(job)`` in a loop, as request handlers
answering 202 would; every call returns only once its job is committed and fsynced. The
store runs as in production (worker thread behind a ``CapacityLimiter(1)``), on a fresh
database per run, on the filesystem of ``--dir`` (default: the working directory, which
is where ``runestone.sqlite3`` would live without ``$RUNESTONE_STATE_DIR``).

    /work/venv/bin/python -m bench.enqueue_bench                    # 3 runs, median
    /work/venv/bin/python -m bench.enqueue_bench --concurrency 1,64,256 --jobs 20000
    /work/venv/bin/python -m bench.enqueue_bench --no-group         # one fsync per job
    /work/venv/bin/python -m bench.enqueue_bench --backend sqlite,postgres   # same run
    /work/venv/bin/python -m bench.enqueue_bench --ledger off,on    # the ledger's effect

``--ledger on``: every caller also hands the store one usage record per job (as if as many
live requests as queued ones ended meanwhile), which ride the same writer passes; the run
ends once those are written too (``sync_ledger``). ``off,on`` interleaves the two per
repeat.

``--backend postgres`` starts a real PostgreSQL server (``tests/pg_server.py``: initdb in
``--dir``, loopback, fsync ON: a commit is as durable as SQLite's) and gives each run a
fresh database; the store talks to it over TCP on 127.0.0.1, as to a database on another
host with no network latency.

Prints, per concurrency level, the median jobs/s of the runs, the mean group size (jobs
per transaction) that made it possible, the median count of write transactions (each one
commit and one fsync: what the ledger must not add to) and the median CPU per job (the
process's, every thread: steadier under a noisy host than jobs/s, as the commits are).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import trio

from runestone_proxy import logs
from runestone_proxy.config import Config, OverflowConfig, TenantConfig
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.gateway.overflow import NewJob
from runestone_proxy.server.store import Store

BODY = (
    b'{"model":"gpt-4o-mini","messages":[{"role":"system","content":"You are terse."},'
    b'{"role":"user","content":"Summarise the plot of Hamlet in two sentences, please."}],'
    b'"max_tokens":128,"temperature":0.2,"webhook_url":"https://hooks.example.com/runestone"}'
)
TENANTS = [f"tenant-{i}" for i in range(8)]


@attrs.frozen
class Run:
    jobs: int
    seconds: float
    #: Transactions that enqueued jobs (the group commits).
    transactions: int
    #: Every write transaction (each one commit, one fsync): the group commits, and any the
    #: ledger's records took alone (its flush timer, a full pass, the final sync).
    commits: int = 0
    #: This process's CPU (every thread: the store's writer too).
    cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def group(self) -> float:
        return self.jobs / max(self.transactions, 1)

    @property
    def cpu_us_per_job(self) -> float:
        return self.cpu_s / self.jobs * 1e6


@contextlib.contextmanager
def postgres(directory: Path) -> Iterator[Any]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    import pg_server

    with pg_server.running(durable=True, parent=str(directory)) as server:
        yield server


def usage(tenant: str, request_id: str) -> UsageRecord:
    """A live request's record, as ``gateway.accounting`` makes one."""
    fields = (tenant, "", "chat", "gpt-4o-mini", "openai", "gpt-4o-mini", 1, 40, 60, 0, 0)
    return UsageRecord(time.time(), request_id, *fields, 4.2e-5, 200, "ok", False, False, 3.1)


async def one_run(
    directory: Path,
    jobs: int,
    concurrency: int,
    max_batch: int,
    pg: Any = None,
    ledger: bool = False,
) -> Run:
    with tempfile.TemporaryDirectory(dir=directory, prefix="enqueue-bench-") as tmp:
        path = Path(tmp) / "bench.sqlite3"
        if pg is None:
            config = OverflowConfig(database=str(path), group_commit_max_batch=max_batch)
        else:
            url = pg.create_database("bench")
            config = OverflowConfig(backend="postgres", url=url, group_commit_max_batch=max_batch)
        tenants = {t: TenantConfig(max_queued_jobs=jobs + 1) for t in TENANTS}
        store = Store.from_config(Config(overflow=config, tenants=tenants), env={})
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            per_caller = jobs // concurrency

            async def caller(index: int) -> None:
                tenant = TENANTS[index % len(TENANTS)]
                for n in range(per_caller):
                    if ledger:
                        store.record(usage(tenant, f"req_live_{index}_{n}"))
                    await store.enqueue(NewJob(tenant, f"req_{index}_{n}", "chat", BODY))

            started, cpu = time.perf_counter(), time.process_time()
            commits = store.stats.transactions
            async with trio.open_nursery() as callers:
                for index in range(concurrency):
                    callers.start_soon(caller, index)
            await store.sync_ledger()
            seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
            commits = store.stats.transactions - commits
            total = per_caller * concurrency
            assert (await store.counts()) == {"queued": total}
            run = Run(total, seconds, store.stats.enqueue_batches, commits, cpu)
            nursery.cancel_scope.cancel()
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000, help="jobs per run")
    parser.add_argument("--concurrency", default="64", help="callers, comma list")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=Path.cwd())
    parser.add_argument("--no-group", action="store_true", help="group_commit_max_batch=1")
    parser.add_argument("--backend", default="sqlite", help="sqlite, postgres, or both")
    parser.add_argument("--ledger", default="off", help="off, on, or off,on (interleaved)")
    args = parser.parse_args()
    logs.configure("warning")
    max_batch = 1 if args.no_group else OverflowConfig().group_commit_max_batch
    backends = args.backend.split(",")
    print(f"group_commit_max_batch={max_batch}, dir={args.dir}")
    ledgers = [mode == "on" for mode in args.ledger.split(",")]
    head = f"{'backend':>9} {'ledger':>6} {'callers':>8} {'jobs/s (median)':>16} {'runs':>28}"
    print(f"{head} {'jobs/commit':>12} {'commits':>8} {'CPU us/job':>11}")
    with contextlib.ExitStack() as stack:
        pg = stack.enter_context(postgres(args.dir)) if "postgres" in backends else None
        for concurrency in (int(c) for c in args.concurrency.split(",")):
            for backend in backends:
                server = pg if backend == "postgres" else None
                runs: dict[bool, list[Run]] = {ledger: [] for ledger in ledgers}
                for _ in range(args.repeats):  # interleaved: the drift hits both alike
                    for ledger in ledgers:
                        run = trio.run(
                            one_run, args.dir, args.jobs, concurrency, max_batch, server, ledger
                        )
                        runs[ledger].append(run)
                for ledger, done in runs.items():
                    rates = [r.rate for r in done]
                    shown = ", ".join(f"{r:,.0f}" for r in rates)
                    group = statistics.mean(r.group for r in done)
                    median = statistics.median(rates)
                    mode = "on" if ledger else "off"
                    commits = statistics.median(r.commits for r in done)
                    cpu = statistics.median(r.cpu_us_per_job for r in done)
                    print(
                        f"{backend:>9} {mode:>6} {concurrency:>8} {median:>16,.0f} {shown:>28}"
                        f" {group:>12.1f} {commits:>8,.0f} {cpu:>11.1f}"
                    )


if __name__ == "__main__":
    main()
