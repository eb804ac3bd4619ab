"""Helpers for the multi-worker tests: the supervisor as a child process, a real
``redis-server``, and the config they run.

* :func:`supervisor_process`: ``python -m runestone_proxy --config PATH`` with
  ``server.workers`` > 1, once it logged ``supervisor.ready`` (which carries the ports and
  the workers' pids); killed at the end if the test did not stop it, its log printed.
* :func:`redis_server`: ``/usr/bin/redis-server`` on a free loopback port in a temporary
  directory, no persistence, stopped at the end. ``server.workers`` > 1 needs ``[state]
  backend = "redis"``; until the Redis backend lands nothing connects to it, after that the
  workers share their limits through it.

Every wait is for a log line, a datagram or an exit, bounded by the caller's ``fail_after``.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar

import attrs
import trio
from fleet_helpers import gateway_config, mock_models
from helpers import GatewayProcess, child_process

HOST = "127.0.0.1"
REDIS_SERVER = "/usr/bin/redis-server"


def write_config(
    path: Path,
    *,
    workers: int,
    redis_url: str,
    max_concurrent: int = 10,
    on_limit: str = "wait",
    latency_ms: float = 0.0,
    extra: str = "",
) -> Path:
    """The supervisor's config: ``workers`` on one port and a health port, limits on Redis,
    jobs in ``jobs.sqlite3`` beside ``path``, the mock models; ``extra`` (TOML) at the end."""
    tenant = {"max_concurrent": max_concurrent, "on_limit": on_limit, "max_wait_ms": 60000.0}
    overflow = {"lease_s": 1.0, "backoff_base_s": 0.05, "backoff_max_s": 0.2}
    text = gateway_config(
        {"health_port": 0, "workers": workers, "shutdown_grace_s": 5.0},
        [
            ("[auth]", {"enabled": False}),
            ("[state]", {"backend": "redis", "url": redis_url}),
            ("[tenants.default]", tenant),
            ("[overflow]", {"database": str(path.parent / "jobs.sqlite3"), **overflow}),
            *mock_models(latency_ms),
        ],
    )
    path.write_text(text + "\n" + extra + "\n")
    return path


@attrs.define(eq=False)
class Supervised(GatewayProcess):
    """The supervisor process; ``pids`` are its workers' at ``supervisor.ready``."""

    READY: ClassVar[str] = "supervisor.ready"
    NAME: ClassVar[str] = "supervisor"

    pids: list[int] = attrs.Factory(list)

    def count(self, event: str, **fields: Any) -> int:
        return sum(
            1
            for r in self.records
            if r.get("event") == event and all(r.get(k) == v for k, v in fields.items())
        )

    async def wait_for_count(self, event: str, n: int, **fields: Any) -> None:
        """Until ``n`` records named ``event`` (with ``fields``) were logged."""
        while self.count(event, **fields) < n:
            if self.stderr_closed:
                raise AssertionError(f"exited before {n} x {event!r} {fields}")
            self._changed = trio.Event()
            await self._changed.wait()

    def ready(self, record: Mapping[str, Any]) -> None:
        super().ready(record)
        self.pids = record["pids"]

    async def stop(self) -> None:
        # SIGKILL would orphan the workers until their lifeline fires: SIGTERM twice (the
        # second kills them), then give up politely.
        for _ in range(2):
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
        with trio.move_on_after(10):
            await self.process.wait()
        if self.process.returncode is None:
            self.process.kill()


def supervisor_process(
    config_path: Path, env: Mapping[str, str] | None = None, *, ready: bool = True
) -> AbstractAsyncContextManager[Supervised]:
    return child_process(Supervised, config_path, env, ready=ready)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def redis_server(directory: Path) -> AsyncIterator[str]:
    """A real redis-server on loopback; yields its ``redis://`` URL. Its port is picked by
    binding port 0 and closing (redis-server cannot report a port it chose): a lost race
    shows as a failed start, retried with another port."""
    for _ in range(3):
        port = _free_port()
        argv = [REDIS_SERVER, "--port", str(port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(directory)]
        process = await trio.lowlevel.open_process(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        assert process.stdout is not None
        seen = b""
        while b"Ready to accept connections" not in seen:
            data = await process.stdout.receive_some(65536)
            if not data:
                break
            seen += data
        if b"Ready to accept connections" not in seen:
            await process.wait()
            await process.stdout.aclose()
            continue
        try:
            yield f"redis://{HOST}:{port}/0"
        finally:
            process.terminate()
            with trio.CancelScope(shield=True), trio.move_on_after(10):
                await process.wait()
            await process.stdout.aclose()
        return
    raise AssertionError("redis-server did not start")


def pidfd_exit(pid: int) -> int | None:
    """A pidfd for ``pid`` (not our child: readable once it exited), or None if it is gone."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        return None
