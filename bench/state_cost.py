"""What the Redis state backend costs per request: ``[state] backend = "local"`` vs ``"redis"``,
in-process, interleaved in one run (as ``bench.api_cost`` measures, which see).

Two ``App`` s are built from the ``gateway_upstream`` config plus the auth key with rpm, rph
and tpm limits (``bench.targets.AUTH_CONFIG``: every request pays the windows' bookkeeping,
none is refused), one with local state, one on a ``redis-server`` this bench starts on the
load CPU (``--save '' --appendonly no``, a free loopback port). ``--tasks`` tasks call
``gateway.dispatch`` for ``POST /v1/chat/completions`` through the limited key; each repeat
runs one batch on each app. Reported: the gateway thread's CPU per request (median of the
repeats) for each, the ratio, and redis-server's own CPU per request (``/proc``), which the
gateway's figure does not include. ``--stream`` streams (``--chunks``, ``--pacing-ms``).

    /work/venv/bin/python -m bench.state_cost [--tasks 64] [--repeats 5] [--stream]

``--only local|redis`` builds and runs one app (one backend per callgrind run, see
bench/README.md); ``--key-max-concurrent N`` gives the key its own cap, so each request
also takes a key slot; ``--timeout-s`` is ``[state] timeout_s`` (raise it under valgrind).
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import trio

from bench.api_cost import CLOCK, HEADERS, PATHS, StatusOnly
from bench.procs import HOST, bench_cpus, pin_to, spawn
from bench.routing_cost import pin_to_server_cpu
from bench.scenarios import STREAM_CHUNKS
from bench.targets import AUTH_CONFIG, GATEWAY_ENV, LIMITED_KEY, PROXY_CONFIG
from runestone_proxy import config as config_mod
from runestone_proxy import logs, metrics, telemetry
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.http import BytesBody, Request
from runestone_proxy.server.app import App

#: ``--profile FILE``: a cProfile of one more batch on the Redis app.
PROFILE: list[str] = []


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    apps: dict[str, App], tasks: int, iterations: int, repeats: int, stream: bool, redis_pid: int
) -> tuple[dict[str, list[float]], list[float], dict[str, Counter[str]]]:
    spec = PATHS["chat"]
    body = spec.stream_body if stream else spec.body
    headers = [
        *HEADERS,
        (b"authorization", b"Bearer " + LIMITED_KEY.encode()),
        (b"content-length", str(len(body)).encode()),
    ]
    statuses = {name: Counter[str]() for name in apps}

    async def worker(name: str, count: int) -> None:
        gateway = apps[name].gateway
        for i in range(count):
            request = Request(
                method="POST",
                path=spec.url,
                query="",
                headers=headers,
                http_version="1.1",
                body_source=BytesBody(body),
                request_id=f"req_state_{i}",
            )
            responder = StatusOnly(spec.end)
            await gateway.dispatch(request, responder)
            statuses[name][f"{responder.status}{' [end]' if responder.done else ''}"] += 1

    async def batch(name: str, total: int) -> tuple[float, float]:
        per_task = max(1, total // tasks)
        t0, r0 = CLOCK[0](), _cpu_s(redis_pid)
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, name, per_task)
        n = per_task * tasks
        return (CLOCK[0]() - t0) / 1000 / n, (_cpu_s(redis_pid) - r0) * 1e6 / n

    results: dict[str, list[float]] = {name: [] for name in apps}
    redis_us: list[float] = []
    async with trio.open_nursery() as system:
        for app in apps.values():
            app.gateway.phase = Phase.READY
            await system.start(app.pool.watch.run)
            await system.start(app.store.run)
            if app.shared is not None:
                await system.start(app.shared.run)
                while not app.shared.client.up:
                    await trio.sleep(0.01)
        for name in apps:
            await batch(name, min(iterations, 2000))
        for _ in range(repeats):
            for name in apps:
                gateway_us, server_us = await batch(name, iterations)
                results[name].append(gateway_us)
                if apps[name].shared is not None:
                    redis_us.append(server_us)
        if PROFILE:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
            await batch("redis", iterations)
            profiler.disable()
            profiler.dump_stats(PROFILE[0])
        system.cancel_scope.cancel()
    for app in apps.values():
        await app.pool.aclose()
    return results, redis_us, statuses


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=6400)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--chunks", type=int, default=STREAM_CHUNKS)
    parser.add_argument("--pacing-ms", type=float, default=0.0)
    parser.add_argument("--profile", help="write a cProfile of one more Redis batch")
    parser.add_argument(
        "--only",
        choices=("local", "redis"),
        help="build and run one app only (for callgrind: one backend per run)",
    )
    parser.add_argument(
        "--key-max-concurrent",
        type=int,
        help="give the bench key its own max_concurrent (a key slot per request)",
    )
    parser.add_argument(
        "--redis-cpu",
        choices=("load", "server"),
        default="load",
        help="where redis-server runs: beside the fake upstream (default; it then slows the "
        "upstream, so streams arrive in more pieces) or on the gateway's CPU (its CPU is not "
        "the gateway thread's, which is what is measured)",
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=0.5,
        help="[state] timeout_s (raise it under valgrind, where a reply may wait longer)",
    )
    args = parser.parse_args()
    if args.profile:
        PROFILE.append(args.profile)
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        sys.exit("redis-server is not installed")
    server_cpu, load_cpu = bench_cpus()
    with tempfile.TemporaryDirectory(prefix="state_cost-") as tmp:
        workdir = Path(tmp)
        port = _free_port()
        redis = subprocess.Popen(
            [redis_bin, "--bind", HOST, "--port", str(port), "--save", "", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            preexec_fn=pin_to(server_cpu if args.redis_cpu == "server" else load_cpu),
        )
        argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
        argv += ["--chunks", str(args.chunks), "--pacing-ms", str(args.pacing_ms)]
        upstream = spawn("upstream", argv, workdir, cpu=load_cpu, announces_port=True)
        removers = []
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    socket.create_connection((HOST, port), timeout=1).close()
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.02)
            apps = {}
            auth = AUTH_CONFIG
            if args.key_max_concurrent is not None:
                auth += f"max_concurrent = {args.key_max_concurrent}\n"
            redis_state = (
                f'\n[state]\nbackend = "redis"\nurl = "redis://{HOST}:{port}/0"\n'
                f"timeout_s = {args.timeout_s}\n"
            )
            for name, extra in (("local", ""), ("redis", redis_state)):
                if args.only is not None and name != args.only:
                    continue
                state_dir = workdir / name
                state_dir.mkdir()
                path = state_dir / "gateway.toml"
                path.write_text(PROXY_CONFIG.format(upstream=upstream.port) + auth + extra)
                env = {
                    **GATEWAY_ENV,
                    "RUNESTONE_AUTH_ENABLED": "true",
                    "RUNESTONE_BENCH_KEY": LIMITED_KEY,
                    "RUNESTONE_STATE_DIR": str(state_dir),
                }
                apps[name] = App.build(config_mod.load(path, env), path, env)
            logs.configure("warning", "json")
            pin_to_server_cpu()
            removers = [
                telemetry.add_handler(metrics.on_event),
                telemetry.add_handler(logs.telemetry_to_log),
            ]
            runs, redis_us, statuses = trio.run(
                measure, apps, args.tasks, args.iterations, args.repeats, args.stream, redis.pid
            )
        finally:
            for remove in removers:
                remove()
            upstream.stop()
            redis.kill()
            redis.wait()
    kind = "stream" if args.stream else "whole"
    print(f"{kind}, {args.tasks} tasks, gateway thread CPU per request (median of {args.repeats})")
    if args.only is not None:
        print(f"  {args.only} {statistics.median(runs[args.only]):8.1f} us")
        print(f"  {args.only}: statuses {dict(statuses[args.only])}")
        return
    local, shared = statistics.median(runs["local"]), statistics.median(runs["redis"])
    print(f"  local  {local:8.1f} us   runs {', '.join(f'{r:.1f}' for r in runs['local'])}")
    print(f"  redis  {shared:8.1f} us   runs {', '.join(f'{r:.1f}' for r in runs['redis'])}")
    print(f"  redis / local = {shared / local:.3f}x (+{shared - local:.1f} us)")
    print(f"  redis-server CPU per request: {statistics.median(redis_us):.1f} us (not included)")
    if args.stream:
        print(
            f"  per chunk: local {local / args.chunks:.1f} us, redis {shared / args.chunks:.1f} us"
        )
    for name, seen in statuses.items():
        print(f"  {name}: statuses {dict(seen)}")


if __name__ == "__main__":
    main()
