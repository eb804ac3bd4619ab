"""A real ``redis-server`` for tests: on a free 127.0.0.1 port, in a temporary directory,
no persistence; started, waited for (PING answered), killed at the end.

The port is picked by binding ``127.0.0.1:0`` and closing it, then passed to redis-server
(redis cannot report a port it chose itself); a lost race shows as redis exiting at once,
and the start is retried on a new port. TLS (``tls=``) serves ``rediss://`` on the port
with a throwaway ``trustme`` certificate.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import hiredis
import pytest
import trustme

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


@attrs.define
class RedisServer:
    directory: Path
    password: str | None = None
    tls: trustme.CA | None = None
    port: int = 0
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"{'rediss' if self.tls else 'redis'}://{auth}{HOST}:{self.port}/0"

    @property
    def ca_file(self) -> str | None:
        return str(self.directory / "ca.pem") if self.tls else None

    def argv(self) -> list[str]:
        argv = [REDIS_SERVER, "--bind", HOST, "--save", "", "--appendonly", "no"]
        argv += ["--dir", str(self.directory), "--protected-mode", "no"]
        if self.password:
            argv += ["--requirepass", self.password]
        if self.tls is None:
            return [*argv, "--port", str(self.port)]
        cert = self.tls.issue_cert(HOST, "localhost")
        cert.private_key_pem.write_to_path(str(self.directory / "key.pem"))
        cert.cert_chain_pems[0].write_to_path(str(self.directory / "cert.pem"))
        self.tls.cert_pem.write_to_path(str(self.directory / "ca.pem"))
        return [
            *argv,
            *("--port", "0", "--tls-port", str(self.port)),
            *("--tls-cert-file", str(self.directory / "cert.pem")),
            *("--tls-key-file", str(self.directory / "key.pem")),
            *("--tls-ca-cert-file", str(self.directory / "ca.pem")),
            *("--tls-auth-clients", "no"),
        ]

    def start(self, port: int | None = None) -> None:
        """Start (or restart, on the same port when ``port`` is given) and wait for it."""
        for _ in range(5):
            self.port = port or _free_port()
            log = (self.directory / "redis.log").open("ab")
            self.process = subprocess.Popen(
                self.argv(), stdout=log, stderr=subprocess.STDOUT, cwd=self.directory
            )
            log.close()
            if self._wait_ready():
                return
            self.kill()
            if port is not None:
                time.sleep(0.1)  # the old socket may linger for a moment
        raise RuntimeError(
            f"redis-server did not start: {(self.directory / 'redis.log').read_text()}"
        )

    def _wait_ready(self) -> bool:
        """Bounded: 10 s for the port to answer PING (or the process to die)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                return False
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return True if self.tls else self._pings()
            except OSError:
                time.sleep(0.02)
        return False

    def _pings(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            if self.password:
                sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.recv(64)
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop_signal(self, signum: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signum)

    def command(self, *args: str | int) -> Any:
        """One command over a plain blocking socket (not TLS), for set-up and checks."""
        commands = [hiredis.pack_command(("AUTH", self.password))] if self.password else []
        commands.append(hiredis.pack_command(args))
        reader, replies = hiredis.Reader(), []
        with socket.create_connection((HOST, self.port), timeout=5) as sock:
            sock.sendall(b"".join(commands))
            while len(replies) < len(commands):
                reader.feed(sock.recv(65536))
                while (reply := reader.gets()) is not False:
                    replies.append(reply)
        return replies[-1]


@contextmanager
def redis_server(
    directory: Path, *, password: str | None = None, tls: trustme.CA | None = None
) -> Iterator[RedisServer]:
    if not Path(REDIS_SERVER).exists():
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(directory, password, tls)
    server.start()
    try:
        yield server
    finally:
        server.kill()
