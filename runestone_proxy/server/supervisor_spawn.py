"""How the supervisor starts a worker: the listening sockets it hands down, the worker's
environment, and the spawn itself.

A worker is today's gateway, ``python -m runestone_proxy --config PATH``, started exactly as
systemd would start it with socket activation (sd_listen_fds(3)): its listening sockets at
fds ``3 .. 3+n-1`` with ``LISTEN_FDS``, ``LISTEN_FDNAMES`` (``main``/``health``) and
``LISTEN_PID`` set to its own pid, and ``NOTIFY_SOCKET`` naming the supervisor's datagram
socket. So the worker needs no code of its own to take its sockets or to report
readiness: :mod:`.systemd` already does both.

How this works
--------------
* **Fds in place without ``preexec_fn``.** ``os.posix_spawn`` with ``POSIX_SPAWN_DUP2``
  file actions puts each socket at its number in the child (dup2 also clears
  close-on-exec there; every other fd of ours is close-on-exec, PEP 446, so the child gets
  nothing else). Each source is first duplicated above the target range, so no dup2 can
  overwrite a socket that a later one still has to copy.
* **``LISTEN_PID`` = the worker's pid.** It is not known before the spawn, so the child is
  ``/bin/sh -c 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"' ...``: ``$$`` is the shell's
  pid, and ``exec`` keeps it, so it is the Python worker's pid too. One tiny shell per
  (re)start, no ``preexec_fn`` (unsafe once threads exist), nothing worker-specific in the
  socket code.
* **Own process group.** A terminal's Ctrl-C reaches only the supervisor, which forwards
  one orderly SIGTERM; under systemd, ``KillMode=mixed`` does the same for ``systemctl
  stop``.
* **Supervisor death.** The read end of a pipe whose write end only the supervisor holds is
  passed at fd ``3+n`` (``RUNESTONE_SUPERVISOR_FD``): when the supervisor dies, however it
  dies, the worker reads EOF and drains (no orphan keeps serving on the sockets).
"""

from __future__ import annotations

import fcntl
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import trio

from runestone_proxy.config import ServerConfig
from runestone_proxy.server import systemd

#: What marks a process as a worker (its slot number), and where the supervisor keeps its
#: private sockets; read by :mod:`.supervisor_worker`.
ENV_WORKER = "RUNESTONE_WORKER"
ENV_WORKER_COUNT = "RUNESTONE_WORKER_COUNT"
ENV_WORKER_DIR = "RUNESTONE_WORKER_DIR"
ENV_SUPERVISOR_FD = "RUNESTONE_SUPERVISOR_FD"

#: Inherited variables that are the supervisor's, never a worker's.
_NOT_INHERITED = (
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
)

_SHELL_SCRIPT = 'LISTEN_PID=$$; export LISTEN_PID; exec "$@"'


@attrs.frozen
class Sockets:
    """The listening sockets, named by role, each duplicated above the fds it lands on."""

    #: (name, socket) in the order the worker receives them (fd 3 first).
    named: tuple[tuple[str, socket.socket], ...]
    #: The duplicate of each, the source of its dup2 (close-on-exec here).
    sources: tuple[int, ...]
    port: int
    health_port: int | None

    def close(self) -> None:
        for fd in self.sources:
            os.close(fd)
        for _, sock in self.named:
            sock.close()


def _high_dup(fd: int, floor: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor)


def _port(sock: socket.socket) -> int:
    port: int = sock.getsockname()[1]
    return port


async def open_sockets(server: ServerConfig, env: Mapping[str, str]) -> Sockets:
    """systemd's sockets (socket activation) if it passed any, else bound here as a single
    gateway binds them (``trio.open_tcp_listeners``: every address of ``host``)."""
    inherited = systemd.listen_fds_with_names(env)
    named: list[tuple[str, socket.socket]] = []
    if inherited:
        roles = systemd.assign_roles(inherited)
        named += [(systemd.FDNAME_MAIN, s) for s in roles.main]
        named += [(systemd.FDNAME_HEALTH, s) for s in roles.health]
    else:
        ports = [(systemd.FDNAME_MAIN, server.port)]
        if server.health_port is not None:
            ports.append((systemd.FDNAME_HEALTH, server.health_port))
        for name, port in ports:
            listeners = await trio.open_tcp_listeners(
                port, host=server.host, backlog=server.backlog
            )
            named += [(name, socket.socket(fileno=ln.socket.detach())) for ln in listeners]
    floor = systemd.SD_LISTEN_FDS_START + len(named) + 1
    sources = tuple(_high_dup(s.fileno(), floor) for _, s in named)
    health = [s for name, s in named if name == systemd.FDNAME_HEALTH]
    return Sockets(
        tuple(named),
        sources,
        port=_port(next(s for name, s in named if name == systemd.FDNAME_MAIN)),
        health_port=_port(health[0]) if health else None,
    )


@attrs.frozen
class WorkerSpec:
    """Everything each spawn of a worker shares: its command line and environment."""

    argv: tuple[str, ...]
    env: Mapping[str, str]
    sockets: Sockets
    #: The read end of the supervisor-death pipe (close-on-exec here).
    lifeline: int

    def spawn(self, slot: int) -> int:
        """Start the worker for ``slot``; its pid."""
        n = len(self.sockets.named)
        first = systemd.SD_LISTEN_FDS_START
        actions: list[tuple[int, int, int]] = [
            (os.POSIX_SPAWN_DUP2, source, first + i)
            for i, source in enumerate(self.sockets.sources)
        ]
        actions.append((os.POSIX_SPAWN_DUP2, self.lifeline, first + n))
        env = {
            **self.env,
            ENV_WORKER: str(slot),
            "LISTEN_FDS": str(n),
            "LISTEN_FDNAMES": ":".join(name for name, _ in self.sockets.named),
            ENV_SUPERVISOR_FD: str(first + n),
        }
        argv = ["/bin/sh", "-c", _SHELL_SCRIPT, "runestone-worker", *self.argv]
        return os.posix_spawn("/bin/sh", argv, env, file_actions=actions, setpgroup=0)


def worker_spec(
    config_path: Path | None,
    env: Mapping[str, str],
    sockets: Sockets,
    *,
    count: int,
    directory: Path,
    notify_socket: Path,
    watchdog_usec: str | None,
    lifeline: int,
) -> WorkerSpec:
    argv: Sequence[str] = [sys.executable, "-m", "runestone_proxy"]
    if config_path is not None:
        argv = [*argv, "--config", str(config_path)]
    child_env = {k: v for k, v in env.items() if k not in _NOT_INHERITED}
    child_env.update(
        {
            ENV_WORKER_COUNT: str(count),
            ENV_WORKER_DIR: str(directory),
            "NOTIFY_SOCKET": str(notify_socket),
        }
    )
    if watchdog_usec is not None:
        child_env["WATCHDOG_USEC"] = watchdog_usec
    return WorkerSpec(tuple(argv), child_env, sockets, lifeline)
