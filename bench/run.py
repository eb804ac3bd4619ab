"""Run bench scenarios and report: ``python -m bench.run [--scenarios health] ...``.

How a run goes:

1. Select scenarios (names or groups, plus their baselines) and the targets they load.
   A target that cannot run here (the gateway before it exists) is reported and its
   scenarios skipped; the rest still run.
2. Start each target once, servers pinned to the first CPU; ``ExitStack`` stops them all
   however the run ends (SIGTERM, bounded wait, SIGKILL).
3. For each repeat, for each concurrency level, for each scenario: warm up, then measure
   with the load tool pinned to the second CPU. Repeats are the outer loop, so a burst of
   noise from a neighbour hurts one repeat of everything rather than every repeat of one
   scenario; and a scenario runs right after its baseline at the same concurrency, so the
   two sides of a ratio see the same machine.
4. Report medians across repeats (:mod:`bench.report`): a table on stdout, and
   ``results.json``, ``chart.png`` and the targets' logs in ``<out>/<timestamp>/``
   (``<out>/latest`` points at the newest).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import attrs

from bench import report
from bench.load import LoadError, LoadSpec, available_tools, choose_tool, run_load
from bench.procs import HOST, ROOT, CpuMeter, Process, StartError, bench_cpus
from bench.scenarios import SCENARIOS, Scenario, select
from bench.targets import TARGETS, Launch, start_order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Run Runestone's benchmarks; see bench/README.md.",
    )
    parser.add_argument(
        "--scenarios",
        default="",
        help="comma-separated scenario names or groups (default: all); --list shows them",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--repeats", type=int, default=3, help="runs per point; median wins")
    parser.add_argument("--concurrency", default="", help="override, e.g. 1,16,64")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument(
        "--tool",
        choices=("auto", "python"),
        default="auto",
        help="auto: wrk / h2load when installed; python: always bench.loadgen",
    )
    parser.add_argument(
        "--gateway-config", type=Path, help="config.toml for the `gateway` target (health)"
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VAL",
        help="extra environment for every gateway target (repeatable)",
    )
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG (no matplotlib)")
    parser.add_argument("--list", action="store_true", help="list scenarios and targets")
    return parser.parse_args(argv)


def list_registry() -> str:
    lines = ["scenarios:"]
    for s in SCENARIOS.values():
        groups = f" [{', '.join(s.groups)}]" if s.groups else ""
        conc = ",".join(map(str, s.concurrency))
        lines.append(f"  {s.name:<20} {s.protocol} c={conc:<8} -> {s.target}{groups}")
        lines.append(f"  {'':<20} {s.description}")
    lines.append("targets:")
    lines += [f"  {t.name:<16} {t.description}" for t in TARGETS.values()]
    return "\n".join(lines)


def _tool_version(name: str) -> str | None:
    path = available_tools().get(name)
    if path is None:
        return None
    try:
        done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return path
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0] if first else path


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        )
        return done.stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def _meta(args: argparse.Namespace, cpus: tuple[int | None, int | None]) -> dict[str, Any]:
    return {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "commit": _git_commit(),
        "host": platform.node(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "server_cpu": cpus[0],
        "load_cpu": cpus[1],
        "loadavg_start": os.getloadavg(),
        "duration_s": args.duration,
        "warmup_s": args.warmup,
        "repeats": args.repeats,
        "tool_preference": args.tool,
        "gateway_env": args.gateway_env,
        "tools": {name: _tool_version(name) for name in ("wrk", "h2load")},
    }


def _start_targets(
    stack: contextlib.ExitStack, scenarios: list[Scenario], launch: Launch
) -> dict[str, str]:
    """Start what the scenarios need; return {target: why it is unavailable}."""
    down: dict[str, str] = {}
    for name in start_order({s.target for s in scenarios}):
        target = TARGETS[name]
        missing = [n for n in target.needs if n in down]
        reason = f"needs {', '.join(missing)}" if missing else target.unavailable()
        if reason is None:
            try:
                proc = target.start(launch)
            except StartError as exc:
                reason = f"did not start: {str(exc).splitlines()[0]}"
                print(f"[bench] {name}: {exc}", file=sys.stderr)
            else:
                stack.callback(proc.stop)
                launch.running[name] = proc
                print(f"[bench] started {proc!r}", file=sys.stderr)
        if reason is not None:
            down[name] = reason
            print(f"[bench] skipping target {name}: {reason}", file=sys.stderr)
    return down


def _measure(
    args: argparse.Namespace,
    scenarios: list[Scenario],
    running: dict[str, Process],
    down: dict[str, str],
    load_cpu: int | None,
) -> list[report.Run]:
    runs: list[report.Run] = []
    levels = sorted({c for s in scenarios for c in s.concurrency})
    for repeat in range(args.repeats):
        for conc in levels:
            for scenario in (s for s in scenarios if conc in s.concurrency):
                proc = running.get(scenario.target)
                if proc is None or not proc.alive():
                    reason = down.get(scenario.target) or f"{scenario.target} exited"
                    runs.append(report.Run(scenario.name, conc, repeat, error=reason))
                    continue
                spec = LoadSpec(
                    host=HOST,
                    port=proc.port,
                    protocol=scenario.protocol,
                    request=scenario.request,
                    concurrency=conc,
                    duration_s=args.duration,
                    warmup_s=args.warmup,
                    cpu=load_cpu,
                    server_pid=proc.popen.pid,
                    force_tool=scenario.tool,
                )
                label = f"[bench] {repeat + 1}/{args.repeats} {scenario.name} c={conc}"
                print(f"{label} ({choose_tool(spec, args.tool)}) ...", end="", file=sys.stderr)
                meter = CpuMeter(proc.popen.pid, proc.cpu)
                try:
                    result = run_load(spec, args.tool, meter)
                    result = attrs.evolve(
                        result,
                        server_cpu_s=meter.cpu_s,
                        server_wall_s=meter.wall_s,
                        others_cpu_s=meter.others_s,
                    )
                except (LoadError, OSError) as exc:
                    print(f" failed: {exc}", file=sys.stderr)
                    runs.append(report.Run(scenario.name, conc, repeat, error=str(exc)[:200]))
                    continue
                cost = report.cpu_us_per_request(result)
                line = f" {result.rps:,.0f} req/s p99 {result.p99_ms:.2f} ms {cost:.0f} us CPU/req"
                if result.extra:
                    x = result.extra
                    line += (
                        f" | TTFC p50 {result.p50_ms:.2f} p99 {result.p99_ms:.2f} ms,"
                        f" stalls {x.get('stalls')}, failures {x.get('failures')},"
                        f" {_num(x.get('kb_per_stream'))} KB/stream,"
                        f" gen CPU {_num(x.get('gen_cpu_pct'))}%"
                    )
                print(line, file=sys.stderr)
                runs.append(report.Run(scenario.name, conc, repeat, result=result))
    return runs


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def parse_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--gateway-env wants KEY=VAL, got {pair!r}")
        env[key] = value
    return env


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the ExitStack: targets are stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM must tear down like Ctrl-C does; and a shell that started us in the background
    # may have left SIGINT ignored.
    signal.signal(signal.SIGTERM, _exit_on_signal)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.list:
        print(list_registry())
        return 0
    try:
        scenarios = select(n.strip() for n in args.scenarios.split(",") if n.strip())
    except KeyError as exc:
        print(f"bench: {exc.args[0]}; try --list", file=sys.stderr)
        return 2
    try:
        gateway_env = parse_env(args.gateway_env)
    except ValueError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    if args.concurrency:
        levels = tuple(int(c) for c in args.concurrency.split(","))
        scenarios = [attrs.evolve(s, concurrency=levels) for s in scenarios]

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    outdir = args.out / stamp
    outdir.mkdir(parents=True, exist_ok=True)
    cpus = bench_cpus()
    meta = _meta(args, cpus)
    with contextlib.ExitStack() as stack:
        launch = Launch(outdir, cpus[0], cpus[1], {}, args.gateway_config, gateway_env)
        down = _start_targets(stack, scenarios, launch)
        runs = _measure(args, scenarios, launch.running, down, cpus[1])
    meta["loadavg_end"] = os.getloadavg()

    rows = report.aggregate(scenarios, runs)
    print(report.table(rows), flush=True)
    report.write_json(outdir / "results.json", meta, rows, runs)
    if not args.no_chart:
        runs_desc = f"median of {args.repeats} x {args.duration:g} s"
        title = f"Runestone bench {meta['started_at']} {meta['commit']} ({runs_desc})"
        report.write_chart(outdir / "chart.png", rows, title)
    latest = args.out / "latest"
    with contextlib.suppress(OSError):
        latest.unlink(missing_ok=True)
        latest.symlink_to(stamp)
    print(f"\nresults: {outdir}", file=sys.stderr)
    return 0 if any(r.result for r in runs) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)  # targets were already stopped on the way out
