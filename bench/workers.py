"""``server.workers = 2`` against 1 on this machine, in one run.

    python -m bench.workers [--duration 5] [--repeats 3] [--concurrency 64]

Two scenarios, each against a gateway with one worker (today's single process) and one with
two (a supervisor and two workers on one port), interleaved per repeat so that the host's
drift spoils both sides alike:

* ``live``: ``GET /health/live``, the gateway alone (no upstream);
* ``chat``: non-stream chat completions through the fast fake upstream (``bench.upstream``).

Nothing is pinned: on a 2-core machine the point of ``workers = 2`` is to use both cores, so
the gateway, the fake upstream and the load tool (wrk when installed) all share them. That
makes the comparison honest about what an operator of a 2-core host gets, and unflattering
for workers: the load tool and the upstream take CPU the second worker would use. CPU per
request is the supervisor's and every worker's user+system time over the measured part.

``server.workers`` > 1 needs ``[state] backend = "redis"``: a redis-server is started for
the two-worker gateway (``/usr/bin/redis-server``), whatever uses it at the time of the run.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

from bench.load import LoadSpec, Request, run_load
from bench.procs import HOST, Process, cpu_seconds, free_port, spawn, wait_ready
from bench.targets import BENCH_MODEL, GATEWAY_ENV, PROXY_CONFIG

CHAT_BODY = json.dumps(
    {"model": BENCH_MODEL, "messages": [{"role": "user", "content": "Say hello."}]}
).encode()
SCENARIOS = {
    "live": Request("GET", "/health/live"),
    "chat": Request(
        "POST", "/v1/chat/completions", (("content-type", "application/json"),), CHAT_BODY
    ),
}


def _tree_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (the supervisor and its workers)."""
    total = cpu_seconds(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return total + sum(_cpu_or_zero(int(child)) for child in children)


def _cpu_or_zero(pid: int) -> float:
    try:
        return cpu_seconds(pid)
    except OSError:
        return 0.0


def _all_ready(port: int, workers: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=1) as answer:
            body = json.load(answer)
    except (OSError, ValueError):
        return False
    if workers == 1:
        return body.get("status") == "ok"
    return bool(body["components"]["workers"]["ready"] == workers)


class TreeMeter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu_s = 0.0
        self.wall_s = 0.0

    def start(self) -> None:
        self._cpu, self._wall = _tree_cpu(self.pid), time.monotonic()

    def stop(self) -> None:
        self.cpu_s = _tree_cpu(self.pid) - self._cpu
        self.wall_s = time.monotonic() - self._wall


def _redis(stack: ExitStack, workdir: Path) -> str:
    port = free_port()
    argv = ["/usr/bin/redis-server", "--port", str(port), "--bind", HOST, "--save", ""]
    argv += ["--dir", str(workdir)]
    proc = spawn("redis", argv, workdir, cpu=None)
    stack.callback(proc.stop)
    return f"redis://{HOST}:{port}/0"


def _gateway(stack: ExitStack, workdir: Path, upstream: int, workers: int, redis: str) -> Process:
    config = workdir / f"gateway-{workers}.toml"
    text = PROXY_CONFIG.format(upstream=upstream)
    text = text.replace("backlog = 4096\n", f"backlog = 4096\nworkers = {workers}\n")
    if workers > 1:
        text += f'\n[state]\nbackend = "redis"\nurl = "{redis}"\n'
    config.write_text(text)
    port = free_port()
    env = {**GATEWAY_ENV, "RUNESTONE_STATE_DIR": str(workdir), "PORT": str(port)}
    argv = [sys.executable, "-m", "runestone_proxy", "--config", str(config)]
    proc = spawn(f"gateway-{workers}", argv, workdir, cpu=None, env=env, port=port)
    stack.callback(proc.stop)
    wait_ready(proc, "/health/ready", timeout_s=20.0)
    deadline = time.monotonic() + 20
    while not _all_ready(port, workers):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{workers} workers not ready\n{proc.log_tail()}")
        time.sleep(0.05)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    rows: dict[tuple[str, int], list[tuple[float, float, float, float]]] = {}
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-workers-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        upstream = spawn(
            "upstream",
            [sys.executable, "-m", "bench.upstream", "--port", "0"],
            workdir,
            cpu=None,
            announces_port=True,
        )
        stack.callback(upstream.stop)
        redis = _redis(stack, workdir)
        gateways = {n: _gateway(stack, workdir, upstream.port, n, redis) for n in (1, 2)}
        for _ in range(args.repeats):
            for name, request in SCENARIOS.items():
                for workers, proc in gateways.items():
                    meter = TreeMeter(proc.popen.pid)
                    spec = LoadSpec(
                        HOST,
                        proc.port,
                        "h1",
                        request,
                        args.concurrency,
                        duration_s=args.duration,
                        warmup_s=args.warmup,
                    )
                    result = run_load(spec, meter=meter)
                    us = meter.cpu_s / max(result.requests, 1) * 1e6
                    rows.setdefault((name, workers), []).append(
                        (result.rps, result.p50_ms, result.p99_ms, us)
                    )
                    print(
                        f"{name} workers={workers}: {result.rps:,.0f} req/s, p50 "
                        f"{result.p50_ms:.2f} ms, p99 {result.p99_ms:.2f} ms, {us:.0f} us CPU/req"
                        f" ({result.tool}, errors {result.errors}, non-2xx {result.non_2xx})",
                        flush=True,
                    )
    print(f"\nmedians of {args.repeats}, c={args.concurrency}, nothing pinned (2 shared cores):")
    print("| scenario | workers | req/s | p50 ms | p99 ms | gateway CPU us/req |")
    print("| --- | --- | --- | --- | --- | --- |")
    for (name, workers), runs in rows.items():
        rps, p50, p99, us = (statistics.median(col) for col in zip(*runs, strict=True))
        print(f"| {name} | {workers} | {rps:,.0f} | {p50:.2f} | {p99:.2f} | {us:.0f} |")


if __name__ == "__main__":
    main()
