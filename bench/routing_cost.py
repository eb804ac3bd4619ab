"""What routing and breaker bookkeeping cost per request, in-process, against the gateway's
CPU per request.

For each request the service (``Service.route``, ``_plan``) resolves the model, derives the
request's constraints, filters and orders the candidates, orders groups of deployments, emits
``router.decide`` and runs the call through the failover executor, which picks a deployment
(breaker, pause and cap checks), holds its slot, hands the call its attempt deadline (the
upstream pool's own scopes enforce it: no cancel scope per attempt) and records the
outcome in the breaker and latency window. This times exactly those calls, with
the gateway's config shape and telemetry handlers, around a stub provider whose
``complete()`` returns a fixed body at once (no I/O, no checkpoint):

* ``resolve``           ``RoutingTable.resolve(model)``
* ``constraints``       ``constraints_for("chat", body, ..., len(raw))`` (as the API calls it)
* ``filter_and_order``  ``filter_and_order(targets, constraints, policy)``
* ``order_groups``      ``Deployments.order_groups(ordered)``
* ``router.decide``     ``emit_decision(...)``, the API's ``router.decide`` emitter (metrics +
  log handlers, level ``warning`` as in the bench)
* ``failover``          ``Failover.complete(...)`` minus the bare stub call (``call_for`` +
  ``stub.complete``), i.e. the bookkeeping around the call
* ``total``             all of the above in one loop, minus the bare stub call

Two configs: ``single`` (one deployment for ``bench-model``, as the bench gateway has) and
``group2`` (two deployments of the same id, round-robin: the group ordering path runs too).

Each figure is the median over ``--repeats`` timed loops of ``--iterations`` requests (a
loop of ``pass`` is subtracted), timed with the thread's CPU clock (``thread_time_ns``), so
that time the scheduler gives a neighbour on a shared machine is not counted. The gateway's
CPU per request comes from a bench run's ``results.json`` (``chat_h1``; default
``bench/results/latest``) or ``--gateway-us``; the share is ``total / gateway CPU per
request``. Pinned to the first CPU like the gateway.

    /work/venv/bin/python -m bench.routing_cost --results bench/results/latest/results.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio

from bench.procs import ROOT, bench_cpus
from bench.scenarios import CHAT_BODY
from runestone_proxy import logs, metrics, telemetry
from runestone_proxy.config import Config, ModelConfig, ProviderConfig
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.failover import Failover
from runestone_proxy.gateway.routing import (
    RoutingTable,
    Target,
    constraints_for,
    emit_decision,
    filter_and_order,
)
from runestone_proxy.providers.base import ProviderCall

ANSWER = b'{"id":"x","object":"chat.completion","choices":[],"usage":{"total_tokens":15}}'


class StubProviders:
    """Stands in for ``Providers``: the answer is there at once."""

    async def complete(self, target: Target, call: ProviderCall, deadline: float) -> bytes:
        return ANSWER


def config_for(deployments: int) -> Config:
    base = Config()
    providers = tuple(
        ProviderConfig(f"bench-upstream-{i}", "openai", base_url=f"http://127.0.0.1:{9 + i}/v1")
        for i in range(deployments)
    )
    models = tuple(ModelConfig("bench-model", p.name) for p in providers)
    return Config(
        auth=attrs.evolve(base.auth, enabled=False),
        providers=providers,
        models=models,
    )


@attrs.define
class Bench:
    config: Config
    body: dict[str, Any]
    routing: RoutingTable = attrs.field(init=False)
    deployments: Deployments = attrs.field(init=False)
    failover: Failover = attrs.field(init=False)
    stub: StubProviders = attrs.Factory(StubProviders)

    def __attrs_post_init__(self) -> None:
        self.routing = RoutingTable.build(self.config, {})
        self.deployments = Deployments.from_config(self.config)
        self.failover = Failover(self.deployments)

    def call_for(self, target: Target) -> ProviderCall:
        return ProviderCall(
            endpoint="chat",
            body=self.body,
            model=target.upstream_model,
            stream=False,
            raw=CHAT_BODY,
            request_id="req_bench",
        )

    def targets(self) -> list[Target]:
        resolution = self.routing.resolve(self.body["model"], None)
        out_tokens = self.config.routing.default_output_tokens
        c = constraints_for("chat", self.body, out_tokens, len(CHAT_BODY))
        ordered, _ = filter_and_order(resolution.targets, c, self.config.routing.policy)
        return self.deployments.order_groups(ordered)


def _per_iteration_ns(loop: Callable[[int], float], n: int, repeats: int) -> float:
    return statistics.median(loop(n) for _ in range(repeats)) / n


async def measure(bench: Bench, n: int, repeats: int) -> dict[str, float]:
    """Median nanoseconds per request of each piece."""
    body = bench.body
    policy = bench.config.routing.policy
    out_tokens = bench.config.routing.default_output_tokens
    resolution = bench.routing.resolve(body["model"], None)
    raw_bytes = len(CHAT_BODY)
    constraints = constraints_for("chat", body, out_tokens, raw_bytes)
    ordered, reason = filter_and_order(resolution.targets, constraints, policy)
    targets = bench.deployments.order_groups(ordered)
    pc = time.thread_time_ns

    def empty(k: int) -> float:
        t0 = pc()
        for _ in range(k):
            pass
        return pc() - t0

    def timed(fn: Callable[[], object]) -> Callable[[int], float]:
        def loop(k: int) -> float:
            t0 = pc()
            for _ in range(k):
                fn()
            return pc() - t0

        return loop

    def decide() -> None:
        emit_decision(policy, resolution, targets, reason, "req_bench")

    sync_pieces: dict[str, Callable[[], object]] = {
        "resolve": lambda: bench.routing.resolve(body["model"], None),
        "constraints": lambda: constraints_for("chat", body, out_tokens, raw_bytes),
        "filter_and_order": lambda: filter_and_order(resolution.targets, constraints, policy),
        "order_groups": lambda: bench.deployments.order_groups(ordered),
        "router.decide": decide,
    }
    result: dict[str, float] = {}
    loop_ns = _per_iteration_ns(empty, n, repeats)
    for name, fn in sync_pieces.items():
        result[name] = _per_iteration_ns(timed(fn), n, repeats) - loop_ns

    async def atimed(fn: Callable[[], Awaitable[object]], k: int) -> float:
        t0 = pc()
        for _ in range(k):
            await fn()
        return pc() - t0

    async def amedian(fn: Callable[[], Awaitable[object]]) -> float:
        return statistics.median([await atimed(fn, n) for _ in range(repeats)]) / n

    stub = bench.stub

    async def bare_call() -> None:
        target = targets[0]
        await stub.complete(target, bench.call_for(target), math.inf)

    async def through_failover() -> None:
        await bench.failover.complete(targets, bench.call_for, stub)  # type: ignore[arg-type]

    async def everything() -> None:
        res = bench.routing.resolve(body["model"], None)
        c = constraints_for("chat", body, out_tokens, raw_bytes)
        kept, why = filter_and_order(res.targets, c, policy)
        tgts = bench.deployments.order_groups(kept)
        emit_decision(policy, res, tgts, why, "req_bench")
        await bench.failover.complete(tgts, bench.call_for, stub)  # type: ignore[arg-type]

    bare = await amedian(bare_call)
    result["failover"] = await amedian(through_failover) - bare
    result["total"] = await amedian(everything) - bare
    result["(bare stub call)"] = bare
    return result


def gateway_cpu_us(path: Path, scenario: str = "chat_h1") -> dict[int, float]:
    """A scenario's CPU microseconds per request at each concurrency, from results.json."""
    data = json.loads(path.read_text())
    return {
        row["concurrency"]: row["cpu_us_per_req"]
        for row in data["rows"]
        if row["scenario"] == scenario and row.get("cpu_us_per_req")
    }


def pin_to_server_cpu() -> None:
    server_cpu, _ = bench_cpus()
    if server_cpu is not None:
        os.sched_setaffinity(0, {server_cpu})


DEFAULT_RESULTS = ROOT / "bench" / "results" / "latest" / "results.json"


def micro_bench_args(description: str) -> argparse.ArgumentParser:
    """The options the in-process cost benches share (this one and ``bench.auth_cost``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    parser.add_argument("--gateway-us", type=float, help="gateway CPU us per request (override)")
    return parser


def gateway_us(args: argparse.Namespace) -> dict[int, float]:
    """The gateway's CPU per request to compare against: ``--gateway-us``, else by
    concurrency from ``--results`` (empty when neither is there)."""
    if args.gateway_us is not None:
        return {0: args.gateway_us}
    if args.results.is_file():
        return gateway_cpu_us(args.results)
    return {}


def main() -> None:
    parser = micro_bench_args(__doc__ or "")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to the first CPU")
    args = parser.parse_args()
    if not args.no_pin:
        pin_to_server_cpu()
    logs.configure("warning", "json")
    removers = [
        telemetry.add_handler(metrics.on_event),
        telemetry.add_handler(logs.telemetry_to_log),
    ]
    body = json.loads(CHAT_BODY)
    tables: dict[str, dict[str, float]] = {}
    try:
        for name, count in (("single", 1), ("group2", 2)):
            bench = Bench(config_for(count), body)
            tables[name] = trio.run(measure, bench, args.iterations, args.repeats)
    finally:
        for remove in removers:
            remove()
    gateway = gateway_us(args)
    source = "--gateway-us" if args.gateway_us is not None else str(args.results.resolve())
    print(f"{'piece':<18} {'single us':>10} {'group2 us':>10}")
    for piece in tables["single"]:
        cells = [f"{tables[name][piece] / 1000:10.2f}" for name in ("single", "group2")]
        print(f"{piece:<18} {' '.join(cells)}")
    if gateway:
        print(f"\ngateway CPU per non-stream request (chat_h1, {source}):")
        for conc, us in sorted(gateway.items()):
            label = f"c={conc}" if conc else "given"
            shares = ", ".join(
                f"{name} {100 * tables[name]['total'] / 1000 / us:.1f}%" for name in tables
            )
            print(f"  {label:<6} {us:7.0f} us/request -> routing+breaker share: {shares}")
    else:
        print("\nno gateway CPU per request: run the chat scenario first or pass --gateway-us")
    summary = {
        "ns_per_request": tables,
        "gateway_us_per_request": gateway,
        "gateway_source": source,
        "iterations": args.iterations,
        "repeats": args.repeats,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
