"""The usage ledger's writer alone: ``store_ledger_sql.write`` of ``--batches`` passes of
``--size`` records, each pass in its own transaction on a SQLite file as the store opens it
(WAL, ``synchronous=FULL``), the records built before the clock starts.

    python -m bench.ledger_writer [--batches 40] [--size 128] [--mixed]

Prints the thread's CPU per record. Its instruction count is steadier than any time on a
shared host: run it under ``valgrind --tool=callgrind`` with two ``--batches`` (say 10 and
40) and with ``--build-only`` at the same two, and divide the difference of the differences
by the records between them (30 x 128): what writing one record costs, without startup or
building the records.

Records: one tenant, key, model and provider, non-stream (``ttfb_ms`` None but one in four),
as one steady stream of chat calls leaves them (``bench.api_cost``'s and
``bench.ledger_cost``'s traffic); ``--mixed``: five tenants, seven keys, three models,
varied usage, streams, errors (more rollup rows per pass, fewer values rows share).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

from runestone_proxy.server import store_ledger_sql
from runestone_proxy.server.store_sqlite import SqliteBackend

if TYPE_CHECKING:  # not imported at run time: the bench runs on builds without UsageRow too
    from runestone_proxy.gateway.ledger import UsageRow

T0 = 1_800_000_000.0  # on the hour


def record(k: int, mixed: bool) -> UsageRow:
    at, request_id = T0 + k * 2.7e-4, f"req_{k:012x}"
    if not mixed:
        ttfb = None if k % 4 else 0.8
        return (
            at, request_id, "default", "", "chat", "bench-model", "bench-upstream", "bench-model",
            1, 12, 9, 0, 0, 1.23e-05, 200, "ok", False, False, 1.2 + k % 7, ttfb,
        )  # fmt: skip
    return (
        at, request_id, f"tenant-{k % 5}", f"key_{k % 7}", "chat",
        ("fast", "smart", "gpt-4o")[k % 3], "openai", "gpt-4o-mini", 1 + (k % 17 == 0),
        12 + k % 50, 9 + k % 30, k % 11, 0,
        1.23e-05 * (k % 13), 200, "ok" if k % 19 else "error", k % 2 == 0, False, 1.2 + k % 7,
        None if k % 2 else 0.8,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--size", type=int, default=128, help="records per transaction")
    parser.add_argument("--mixed", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="build, do not write")
    args = parser.parse_args()
    n = args.size
    batches = [[record(b * n + i, args.mixed) for i in range(n)] for b in range(args.batches)]
    with tempfile.TemporaryDirectory(prefix="ledger-writer-") as tmp:
        conn = SqliteBackend(Path(tmp) / "bench.sqlite3").connect()
        started = time.thread_time()
        for records in () if args.build_only else batches:
            conn.begin()
            assert store_ledger_sql.write(conn, records) == []
            conn.commit()
        cpu = time.thread_time() - started
        conn.close()
    print(f"{cpu / (args.batches * n) * 1e6:.2f} us CPU per record", file=sys.stderr)


if __name__ == "__main__":
    main()
