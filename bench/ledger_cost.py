"""The usage ledger's cost per request end to end, as issue 14 states it: non-stream chat
through the listener, ``[ledger] enabled`` on vs off, in one run.

    python -m bench.ledger_cost [--duration 5] [--repeats 3] [--concurrency 64]

Two gateway processes (``bench.targets.PROXY_CONFIG``, one with ``[ledger] enabled =
false``), each with its own state directory (SQLite store, WAL, ``synchronous=FULL``), both
pinned to the server CPU, in front of one fast fake upstream (``bench.upstream``) on the load
CPU with the load tool (wrk when installed, else ``bench.loadgen``): ``POST
/v1/chat/completions`` over HTTP/1.1 keep-alive, ``--concurrency`` connections. Each repeat
loads one gateway, then the other (the order alternating per repeat), so the host's drift
spoils both alike. CPU per request is the gateway process's user + system time over the
measured part (every thread: the store's writer, which inserts the records, included)
divided by the requests answered; reported are the medians, the difference and the share of
the ledger-off figure. Each run's CPU is also split, by the scheduler's clock, between the
event loop's thread (the requests; with the ledger, each record's tuple, buffer and counters,
and freeing the records after their pass) and the other threads (the store's writer: the
inserts and commits), with the context switches of all of them: where the ledger's
microseconds go (README, "What it costs").

A gateway under load writes its records a pass (4096) at a time or once per
``flush_interval_s``; a measured window of a few seconds holds several passes, and what is
pending at its end is written in the next window of the same gateway, so the medians hold
the writer's whole cost.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import attrs

from bench.load import LoadSpec, Request, run_load
from bench.procs import HOST, CpuMeter, Process, bench_cpus, spawn
from bench.scenarios import CHAT_BODY
from bench.targets import PROXY_CONFIG, Launch, spawn_gateway

CHAT = Request("POST", "/v1/chat/completions", (("content-type", "application/json"),), CHAT_BODY)
LEDGER_OFF = "\n[ledger]\nenabled = false\n"


def _threads(pid: int) -> tuple[float, float, int]:
    """CPU seconds of ``pid``'s first thread (the event loop's) and of its other live
    threads, from the scheduler's own clock (``schedstat``, in ns: the writer's passes
    are a few ms each, below the 10 ms ticks of ``stat``), and their context switches
    (voluntary and not) so far."""
    loop = others = 0.0
    switches = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            run_s = int((task / "schedstat").read_text().split()[0]) / 1e9
            status = (task / "status").read_text().splitlines()
        except OSError:  # the thread ended meanwhile
            continue
        switches += sum(int(line.split()[1]) for line in status if "ctxt_switches:" in line)
        if task.name == str(pid):
            loop += run_s
        else:
            others += run_s
    return loop, others, switches


@attrs.define
class SplitMeter(CpuMeter):
    """:class:`CpuMeter`, and how the process's CPU splits between the event loop's thread
    and the others (the store's writer, trio's other worker threads), and the context
    switches of all of them."""

    loop_s: float = 0.0
    others_threads_s: float = 0.0
    switches: int = 0
    _start: tuple[float, float, int] = (0.0, 0.0, 0)

    def start(self) -> None:
        super().start()
        self._start = _threads(self.pid)

    def stop(self) -> None:
        super().stop()
        loop, others, switches = _threads(self.pid)
        self.loop_s = loop - self._start[0]
        self.others_threads_s = others - self._start[1]
        self.switches = switches - self._start[2]


def _gateway(
    stack: ExitStack, workdir: Path, upstream: int, ledger: str, cpu: int | None
) -> Process:
    state = workdir / f"ledger-{ledger}"
    state.mkdir()
    config = state / "gateway.toml"
    config.write_text(
        PROXY_CONFIG.format(upstream=upstream) + ("" if ledger == "on" else LEDGER_OFF)
    )
    launch = Launch(workdir=state, server_cpu=cpu, load_cpu=None, running={}, gateway_config=config)
    proc = spawn_gateway(f"gateway-ledger-{ledger}", launch, config)
    stack.callback(proc.stop)
    return proc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server_cpu, load_cpu = bench_cpus()
    us: dict[str, list[float]] = {"on": [], "off": []}
    rps: dict[str, list[float]] = {"on": [], "off": []}
    loop: dict[str, list[float]] = {"on": [], "off": []}
    threads: dict[str, list[float]] = {"on": [], "off": []}
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-ledger-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
        upstream = spawn("upstream", argv, workdir, cpu=load_cpu, announces_port=True)
        stack.callback(upstream.stop)
        gateways = {
            ledger: _gateway(stack, workdir, upstream.port, ledger, server_cpu)
            for ledger in ("on", "off")
        }
        for repeat in range(args.repeats):
            order = ("on", "off") if repeat % 2 == 0 else ("off", "on")
            for ledger in order:
                proc = gateways[ledger]
                meter = SplitMeter(proc.popen.pid, server_cpu)
                spec = LoadSpec(
                    HOST,
                    proc.port,
                    "h1",
                    CHAT,
                    args.concurrency,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    cpu=load_cpu,
                )
                result = run_load(spec, meter=meter)
                assert meter.cpu_s is not None
                requests = max(result.requests, 1)
                per_request = meter.cpu_s / requests * 1e6
                loop_us = meter.loop_s / requests * 1e6
                threads_us = meter.others_threads_s / requests * 1e6
                us[ledger].append(per_request)
                loop[ledger].append(loop_us)
                threads[ledger].append(threads_us)
                rps[ledger].append(result.rps)
                print(
                    f"ledger {ledger:3}: {result.rps:8,.0f} req/s, {per_request:6.1f} us CPU/req"
                    f" (loop thread {loop_us:.1f}, other threads {threads_us:.2f};"
                    f" {meter.switches / requests:.3f} context switches/req; others on the core"
                    f" {meter.others_s or 0:.2f} s, errors {result.errors},"
                    f" non-2xx {result.non_2xx}, {result.tool})",
                    flush=True,
                )
    on, off = statistics.median(us["on"]), statistics.median(us["off"])
    print(f"\nmedians of {args.repeats}, c={args.concurrency}, gateway pinned to CPU {server_cpu}:")
    print("| ledger | req/s | gateway CPU us/req | loop thread | other threads | runs |")
    print("| --- | --- | --- | --- | --- | --- |")
    for ledger in ("off", "on"):
        runs = ", ".join(f"{u:.1f}" for u in us[ledger])
        median_rps, median_us = statistics.median(rps[ledger]), statistics.median(us[ledger])
        median_loop = statistics.median(loop[ledger])
        others = statistics.median(threads[ledger])
        print(
            f"| {ledger} | {median_rps:,.0f} | {median_us:.1f} | {median_loop:.1f} | {others:.2f}"
            f" | {runs} |"
        )
    print(f"ledger cost: {on - off:+.1f} us/request = {(on - off) / off * 100:+.1f}% of ledger off")


if __name__ == "__main__":
    main()
