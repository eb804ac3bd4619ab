"""What a scenario loads: the registry of target processes and how to start each one.

A :class:`Target` knows how to start one server (:class:`Launch` gives it the CPUs, a
work directory for logs and config, and the targets it ``needs``, already running) and
returns a ready :class:`bench.procs.Process`. The runner starts each target a selected
scenario uses once, before the first measurement, and stops them all at the end.

Built in: ``baseline`` (bench/baseline.py), ``upstream`` (bench/upstream.py, a fake
OpenAI provider) and ``gateway`` (``python -m runestone_proxy``). Servers under test run on
the server CPU; helpers that stand in for the outside world (the fake upstream) share the
load generator's CPU, so that the core under test does only the gateway's work.
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


def _start_upstream(launch: Launch) -> Process:
    argv = [sys.executable, "-m", "bench.upstream", "--host", HOST, "--port", "0"]
    return spawn("upstream", argv, launch.workdir, cpu=launch.load_cpu, announces_port=True)


#: The gateway's config for the health scenarios: defaults, loopback only.
GATEWAY_CONFIG = """\
# Written by bench/targets.py for one bench run.
[server]
host = "127.0.0.1"
"""

GATEWAY_ENV = {
    "RUNESTONE_LOG_LEVEL": "warning",
    "RUNESTONE_AUTH_ENABLED": "false",
}


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


def _start_gateway(launch: Launch) -> Process:
    config = launch.gateway_config
    if config is None:
        config = launch.workdir / "gateway.toml"
        config.write_text(GATEWAY_CONFIG)
    port = free_port()
    argv = [sys.executable, "-m", "runestone_proxy", "--config", str(config)]
    env = {**GATEWAY_ENV, "PORT": str(port)}
    proc = spawn("gateway", argv, launch.workdir, cpu=launch.server_cpu, env=env, port=port)
    try:
        wait_ready(proc, "/health/ready", timeout_s=10.0)
    except BaseException:
        proc.stop()
        raise
    return proc


register_target(Target("baseline", "bare trio+h11 keep-alive server", _start_baseline))
register_target(Target("upstream", "fake OpenAI provider (raw trio+h11)", _start_upstream))
register_target(
    Target(
        "gateway",
        "runestone_proxy, default config, auth off",
        _start_gateway,
        unavailable=gateway_unavailable,
    )
)
