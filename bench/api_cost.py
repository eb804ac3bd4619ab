"""What the API and the upstream exchange cost per request, in-process, without the listener.

``chat_h1``'s CPU per request mixes the listener, the API, the pooled upstream client and the
kernel's loopback work, and two gateway processes compared under load differ by more noise
than a few percent. This bench starts the fake upstream (``bench/upstream.py``) on the load
CPU, builds the gateway's ``App`` in this process from the ``gateway_upstream`` target's
config, and has ``--tasks`` tasks call ``gateway.dispatch`` for ``POST /v1/chat/completions``
with a responder that only records the status.

``--path`` picks the request, or several, comma-separated, measured interleaved in one
process (each repeat runs one batch of each, so that drift spoils all of them alike):

- ``chat``: ``POST /v1/chat/completions``, model ``bench-model`` (openai kind): passthrough;
- ``messages``: ``POST /v1/messages``, model ``claude-bench`` on the anthropic-kind
  provider: native, the body forwarded as sent;
- ``messages-translated``: ``POST /v1/messages``, model ``bench-model``: Messages -> chat
  -> Message (or, streamed, chat chunks -> Anthropic events);
- ``responses``: ``POST /v1/responses``, model ``resp-bench`` on the openai-kind provider
  with ``responses_api = true``: native, the body forwarded as sent;
- ``responses-translated``: ``POST /v1/responses``, model ``bench-model`` (chat only):
  Responses -> chat -> Response (or, streamed, chat chunks -> Responses events).
  Both send ``"store": false`` (see ``bench/scenarios_responses.py``).
- ``chat-tenant`` / ``chat-budget``: ``chat`` naming its tenant (``tenant_id``, which the
  open gateway honours): ``plain`` has no budget, ``budgeted`` has a USD day and month
  budget and a tokens day budget (far out of reach), so the pair prices the budgets' work
  per request (the estimate, the reservation, the settle and the headers), all else equal.

So it times, per request:
- authentication, the JSON body, validation, rate limits, the tenant's capacity slot;
- routing, failover and the provider translation;
- the pooled h11 exchange with its socket reads and writes, and the metadata splice.

It does not time parsing the client's request or writing the answer back. The listener's
share of ``chat_h1`` is its CPU per request minus this one. The result is the median of
``--repeats`` batches of ``--iterations`` requests, measured as this thread's CPU time.
``--profile FILE`` writes a cProfile of one more batch (read it with ``pstats`` or
snakeviz); with several paths, one file per path (``FILE.<path>``).

    /work/venv/bin/python -m bench.api_cost [--tasks 64] [--profile /tmp/api.prof]
    /work/venv/bin/python -m bench.api_cost --path chat,messages,messages-translated [--stream]
    /work/venv/bin/python -m bench.api_cost --path chat,responses,responses-translated [--stream]
    /work/venv/bin/python -m bench.api_cost --path chat-tenant,chat-budget --repeats 3
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

import attrs
import trio

from bench.procs import HOST, bench_cpus, spawn
from bench.routing_cost import pin_to_server_cpu
from bench.scenarios import (
    CHAT_BODY,
    MESSAGES_HEADERS,
    STREAM_BODY,
    STREAM_CHUNKS,
    messages_body,
)
from bench.scenarios_responses import responses_body
from bench.targets import BENCH_MODEL, CLAUDE_MODEL, GATEWAY_ENV, PROXY_CONFIG, RESPONSES_MODEL
from runestone_proxy import config as config_mod
from runestone_proxy import logs, metrics, telemetry
from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.http import BytesBody, HeaderList, Request
from runestone_proxy.server.app import App

HEADERS: HeaderList = [(b"host", b"127.0.0.1"), (b"content-type", b"application/json")]
#: How a stream's last write ends, per dialect.
DONE = b"data: [DONE]\n\n"
MESSAGE_STOP = b'data: {"type":"message_stop"}\n\n'
#: A Responses stream has no fixed last bytes: its last write holds this event's frame.
RESPONSE_COMPLETED = b"event: response.completed\n"


@attrs.frozen
class ApiPath:
    """One request ``--path`` names: the URL path, its headers and bodies, and the bytes
    that end its stream (``end_inside``: that its last write contains)."""

    url: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    stream_body: bytes
    end: bytes
    end_inside: bool = False


#: The Anthropic client's headers besides content-type (HEADERS has it).
_MESSAGES_HEADERS = tuple(
    (k.encode(), v.encode()) for k, v in MESSAGES_HEADERS if k != "content-type"
)


def _for_tenant(body: bytes, tenant: str) -> bytes:
    return json.dumps({**json.loads(body), "tenant_id": tenant}, separators=(",", ":")).encode()


#: The tenants of ``chat-tenant`` and ``chat-budget`` (added to the bench's gateway config).
BUDGET_CONFIG = """
[tenants.plain]

[tenants.budgeted]
budget_usd_day = 1000000.0
budget_usd_month = 10000000.0
budget_tokens_day = 1000000000000
"""

PATHS = {
    "chat": ApiPath("/v1/chat/completions", (), CHAT_BODY, STREAM_BODY, DONE),
    "chat-tenant": ApiPath(
        "/v1/chat/completions",
        (),
        _for_tenant(CHAT_BODY, "plain"),
        _for_tenant(STREAM_BODY, "plain"),
        DONE,
    ),
    "chat-budget": ApiPath(
        "/v1/chat/completions",
        (),
        _for_tenant(CHAT_BODY, "budgeted"),
        _for_tenant(STREAM_BODY, "budgeted"),
        DONE,
    ),
    "messages": ApiPath(
        "/v1/messages",
        _MESSAGES_HEADERS,
        messages_body(CLAUDE_MODEL),
        messages_body(CLAUDE_MODEL, stream=True),
        MESSAGE_STOP,
    ),
    "messages-translated": ApiPath(
        "/v1/messages",
        _MESSAGES_HEADERS,
        messages_body(BENCH_MODEL),
        messages_body(BENCH_MODEL, stream=True),
        MESSAGE_STOP,
    ),
    "responses": ApiPath(
        "/v1/responses",
        (),
        responses_body(RESPONSES_MODEL),
        responses_body(RESPONSES_MODEL, stream=True),
        RESPONSE_COMPLETED,
        end_inside=True,
    ),
    "responses-translated": ApiPath(
        "/v1/responses",
        (),
        responses_body(BENCH_MODEL),
        responses_body(BENCH_MODEL, stream=True),
        RESPONSE_COMPLETED,
        end_inside=True,
    ),
}


class StatusOnly:
    """A responder that writes nothing: it keeps the status, and whether a stream ended with
    ``end`` (``data: [DONE]``, or Anthropic's ``message_stop`` event), or, ``inside``, whether
    its last write held ``end`` (the Responses ``response.completed`` event)."""

    def __init__(self, end: bytes = DONE, inside: bool = False) -> None:
        self.started = False
        self.status = 0
        self.done = False
        self.end = end
        self.inside = inside

    async def respond(self, status: int, headers: HeaderList, body: bytes) -> None:
        self.started, self.status = True, status

    async def start(self, status: int, headers: HeaderList) -> None:
        self.started, self.status = True, status

    async def send(self, data: bytes) -> None:
        self.done = self.end in data if self.inside else data.endswith(self.end)


async def measure(
    app: App,
    tasks: int,
    iterations: int,
    repeats: int,
    profile: Path | None,
    watched: bool,
    paths: list[str],
    stream: bool,
) -> tuple[dict[str, list[float]], dict[str, Counter[str]]]:
    """CPU microseconds per request for each path and repeat (the paths interleaved within
    each repeat), and every outcome seen per path (the status, and for a stream whether it
    ended as its dialect ends one)."""
    gateway = app.gateway
    gateway.phase = Phase.READY
    statuses: dict[str, Counter[str]] = {name: Counter() for name in paths}

    async def worker(name: str, count: int) -> None:
        spec = PATHS[name]
        body = spec.stream_body if stream else spec.body
        headers = [*HEADERS[:2], *spec.headers, (b"content-length", str(len(body)).encode())]
        seen = statuses[name]
        for i in range(count):
            request = Request(
                method="POST",
                path=spec.url,
                query="",
                headers=headers,
                http_version="1.1",
                body_source=BytesBody(body),
                request_id=f"req_bench_{i}",
            )
            responder = StatusOnly(spec.end, spec.end_inside)
            await gateway.dispatch(request, responder)
            seen[f"{responder.status}{' [end]' if responder.done else ''}"] += 1

    async def batch(name: str, total: int) -> float:
        per_task = max(1, total // tasks)
        t0 = CLOCK[0]()
        async with trio.open_nursery() as nursery:
            for _ in range(tasks):
                nursery.start_soon(worker, name, per_task)
        return (CLOCK[0]() - t0) / 1000 / (per_task * tasks)

    results: dict[str, list[float]] = {name: [] for name in paths}
    async with trio.open_nursery() as system:
        if watched:
            await system.start(app.pool.watch.run)  # as App.run does: the pool's timeouts
        # As App.run does: the store's writer (the usage ledger's records, written in its
        # group commits from a worker thread, whose CPU this thread's clock does not count).
        await system.start(app.store.run)
        for name in paths:  # open the pool's connections, warm the caches
            await batch(name, min(iterations, 2000))
        for _ in range(repeats):
            for name in paths:
                results[name].append(await batch(name, iterations))
        if profile is not None:
            for name in paths:
                profiler = cProfile.Profile()
                profiler.enable()
                await batch(name, iterations)
                profiler.disable()
                out = profile if len(paths) == 1 else profile.with_name(f"{profile.name}.{name}")
                profiler.dump_stats(out)
        system.cancel_scope.cancel()
    await app.pool.aclose()
    return results, statuses


#: The CPU clock a batch is timed by: this thread's (default), or the whole process's
#: (``--process-cpu``: the store writer's thread too, e.g. the usage ledger's inserts).
CLOCK: list[Callable[[], int]] = [time.thread_time_ns]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--tasks", type=int, default=64, help="concurrent callers")
    parser.add_argument("--iterations", type=int, default=6400, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="write a cProfile of one more batch")
    parser.add_argument(
        "--path",
        default="chat",
        help=f"the request(s), comma-separated, measured interleaved: {', '.join(PATHS)}",
    )
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
    parser.add_argument(
        "--process-cpu",
        action="store_true",
        help="time the whole process's CPU (worker threads too), not this thread's",
    )
    parser.add_argument(
        "--ledger",
        choices=("on", "off"),
        default="on",
        help="the usage ledger ([ledger] enabled): its cost per request is on minus off, "
        "run as alternating processes with --process-cpu (the writer is a worker thread)",
    )
    args = parser.parse_args()
    if args.process_cpu:
        CLOCK[0] = time.process_time_ns
    paths = list(dict.fromkeys(p.strip() for p in args.path.split(",") if p.strip()))
    if not paths or any(p not in PATHS for p in paths):
        parser.error(f"--path {args.path!r}: name one or more of {', '.join(PATHS)}")
    _, load_cpu = bench_cpus()
    removers: list[Callable[[], None]] = []
    with tempfile.TemporaryDirectory(prefix="api_cost-") as tmp:
        workdir = Path(tmp)
        argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
        argv += ["--chunks", str(args.chunks), "--pacing-ms", str(args.pacing_ms)]
        upstream = spawn("upstream", argv, workdir, cpu=load_cpu, announces_port=True)
        try:
            path = workdir / "gateway.toml"
            ledger = "" if args.ledger == "on" else "\n[ledger]\nenabled = false\n"
            path.write_text(PROXY_CONFIG.format(upstream=upstream.port) + BUDGET_CONFIG + ledger)
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
                paths,
                args.stream,
            )
        finally:
            for remove in removers:
                remove()
            upstream.stop()
    medians = {name: statistics.median(r) for name, r in runs.items()}
    first = medians[paths[0]]
    print(f"{'path':<20} {'tasks':>5} {'us/request (median)':>20} {'vs ' + paths[0]:>12}  runs")
    for name in paths:
        median = medians[name]
        ratio = f"{median / first:.3f}x"
        line = f"{name:<20} {args.tasks:5d} {median:20.1f} {ratio:>12}  "
        print(line + ", ".join(f"{r:.1f}" for r in runs[name]))
    if args.stream:
        for name in paths:
            per_chunk = medians[name] / args.chunks
            print(f"{name}: us/chunk {per_chunk:.1f} ({args.chunks} chunks per stream)")
    for name in paths:
        print(f"{name}: statuses {dict(statuses[name])}")
    report = {
        "stream": args.stream,
        "paths": {
            name: {
                "us_per_request": medians[name],
                "ratio": medians[name] / first,
                "runs": runs[name],
                "statuses": dict(statuses[name]),
            }
            for name in paths
        },
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
