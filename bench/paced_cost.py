"""What one relayed chunk of a paced stream costs the gateway, in figures that hold still.

The ``paced_streams`` scenario (1,000 streams, 50 chunks 20 ms apart) divides the gateway's
CPU by the chunks the generator received. Its generator and the paced upstream share the
load CPU, and loaded they deliver far fewer chunks than intended, so the figure moved with
how loaded they were (26-60 us in three runs of one session). This bench gives two figures
that do not:

**Through the listener, net of the stream's fixed cost** (``--streams``, default 200: a load
the generator and the upstream keep up with, checked and printed as ``kept up``). The paced
upstream (``bench.upstream --pacing-ms 20``) runs on the load CPU, the gateway
(``bench.targets.PROXY_CONFIG``) pinned to the server CPU, ``bench.streamgen`` on the load
CPU. Each repeat runs two loads on the same gateway process, in alternating order: *long*
streams (``--long`` chunks, default 50) and *short* ones (``--short``, default 5; the
upstream's ``bench_chunks`` body field), both paced 20 ms. For each, the gateway's CPU over
the measured window (``/proc/<pid>/stat``, every thread) is ``streams x c0 + chunks x c1``
where ``streams`` ended and ``chunks`` arrived inside the window; the two loads give two
equations, solved for ``c1``, the CPU per relayed chunk with the per-stream work (request
parse, routing, upstream connect, headers, the ledger record) taken out, and ``c0``, that
per-stream work. ``gross`` is the long load's CPU / chunks, the ``paced_streams`` way.

**Instructions per chunk** (``--callgrind``): the gateway under ``valgrind
--tool=callgrind`` in front of the same paced upstream, ``--cg-streams`` (4) connections
each running ``--cg-rounds`` (10) streams one after another, once with ``--long`` chunks and
once with ``--short`` (a fresh gateway each time, stopped with SIGINT); the difference of
the two instruction totals divided by the difference in chunks. Start-up, shutdown and
every per-stream cost cancel out. Four streams paced 20 ms apart keep the slowed-down
gateway mostly idle, so each chunk arrives alone: one wake-up per chunk, the paced case
(1,000 streams bunch several chunks per wake-up when the core is busy, which costs less).
Instruction counts do not move with the neighbours' load.

    python -m bench.paced_cost [--streams 200] [--repeats 3] [--duration 6]
    python -m bench.paced_cost --callgrind --repeats 0     # instructions per chunk only
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import trio

from bench.load import LoadSpec, Request, run_load
from bench.procs import HOST, CpuMeter, Process, bench_cpus, free_port, pin_to, spawn
from bench.streamgen import Conn, Stats, encode, one_stream
from bench.targets import BENCH_MODEL, GATEWAY_ENV, PROXY_CONFIG, Launch, spawn_gateway

JSON = (("content-type", "application/json"),)
PACING_MS = 20.0
#: The callgrind bench's idle phase: seconds with no stream at all.
IDLE_S = 6.0


def body(chunks: int, pacing_ms: float = PACING_MS) -> bytes:
    return json.dumps(
        {
            "model": BENCH_MODEL,
            "messages": [{"role": "user", "content": "Say hello to the bench."}],
            "stream": True,
            "bench_chunks": chunks,
            "bench_pacing_ms": pacing_ms,
        }
    ).encode()


def _upstream(stack: ExitStack, workdir: Path, cpu: int | None) -> Process:
    argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
    argv += ["--pacing-ms", str(PACING_MS)]
    proc = spawn("upstream_paced", argv, workdir, cpu=cpu, announces_port=True)
    stack.callback(proc.stop)
    return proc


def _config(workdir: Path, upstream: int, name: str) -> Path:
    config = workdir / f"{name}.toml"
    config.write_text(PROXY_CONFIG.format(upstream=upstream))
    return config


# --- through the listener --------------------------------------------------------------------


def listener(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
    server_cpu, load_cpu = bench_cpus()
    upstream = _upstream(stack, workdir, load_cpu)
    config = _config(workdir, upstream.port, "gateway")
    launch = Launch(
        workdir=workdir, server_cpu=server_cpu, load_cpu=load_cpu, running={}, gateway_config=config
    )
    gateway = spawn_gateway("gateway_paced", launch, config)
    stack.callback(gateway.stop)
    kinds = {"long": args.long, "short": args.short}
    rows: dict[str, list[tuple[float, int, int, float, float]]] = {k: [] for k in kinds}
    nets: list[tuple[float, float]] = []
    for repeat in range(args.repeats):
        order = ("long", "short") if repeat % 2 == 0 else ("short", "long")
        got: dict[str, tuple[float, int, int]] = {}
        for kind in order:
            chunks = kinds[kind]
            meter = CpuMeter(gateway.popen.pid, server_cpu)
            spec = LoadSpec(
                HOST,
                gateway.port,
                "h1",
                Request("POST", "/v1/chat/completions", JSON, body(chunks)),
                args.streams,
                duration_s=args.duration,
                warmup_s=args.warmup,
                cpu=load_cpu,
                server_pid=gateway.popen.pid,
                force_tool="streamgen",
            )
            result = run_load(spec, meter=meter)
            extra = result.extra or {}
            received = int(extra.get("chunks") or 0)
            ended = int(extra.get("ended") or 0)
            assert meter.cpu_s is not None
            # What the generator should have seen: each stream sends a chunk per 20 ms.
            intended = args.streams * args.duration * 1000 / PACING_MS * (chunks + 1) / chunks
            kept = received / intended
            got[kind] = (meter.cpu_s, ended, received)
            rows[kind].append((meter.cpu_s, ended, received, kept, meter.others_s or 0.0))
            print(
                f"{repeat + 1} {kind:5} x{chunks:<3}: {received:7,} chunks, {ended:5,} streams"
                f" ended, gateway {meter.cpu_s:6.2f} s CPU = {meter.cpu_s / received * 1e6:5.1f}"
                f" us/chunk gross; kept up {kept:4.0%}, failures {extra.get('failures')},"
                f" stalls {extra.get('stalls')}, others on the core {meter.others_s or 0:.2f} s,"
                f" generator CPU {extra.get('gen_cpu_pct') or 0:.0f}%",
                flush=True,
            )
        c0, c1 = _solve(got["long"], got["short"])
        nets.append((c0, c1))
        print(f"{repeat + 1} net: {c1 * 1e6:5.1f} us/chunk, {c0 * 1e6:6.1f} us/stream", flush=True)
    if not nets:
        return
    gross = [cpu / received * 1e6 for cpu, _, received, _, _ in rows["long"]]
    print(
        f"\nthrough the listener, {args.streams} streams paced {PACING_MS:.0f} ms, medians of"
        f" {len(nets)}: net {statistics.median(c1 for _, c1 in nets) * 1e6:.1f} us/chunk"
        f" (runs {', '.join(f'{c1 * 1e6:.1f}' for _, c1 in nets)}),"
        f" per stream {statistics.median(c0 for c0, _ in nets) * 1e6:.0f} us,"
        f" gross {statistics.median(gross):.1f} us/chunk"
        f" (runs {', '.join(f'{g:.1f}' for g in gross)})"
    )


def _solve(long: tuple[float, int, int], short: tuple[float, int, int]) -> tuple[float, float]:
    """``cpu = streams x c0 + chunks x c1`` for both loads: (c0, c1) in seconds."""
    (y1, s1, k1), (y2, s2, k2) = long, short
    det = s1 * k2 - s2 * k1
    if det == 0:
        return 0.0, y1 / max(k1, 1)
    return (y1 * k2 - y2 * k1) / det, (s1 * y2 - s2 * y1) / det


# --- callgrind -------------------------------------------------------------------------------


async def _drive(
    port: int, chunks: int, streams: int, rounds: int, pacing_ms: float = PACING_MS
) -> int:
    """``streams`` connections, each running ``rounds`` streams in turn; chunks received."""
    stats = Stats(measuring=True)
    request = Request("POST", "/v1/chat/completions", JSON, body(chunks, pacing_ms))
    spec = LoadSpec(HOST, port, "h1", request, streams)
    raw = encode(spec)

    async def one(i: int) -> None:
        await trio.sleep(i * PACING_MS / 1000 / streams)  # spread the chunks apart
        conn = Conn(await trio.open_tcp_stream(HOST, port))
        try:
            for _ in range(rounds):
                await one_stream(conn, raw, stats, 10**9)
        finally:
            await conn.stream.aclose()

    with trio.fail_after(600):
        async with trio.open_nursery() as nursery:
            for i in range(streams):
                nursery.start_soon(one, i)
    return stats.chunks


def _callgrind_phases(
    args: argparse.Namespace, workdir: Path, upstream: int
) -> list[tuple[str, int, int, int, float]]:
    """One gateway under callgrind; after a warm-up, each phase (short, long, slow, in
    turn) is counted alone: counters zeroed, the streams run, the counters dumped. Returns
    (kind, instructions, streams, chunks, seconds) per phase."""
    server_cpu, _ = bench_cpus()
    config = _config(workdir, upstream, "cg")
    port = free_port()
    log = workdir / "cg.log"
    out = workdir / "cg.out"
    argv = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}"]
    argv += [sys.executable, "-m", "runestone_proxy", "--config", str(config)]
    env = {**os.environ, **GATEWAY_ENV, "RUNESTONE_STATE_DIR": str(workdir), "PORT": str(port)}
    env["PYTHONHASHSEED"] = "0"  # the same dict and set orders in every run
    phases: list[tuple[str, int, int, int, float]] = []
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=pin_to(server_cpu)
        )
    try:
        _wait_ready(port, proc, 400.0)
        trio.run(_drive, port, args.short, args.cg_streams, 1)  # warm-up: lazy imports, pools
        streams, rounds = args.cg_streams, args.cg_rounds
        plan = [
            ("short", args.short, rounds),
            ("long", args.long, rounds),
            # No stream at all: what the gateway executes per second regardless (timers,
            # and whatever else ticks), which the long phase's extra seconds hold too.
            ("idle", 0, 0),
        ]
        for _ in range(args.cg_pairs):
            for kind, chunks, n in plan:
                _control("-z", proc.pid)
                started = time.monotonic()
                received = 0
                if n:
                    received = trio.run(_drive, port, chunks, streams, n)
                else:
                    time.sleep(IDLE_S)
                _control("-d", proc.pid)
                seconds = time.monotonic() - started
                dumps = sorted(
                    workdir.glob("cg.out.*"), key=lambda p: int(p.name.rsplit(".", 1)[1])
                )
                total = _totals(dumps[-1])
                phases.append((kind, total, streams * n, received, seconds))
                print(
                    f"callgrind {kind:5} x{chunks:<3}: {total:13,} instructions,"
                    f" {streams * n} streams, {received:5,} chunks, {seconds:5.1f} s",
                    flush=True,
                )
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return phases


def _control(flag: str, pid: int) -> None:
    subprocess.run(["callgrind_control", flag, str(pid)], check=True, capture_output=True)


def _totals(dump: Path) -> int:
    for line in dump.read_text(errors="replace").splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def _wait_ready(port: int, proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    from bench.procs import http_status

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway under valgrind exited {proc.returncode}")
        if http_status(HOST, port, "/health/ready", timeout_s=2.0) == 200:
            return
        time.sleep(0.2)
    raise RuntimeError("the gateway under valgrind was not ready in time")


def callgrind(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed: no instruction count", file=sys.stderr)
        return
    _, load_cpu = bench_cpus()
    upstream = _upstream(stack, workdir, load_cpu)
    phases = _callgrind_phases(args, workdir, upstream.port)
    fits = []
    for i in range(0, len(phases) - 2, 3):
        (_, y_s, _, k_s, t_s), (_, y_l, _, k_l, t_l), (_, y_i, _, _, t_i) = phases[i : i + 3]
        per_s = y_i / t_i
        gross = (y_l - y_s) / (k_l - k_s)
        fits.append((gross - per_s * (t_l - t_s) / (k_l - k_s), gross, per_s))
    print(
        f"\ncallgrind: {statistics.median(f[0] for f in fits):,.0f} instructions per relayed"
        f" chunk (pairs {', '.join(f'{f[0]:,.0f}' for f in fits)}); with the idle gateway's"
        f" {statistics.median(f[2] for f in fits):,.0f} per second over the long phase's"
        f" extra seconds: {statistics.median(f[1] for f in fits):,.0f}"
        f" (pairs {', '.join(f'{f[1]:,.0f}' for f in fits)}); {args.cg_streams} stream(s)"
        f" x {args.cg_rounds} rounds per phase, {args.long} vs {args.short} chunks, paced"
        f" {PACING_MS:.0f} ms"
    )


def profile(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> None:
    """The gateway under cProfile (``--profile FILE``) serving ``cg_streams x cg_rounds``
    long streams, then stopped with SIGINT (cProfile writes the file at exit)."""
    server_cpu, load_cpu = bench_cpus()
    upstream = _upstream(stack, workdir, load_cpu)
    config = _config(workdir, upstream.port, "profile")
    port = free_port()
    argv = [sys.executable, "-m", "cProfile", "-o", str(args.profile)]
    argv += ["-m", "runestone_proxy", "--config", str(config)]
    env = {**os.environ, **GATEWAY_ENV, "RUNESTONE_STATE_DIR": str(workdir), "PORT": str(port)}
    with (workdir / "profile.log").open("wb") as sink:
        proc = subprocess.Popen(
            argv, stdout=sink, stderr=subprocess.STDOUT, env=env, preexec_fn=pin_to(server_cpu)
        )
    try:
        _wait_ready(port, proc, 30.0)
        received = trio.run(_drive, port, args.long, args.cg_streams, args.cg_rounds)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    print(f"profile of {received:,} chunks written to {args.profile}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--streams", type=int, default=200, help="concurrent paced streams")
    parser.add_argument("--duration", type=float, default=6.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=3, help="pairs of loads (0: none)")
    parser.add_argument("--long", type=int, default=50, help="chunks per long stream")
    parser.add_argument("--short", type=int, default=5, help="chunks per short stream")
    parser.add_argument("--callgrind", action="store_true", help="count instructions too")
    parser.add_argument("--cg-streams", type=int, default=1)
    parser.add_argument("--cg-pairs", type=int, default=2, help="short+long phases counted")
    parser.add_argument("--cg-rounds", type=int, default=20)
    parser.add_argument(
        "--profile", type=Path, help="cProfile the gateway serving the callgrind load (long)"
    )
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-paced-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        if args.repeats:
            with ExitStack() as inner:
                listener(args, workdir, inner)
        if args.callgrind:
            callgrind(args, workdir, stack)
        if args.profile:
            profile(args, workdir, stack)


if __name__ == "__main__":
    main()
