"""A real PostgreSQL server for tests and benches: ``initdb`` into a temporary directory,
``pg_ctl start`` on a free loopback port, ``pg_ctl stop`` at the end. No mocks.

Binaries come from ``$RUNESTONE_PG_BIN`` if set, else the newest
``/usr/lib/postgresql/<version>/bin`` (Debian's ``postgresql`` package), else ``$PATH``.
PostgreSQL refuses to run as root (CI runs as root): then the data directory is given to an
unprivileged user (``postgres`` when it exists, else ``nobody``) and every server command
runs as that user through ``runuser``.

Test rules: one server per session (``fsync=off`` for speed unless ``durable``), a fresh
database per test (:meth:`PgServer.create_database`), loopback only, trust authentication.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import attrs

SUPERUSER = "runestone"


def pg_bin_dir() -> Path | None:
    """Where ``initdb``, ``pg_ctl`` and ``postgres`` live, or None if they are not here."""
    configured = os.environ.get("RUNESTONE_PG_BIN")
    if configured:
        return Path(configured)
    versions = sorted(
        Path("/usr/lib/postgresql").glob("*/bin/postgres"),
        key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0,
    )
    if versions:
        return versions[-1].parent
    found = shutil.which("pg_ctl")
    return Path(found).parent if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run_as() -> str | None:
    """The user to run the server as when we are root, else None (run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    raise RuntimeError("running as root and no unprivileged user (postgres, nobody) exists")


@attrs.define
class PgServer:
    bin_dir: Path
    directory: Path
    port: int
    user: str | None
    _counter: int = 0

    @property
    def url(self) -> str:
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _cmd(self, *argv: str) -> list[str]:
        if self.user is None:
            return list(argv)
        return ["runuser", "-u", self.user, "--", *argv]

    def create_database(self, prefix: str = "t") -> str:
        """A new empty database; returns its URL."""
        import psycopg  # here, so that collecting tests needs no driver

        self._counter += 1
        name = f"{prefix}_{os.getpid()}_{self._counter}"
        with psycopg.connect(self.url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url_for(name)

    def stop(self, mode: str = "immediate") -> None:
        subprocess.run(
            self._cmd(
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.directory / "data"),
                "-m",
                mode,
                "-w",
                "stop",
            ),
            check=False,
            capture_output=True,
        )


@contextlib.contextmanager
def running(*, durable: bool = False, parent: str | None = None) -> Iterator[PgServer]:
    """Start a server (``initdb`` + ``pg_ctl -w start``), yield it, stop it and delete it."""
    bin_dir = pg_bin_dir()
    if bin_dir is None:
        raise RuntimeError("PostgreSQL binaries not found (apt-get install postgresql)")
    user = _run_as()
    directory = Path(tempfile.mkdtemp(prefix="runestone-pg-", dir=parent))
    try:
        if user is not None:
            entry = pwd.getpwnam(user)
            os.chown(directory, entry.pw_uid, entry.pw_gid)
        server = PgServer(bin_dir, directory, _free_port(), user)
        data = directory / "data"
        subprocess.run(
            server._cmd(
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                SUPERUSER,
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ),
            check=True,
            capture_output=True,
        )
        options = f"-k {directory} -p {server.port} -h 127.0.0.1 -c max_connections=200"
        if not durable:
            options += " -c fsync=off -c full_page_writes=off"
        subprocess.run(
            server._cmd(
                str(bin_dir / "pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(directory / "server.log"),
                "-o",
                options,
                "-w",
                "start",
            ),
            check=True,
            capture_output=True,
        )
        try:
            yield server
        finally:
            server.stop()
    finally:
        shutil.rmtree(directory, ignore_errors=True)
