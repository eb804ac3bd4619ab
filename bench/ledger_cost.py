"""The usage ledger's cost per request end to end, as issue 14 states it: non-stream chat
through the listener, ``[ledger] enabled`` on vs off, in one run.

    python -m bench.ledger_cost [--duration 5] [--repeats 2] [--rounds 6] [--concurrency 64]

Two gateway processes (``bench.targets.PROXY_CONFIG``, one with ``[ledger] enabled =
false``), each with its own state directory (SQLite store, WAL, ``synchronous=FULL``), both
pinned to the server CPU, in front of one fast fake upstream (``bench.upstream``) on the load
CPU with the load tool (wrk when installed, else ``bench.loadgen``): ``POST
/v1/chat/completions`` over HTTP/1.1 keep-alive, ``--concurrency`` connections. Each repeat
loads one gateway, then the other (the order alternating per repeat), so the host's drift
spoils both alike. CPU per request is the gateway process's user + system time over the
measured part (every thread: the store's writer, which inserts the records, included)
divided by the requests answered; reported are the medians, the difference and the share of
the ledger-off figure. ``--rounds N`` starts a fresh pair of gateways N times, one pair
after the other, and also prints each round's cost (its on median against its off median)
and their median, the figure to quote: two processes of one build differ by a microsecond
or two for as long as they live (where the allocator put things, the hash seed), and a
single pair would carry that into the comparison; new pairs sample it.
Each run's CPU is also split, by the scheduler's clock, between the event loop's thread (the
requests; with the ledger, each record's tuple, buffer and counters, and freeing the
records after their pass) and the other threads (the store's writer: the
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
    state.mkdir(parents=True)
    config = state / "gateway.toml"
    config.write_text(
        PROXY_CONFIG.format(upstream=upstream) + ("" if ledger == "on" else LEDGER_OFF)
    )
    launch = Launch(workdir=state, server_cpu=cpu, load_cpu=None, running={}, gateway_config=config)
    proc = spawn_gateway(f"gateway-ledger-{ledger}", launch, config)
    stack.callback(proc.stop)
    return proc


def _measure(
    proc: Process, server_cpu: int | None, load_cpu: int | None, args: argparse.Namespace
) -> tuple[float, float, float, float, str]:
    """One load run on ``proc``: (us CPU per request, loop thread us, other threads us,
    req/s, a line saying so)."""
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
    line = (
        f"{result.rps:8,.0f} req/s, {per_request:6.1f} us CPU/req (loop thread {loop_us:.1f},"
        f" other threads {threads_us:.2f}; {meter.switches / requests:.3f} context"
        f" switches/req; others on the core {meter.others_s or 0:.2f} s, errors"
        f" {result.errors}, non-2xx {result.non_2xx}, {result.tool})"
    )
    return per_request, loop_us, threads_us, result.rps, line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=2, help="load runs per gateway per round")
    parser.add_argument(
        "--rounds", type=int, default=6, help="fresh pairs of gateway processes, one by one"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    server_cpu, load_cpu = bench_cpus()
    us: dict[str, list[float]] = {"on": [], "off": []}
    rps: dict[str, list[float]] = {"on": [], "off": []}
    loop: dict[str, list[float]] = {"on": [], "off": []}
    threads: dict[str, list[float]] = {"on": [], "off": []}
    rounds: list[float] = []  # each round's cost, % of its ledger-off median
    workdir = Path(tempfile.mkdtemp(prefix="runestone-bench-ledger-"))
    with ExitStack() as stack:
        stack.callback(shutil.rmtree, workdir, True)
        argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
        upstream = spawn("upstream", argv, workdir, cpu=load_cpu, announces_port=True)
        stack.callback(upstream.stop)
        for round_no in range(args.rounds):
            with ExitStack() as pair:
                gateways = {
                    ledger: _gateway(
                        pair, workdir / f"round-{round_no}", upstream.port, ledger, server_cpu
                    )
                    for ledger in ("on", "off")
                }
                mine: dict[str, list[float]] = {"on": [], "off": []}
                for repeat in range(args.repeats):
                    order = ("on", "off") if (round_no + repeat) % 2 == 0 else ("off", "on")
                    for ledger in order:
                        per_request, loop_us, threads_us, req_s, line = _measure(
                            gateways[ledger], server_cpu, load_cpu, args
                        )
                        print(f"round {round_no + 1} ledger {ledger:3}: {line}", flush=True)
                        for into, value in (
                            (us, per_request),
                            (loop, loop_us),
                            (threads, threads_us),
                            (rps, req_s),
                        ):
                            into[ledger].append(value)
                        mine[ledger].append(per_request)
            off_round = statistics.median(mine["off"])
            rounds.append((statistics.median(mine["on"]) - off_round) / off_round * 100)
    _report(args, server_cpu, us, rps, loop, threads, rounds)


def _report(
    args: argparse.Namespace,
    server_cpu: int | None,
    us: dict[str, list[float]],
    rps: dict[str, list[float]],
    loop: dict[str, list[float]],
    threads: dict[str, list[float]],
    rounds: list[float],
) -> None:
    on, off = statistics.median(us["on"]), statistics.median(us["off"])
    runs_each = args.rounds * args.repeats
    print(f"\nmedians of {runs_each}, c={args.concurrency}, gateway pinned to CPU {server_cpu}:")
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
    if len(rounds) > 1:
        each = ", ".join(f"{r:+.1f}%" for r in rounds)
        print(f"per round (fresh processes): {each}; median {statistics.median(rounds):+.1f}%")


if __name__ == "__main__":
    main()
