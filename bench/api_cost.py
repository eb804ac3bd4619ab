"""What the API and the upstream exchange cost per request, in-process, without the listener.

``chat_h1``'s CPU per request mixes the listener, the API, the pooled upstream client and the
kernel's loopback work, and two gateway processes compared under load differ by more noise
than a few percent. This bench starts the fake upstream (``bench/upstream.py``) on the load
CPU, builds the gateway's ``App`` in this process from the ``gateway_upstream`` target's
config, and has ``--tasks`` tasks call ``gateway.dispatch`` for ``POST /v1/chat/completions``
with a responder that only records the status.

So it times, per request:
- authentication, the JSON body, validation, rate limits, the tenant's capacity slot;
- routing, failover and the provider translation;
- the pooled h11 exchange with its socket reads and writes, and the metadata splice.

It does not time parsing the client's request or writing the answer back. The listener's
share of ``chat_h1`` is its CPU per request minus this one. The result is the median of
``--repeats`` batches of ``--iterations`` requests, measured as this thread's CPU time.
``--profile FILE`` writes a cProfile of one more batch (read it with ``pstats`` or
snakeviz).

    /work/venv/bin/python -m bench.api_cost [--tasks 64] [--profile /tmp/api.prof]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import trio

from bench.procs import HOST, bench_cpus, spawn
from bench.routing_cost import pin_to_server_cpu
from bench.scenarios import CHAT_BODY, STREAM_BODY, STREAM_CHUNKS
from bench.targets import GATEWAY_ENV, PROXY_CONFIG
from runestone_proxy import config as config_mod
from runestone_proxy import logs, metrics, telemetry
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.http import BytesBody, HeaderList, Request
from runestone_proxy.server.app import App

HEADERS: HeaderList = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]


class StatusOnly:
    """A responder that writes nothing: it keeps the status, and whether a stream ended with
    ``data: [DONE]``."""

    def __init__(self) -> None:
        self.started = False
        self.status = 0
        self.done = False

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        self.started, self.status = True, status

    async def start(self, status: int, headers: HeaderList) -> None:
        self.started, self.status = True, status

    async def send(self, data: bytes) -> None:
        self.done = data.endswith(b"data: [DONE]\n\n")


async def measure(
    app: App,
    tasks: int,
    iterations: int,
    repeats: int,
    profile: Path | None,
    watched: bool,
    body: bytes,
) -> tuple[list[float], Counter[str]]:
    """CPU microseconds per request for each repeat, and every outcome seen (the status, and
    for a stream whether it ended with ``[DONE]``)."""
    gateway = app.gateway
    gateway.phase = Phase.READY
    statuses: Counter[str] = Counter()
    headers = [*HEADERS[:2], (b"content-length", str(len(body)).encode())]

    async def worker(count: int) -> None:
        for i in range(count):
            request = Request(
                method="POST",
                path="/v1/chat/completions",
                query="",
                headers=headers,
                http_version="1.1",
                body_source=BytesBody(body),
                request_id=f"req_bench_{i}",
            )
            responder = StatusOnly()
            await gateway.dispatch(request, responder)
            statuses[f"{responder.status}{' [DONE]' if responder.done else ''}"] += 1

    async def batch(total: int) -> float:
        per_task = max(1, total // tasks)
        t0 = time.thread_time_ns()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, per_task)
        return (time.thread_time_ns() - t0) / 1000 / (per_task * tasks)

    async with trio.open_nursery() as system:
        if watched:
            await system.start(app.pool.watch.run)  # as App.run does: the pool's timeouts
        await batch(min(iterations, 2000))  # open the pool's connections, warm the caches
        results = [await batch(iterations) for _ in range(repeats)]
        if profile is not None:
            profiler = cProfile.Profile()
            profiler.enable()
            await batch(iterations)
            profiler.disable()
            profiler.dump_stats(profile)
        system.cancel_scope.cancel()
    await app.pool.aclose()
    return results, statuses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=64, help="concurrent callers")
    parser.add_argument("--iterations", type=int, default=6400, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="write a cProfile of one more batch")
    parser.add_argument(
        "--stream", action="store_true", help="streamed requests (the relay): also us/chunk"
    )
    parser.add_argument("--chunks", type=int, default=STREAM_CHUNKS, help="chunks per stream")
    parser.add_argument("--pacing-ms", type=float, default=0.0, help="between chunks upstream")
    parser.add_argument(
        "--scopes",
        action="store_true",
        help="without the pool's sweeper: a cancel scope per upstream wait",
    )
    args = parser.parse_args()
    _, load_cpu = bench_cpus()
    removers: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="api_cost-") as tmp:
        workdir = Path(tmp)
        argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
        argv += ["--chunks", str(args.chunks), "--pacing-ms", str(args.pacing_ms)]
        upstream = spawn("upstream", argv, workdir, cpu=load_cpu, announces_port=True)
        try:
            path = workdir / "gateway.toml"
            path.write_text(PROXY_CONFIG.format(upstream=upstream.port))
            env = {**GATEWAY_ENV, "RUNESTONE_STATE_DIR": str(workdir)}
            config = config_mod.load(path, env)
            logs.configure("warning", "json")
            pin_to_server_cpu()
            app = App.build(config, path, env)
            # The handlers App.run registers: every request's events reach them.
            removers = [
                telemetry.add_handler(metrics.on_event),
                telemetry.add_handler(logs.telemetry_to_log),
            ]
            runs, statuses = trio.run(
                measure,
                app,
                args.tasks,
                args.iterations,
                args.repeats,
                args.profile,
                not args.scopes,
                STREAM_BODY if args.stream else CHAT_BODY,
            )
        finally:
            for remove in removers:
                remove()
            upstream.stop()
    median = statistics.median(runs)
    print(f"{'tasks':>5} {'us/request (median)':>20}  runs")
    print(f"{args.tasks:5d} {median:20.1f}  {', '.join(f'{r:.1f}' for r in runs)}")
    if args.stream:
        print(f"us/chunk: {median / args.chunks:.1f} ({args.chunks} chunks per stream)")
    print(f"statuses: {dict(statuses)}")
    print(json.dumps({"us_per_request": median, "runs": runs, "statuses": dict(statuses)}))


if __name__ == "__main__":
    main()
