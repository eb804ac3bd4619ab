"""The process-level overrides, checked on the real command: ``python -m runestone_proxy``
with no ``--config``, started in an empty directory, finds the shipped ``config.toml``
through ``RUNESTONE_CONFIG`` and takes ``PORT``, ``HEALTH_PORT``, ``RUNESTONE_HOST``,
``RUNESTONE_LOG_LEVEL`` and ``RUNESTONE_LOG_FORMAT`` over what that file says (port 4003, no
health port, 127.0.0.1, info, auto). One child serves every test in the module (a start
costs about a second); each test checks one variable.

Readiness is the child's own ``READY=1`` on a ``NOTIFY_SOCKET`` (its log level hides the
``gateway.ready`` line). The ports are taken from the OS and released just before the child
binds them, on 127.0.0.2 so that the host override is visible: the shipped 127.0.0.1 is not
served.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import attrs
import httpx
import pytest
from helpers import child_env

SHIPPED = Path(__file__).resolve().parents[2] / "config.toml"
HOST = "127.0.0.2"  # loopback, but not the shipped server.host


@attrs.frozen
class Child:
    port: int
    health_port: int
    stderr: Path

    def log(self) -> str:
        return self.stderr.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def child(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Child]:
    work = tmp_path_factory.mktemp("env-process")
    port, health_port = free_port(), free_port()
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(work / "notify"))
        notify.settimeout(30)
        env = child_env(
            {
                "RUNESTONE_CONFIG": str(SHIPPED),
                "PORT": str(port),
                "HEALTH_PORT": str(health_port),
                "RUNESTONE_HOST": HOST,
                "RUNESTONE_LOG_LEVEL": "WARNING",
                "RUNESTONE_LOG_FORMAT": "console",
                "RUNESTONE_STATE_DIR": str(work),
                "NOTIFY_SOCKET": str(work / "notify"),
            }
        )
        stderr = work / "stderr.log"
        with stderr.open("wb") as sink:
            process = subprocess.Popen(
                [sys.executable, "-m", "runestone_proxy"],
                cwd=work,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            while b"READY=1" not in notify.recv(4096):
                pass
            yield Child(port, health_port, stderr)
        finally:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            print(stderr.read_text(errors="replace"))  # shown if a test failed


def test_port(child: Child) -> None:
    answer = httpx.get(f"http://{HOST}:{child.port}/health/live", timeout=10)
    assert answer.status_code == 200


def test_health_port(child: Child) -> None:
    answer = httpx.get(f"http://{HOST}:{child.health_port}/health/live", timeout=10)
    assert answer.status_code == 200


def test_runestone_host(child: Child) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", child.port), timeout=10).close()


def test_runestone_config(child: Child) -> None:
    """The shipped file, not the built-in defaults (which have no aliases), is served."""
    answer = httpx.get(f"http://{HOST}:{child.port}/v1/models", timeout=10)
    ids = {model["id"] for model in answer.json()["data"]}
    assert {"mock-1", "default"} <= ids


def test_runestone_log_level(child: Child) -> None:
    log = child.log()
    assert "auth.open" in log  # the warning about running without keys is written ...
    assert "gateway.ready" not in log  # ... the info lines are not (the file says info)
    assert "store.open" not in log


def test_runestone_log_format(child: Child) -> None:
    """console, where the file's ``auto`` would write JSON lines to a file."""
    lines = [line for line in child.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
