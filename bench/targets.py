"""What a scenario loads: the registry of target processes and how to start each one.

A :class:`Target` knows how to start one server (:class:`Launch` gives it the CPUs, a
work directory for logs and config, and the targets it ``needs``, already running) and
returns a ready :class:`bench.procs.Process`. The runner starts each target a selected
scenario uses once, before the first measurement, and stops them all at the end.

Built in: ``baseline`` (bench/baseline.py), ``upstream`` (bench/upstream.py, a fake
OpenAI provider: 20 unpaced chunks per stream), ``upstream_paced`` (the same, 50 chunks
20 ms apart), ``bare_proxy`` (bench/bare_proxy.py in front of ``upstream``: the proxy
path's ceiling, on the server CPU like a gateway), and the gateways
(``python -m runestone_proxy``): ``gateway`` (default config, no upstream),
``gateway_upstream`` (model ``bench-model`` -> ``upstream`` as an openai-kind provider,
``claude-bench`` -> the same ``upstream`` as an anthropic-kind one, ``resp-bench`` -> the
same as an openai-kind one with ``responses_api = true``; auth off),
``gateway_upstream_b`` (an identical second process: the A/A control),
``gateway_auth`` (the same with auth on: a rate-limited ``[[auth.keys]]`` key and a plain
``RUNESTONE_API_KEYS`` key) and ``gateway_paced`` (``bench-model`` -> ``upstream_paced``, sized
for thousands of streams). Servers under test run on the server CPU; helpers that stand in
for the outside world (the fake upstreams) share the load generator's CPU, so that the core
under test does only the gateway's work.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import attrs

from bench.procs import HOST, ROOT, Process, free_port, spawn, wait_ready


@attrs.frozen
class Launch:
    workdir: Path
    server_cpu: int | None
    load_cpu: int | None
    #: Targets started earlier, by name (everything in ``Target.needs`` is here).
    running: dict[str, Process]
    #: A config file to start the gateway with instead of the generated one.
    gateway_config: Path | None = None
    #: Extra environment for every gateway target (``--gateway-env KEY=VAL``), applied last.
    gateway_env: dict[str, str] = attrs.Factory(dict)


@attrs.frozen
class Target:
    name: str
    description: str
    start: Callable[[Launch], Process]
    needs: tuple[str, ...] = ()
    #: Returns why the target cannot run here (e.g. not written yet), or None if it can.
    unavailable: Callable[[], str | None] = lambda: None


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"target {target.name!r} is already registered")
    TARGETS[target.name] = target
    return target


def start_order(names: set[str]) -> list[str]:
    """``names`` and everything they need, dependencies first."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"target dependency cycle: {' -> '.join((*path, name))}")
        for need in TARGETS[name].needs:
            visit(need, (*path, name))
        order.append(name)

    for name in sorted(names):
        visit(name, ())
    return order


# --- built-in targets ---------------------------------------------------------------------


def _start_baseline(launch: Launch) -> Process:
    argv = [sys.executable, "-m", "bench.baseline", "--host", HOST, "--port", "0"]
    return spawn("baseline", argv, launch.workdir, cpu=launch.server_cpu, announces_port=True)


def _start_bare_proxy(launch: Launch) -> Process:
    upstream = launch.running["upstream"].port
    argv = [sys.executable, "-m", "bench.bare_proxy", "--host", HOST, "--port", "0"]
    argv += ["--upstream", f"{HOST}:{upstream}"]
    return spawn("bare_proxy", argv, launch.workdir, cpu=launch.server_cpu, announces_port=True)


def _start_upstream(launch: Launch) -> Process:
    argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
    return spawn("upstream", argv, launch.workdir, cpu=launch.load_cpu, announces_port=True)


#: The paced upstream's streams: ``PACED_CHUNKS`` chunk events, ``PACED_MS`` apart.
PACED_CHUNKS = 50
PACED_MS = 20.0


def _start_upstream_paced(launch: Launch) -> Process:
    argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
    argv += ["--chunks", str(PACED_CHUNKS), "--pacing-ms", str(PACED_MS)]
    return spawn("upstream_paced", argv, launch.workdir, cpu=launch.load_cpu, announces_port=True)


#: The gateway's config for the health scenarios: defaults, loopback only.
GATEWAY_CONFIG = """\
# Written by bench/targets.py for one bench run.
[server]
host = "127.0.0.1"
"""

GATEWAY_ENV = {
    "RUNESTONE_LOG_LEVEL": "warning",
    "RUNESTONE_AUTH_ENABLED": "false",
    # The anthropic provider's key (PROXY_CONFIG): the fake upstream wants an x-api-key.
    "RUNESTONE_BENCH_ANTHROPIC_KEY": "sk-ant-bench-0123456789abcdef",
}

#: The model the proxy scenarios ask for, and the provider behind it.
BENCH_MODEL = "bench-model"
#: The model on the anthropic-kind provider (the native Messages scenarios).
CLAUDE_MODEL = "claude-bench"
#: The model on the openai-kind provider with ``responses_api = true`` (native Responses).
RESPONSES_MODEL = "resp-bench"

#: The gateway's config for the proxy scenarios (``{upstream}``: the fake upstream's port):
#: ``bench-model`` on an openai-kind provider (chat only), ``claude-bench`` on an
#: anthropic-kind one, ``resp-bench`` on an openai-kind one that speaks the Responses API,
#: all three the fake upstream. Tenancy is opened wide so that its concurrency cap (10 per tenant
#: by default) never queues a benchmark request, and the upstream pool may hold a connection
#: per stream.
PROXY_CONFIG = """\
# Written by bench/targets.py for one bench run.
[server]
host = "127.0.0.1"
backlog = 4096

[tenancy]
default_max_concurrent = 16384
global_max_concurrent = 16384

[upstream]
max_connections_per_origin = 4096

[[providers]]
name = "bench-upstream"
kind = "openai"
base_url = "http://127.0.0.1:{upstream}/v1"

[[models]]
id = "bench-model"
provider = "bench-upstream"

# The Messages dialect: native to an anthropic-kind provider on the same fake upstream
# (its /v1/messages). The id is the upstream's model too, so the body is forwarded as sent.
[[providers]]
name = "bench-anthropic"
kind = "anthropic"
base_url = "http://127.0.0.1:{upstream}/v1"
api_key_env = "RUNESTONE_BENCH_ANTHROPIC_KEY"

[[models]]
id = "claude-bench"
provider = "bench-anthropic"

# The Responses dialect: bench-upstream (flavor generic) has no responses_api, so
# /v1/responses for bench-model is translated to chat. The same fake upstream again, as a
# provider that serves POST /responses itself: resp-bench's Responses calls pass through.
[[providers]]
name = "bench-responses"
kind = "openai"
base_url = "http://127.0.0.1:{upstream}/v1"
responses_api = true

[[models]]
id = "resp-bench"
provider = "bench-responses"
"""

#: Auth on: one ``[[auth.keys]]`` key with per-key limits far out of reach (so every
#: request pays the rate-limit bookkeeping, none is refused) and one ``RUNESTONE_API_KEYS``
#: key (no limits).
AUTH_CONFIG = """
[auth]
enabled = true

[[auth.keys]]
key_env = "RUNESTONE_BENCH_KEY"
tenant = "bench"
rpm = 1000000000
rph = 1000000000
tpm = 1000000000000
"""

#: The keys the auth scenarios present.
LIMITED_KEY = "rs-bench-limited-0123456789abcdef"
PLAIN_KEY = "rs-bench-plain-0123456789abcdef"


def gateway_unavailable() -> str | None:
    check = subprocess.run(
        [sys.executable, "-c", "import runestone_proxy.__main__"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return f"runestone_proxy.__main__ does not import ({last})"
    return None


def spawn_gateway(
    name: str, launch: Launch, config: Path, env: dict[str, str] | None = None
) -> Process:
    """``python -m runestone_proxy --config config`` on the server CPU, ready on
    ``/health/ready``; ``env`` adds to :data:`GATEWAY_ENV` (and ``RUNESTONE_STATE_DIR``, the
    run's directory), ``--gateway-env`` wins."""
    port = free_port()
    argv = [sys.executable, "-m", "runestone_proxy", "--config", str(config)]
    # The overflow queue's SQLite file goes to the run's directory, not the repository.
    state = {"RUNESTONE_STATE_DIR": str(launch.workdir)}
    full_env = {**GATEWAY_ENV, **state, **(env or {}), **launch.gateway_env, "PORT": str(port)}
    proc = spawn(name, argv, launch.workdir, cpu=launch.server_cpu, env=full_env, port=port)
    try:
        wait_ready(proc, "/health/ready", timeout_s=10.0)
    except BaseException:
        proc.stop()
        raise
    return proc


def _start_gateway(launch: Launch) -> Process:
    config = launch.gateway_config
    if config is None:
        config = launch.workdir / "gateway.toml"
        config.write_text(GATEWAY_CONFIG)
    return spawn_gateway("gateway", launch, config)


def _proxy_starter(
    name: str, upstream: str, extra_config: str = "", env: dict[str, str] | None = None
) -> Callable[[Launch], Process]:
    def start(launch: Launch) -> Process:
        config = launch.workdir / f"{name}.toml"
        port = launch.running[upstream].port
        config.write_text(PROXY_CONFIG.format(upstream=port) + extra_config)
        return spawn_gateway(name, launch, config, env)

    return start


register_target(Target("baseline", "bare trio+h11 keep-alive server", _start_baseline))
register_target(Target("upstream", "fake OpenAI provider (raw trio+h11)", _start_upstream))
register_target(
    Target(
        "bare_proxy",
        "bare trio+h11 reverse proxy -> upstream: the proxy path's ceiling",
        _start_bare_proxy,
        needs=("upstream",),
    )
)
register_target(
    Target(
        "upstream_paced",
        f"fake OpenAI provider, streams of {PACED_CHUNKS} chunks {PACED_MS:g} ms apart",
        _start_upstream_paced,
    )
)
register_target(
    Target(
        "gateway",
        "runestone_proxy, default config, auth off",
        _start_gateway,
        unavailable=gateway_unavailable,
    )
)
register_target(
    Target(
        "gateway_upstream",
        "runestone_proxy -> upstream (openai, openai+responses_api, anthropic providers), "
        "auth off, tenancy wide open",
        _proxy_starter("gateway_upstream", "upstream"),
        needs=("upstream",),
        unavailable=gateway_unavailable,
    )
)
register_target(
    Target(
        "gateway_upstream_b",
        "a second, identical gateway_upstream: the A/A control for cross-process comparisons",
        _proxy_starter("gateway_upstream_b", "upstream"),
        needs=("upstream",),
        unavailable=gateway_unavailable,
    )
)
register_target(
    Target(
        "gateway_auth",
        "gateway_upstream with auth on: a key with rpm/rph/tpm limits, and a plain key",
        _proxy_starter(
            "gateway_auth",
            "upstream",
            AUTH_CONFIG,
            {
                "RUNESTONE_AUTH_ENABLED": "true",
                "RUNESTONE_BENCH_KEY": LIMITED_KEY,
                "RUNESTONE_API_KEYS": PLAIN_KEY,
            },
        ),
        needs=("upstream",),
        unavailable=gateway_unavailable,
    )
)
register_target(
    Target(
        "gateway_paced",
        "runestone_proxy -> upstream_paced, auth off, sized for thousands of streams",
        _proxy_starter("gateway_paced", "upstream_paced"),
        needs=("upstream_paced",),
        unavailable=gateway_unavailable,
    )
)
