"""Child processes for a bench run: start them pinned to a CPU, learn their port, wait until
they are ready, and always tear them down.

Everything listens on 127.0.0.1 only. A bench server (``bench.baseline``, ``bench.upstream``)
binds port 0 and prints the port it got; the gateway is handed a port that the parent
found free by binding port 0 itself (:func:`free_port`; the gap between closing that socket
and the child binding it is the one race we accept).

:meth:`Process.stop` sends SIGTERM, waits a bounded time, then SIGKILLs; callers register
it in an :class:`contextlib.ExitStack` so a failed run cannot leak servers.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


class StartError(RuntimeError):
    """A child did not start or did not become ready; the message quotes its log."""


def bench_cpus() -> tuple[int | None, int | None]:
    """(server CPU, load CPU): the first two CPUs we may run on, or (None, None) with fewer."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return None, None
    return cpus[0], cpus[1]


def pin_to(cpu: int | None) -> Callable[[], None] | None:
    """A ``preexec_fn`` that pins the child (and every thread it starts) to ``cpu``."""
    if cpu is None:
        return None

    def pin() -> None:
        os.sched_setaffinity(0, {cpu})

    return pin


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


@attrs.define
class Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    cpu: int | None = None

    def log_tail(self, limit: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL and reap."""
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def __repr__(self) -> str:
        return f"<Process {self.name} pid={self.popen.pid} port={self.port} cpu={self.cpu}>"


def spawn(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    *,
    cpu: int | None,
    env: Mapping[str, str] | None = None,
    announces_port: bool = False,
    port: int = 0,
    timeout_s: float = 10.0,
) -> Process:
    """Start ``argv`` (stderr, and stdout unless it announces its port, go to a log file).

    With ``announces_port`` the first stdout line must be the port, within ``timeout_s``.
    """
    log_path = log_dir / f"{name}.log"
    log = log_path.open("wb")
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE if announces_port else log,
        stderr=log,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        preexec_fn=pin_to(cpu),
    )
    log.close()  # the child holds its own descriptor
    proc = Process(name, popen, log_path, port, cpu)
    if announces_port:
        try:
            proc.port = _read_port(proc, timeout_s)
        except BaseException:
            proc.stop()
            raise
    return proc


def _read_port(proc: Process, timeout_s: float) -> int:
    assert proc.popen.stdout is not None
    fd = proc.popen.stdout.fileno()
    deadline = time.monotonic() + timeout_s
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise StartError(f"{proc.name} printed no port in {timeout_s} s\n{proc.log_tail()}")
        chunk = os.read(fd, 64)
        if not chunk:
            raise StartError(f"{proc.name} exited before printing its port\n{proc.log_tail()}")
        line += chunk
    try:
        return int(line.strip())
    except ValueError:
        raise StartError(f"{proc.name} printed {line!r}, not a port") from None


def http_status(host: str, port: int, path: str, timeout_s: float = 1.0) -> int | None:
    """Status of one ``GET path`` over HTTP/1.1 (connection: close), or None on any error."""
    request = f"GET {path} HTTP/1.1\r\nhost: {host}:{port}\r\nconnection: close\r\n\r\n"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(request.encode())
            head = sock.recv(64)
        return int(head.split(b" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return None


def wait_ready(proc: Process, path: str, timeout_s: float = 10.0) -> None:
    """Poll ``GET path`` until it answers 200; fail early if the child exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            code = proc.popen.returncode
            raise StartError(f"{proc.name} exited with {code} while starting\n{proc.log_tail()}")
        if http_status(HOST, proc.port, path) == 200:
            return
        time.sleep(0.05)
    raise StartError(f"{proc.name}: GET {path} was not 200 within {timeout_s} s\n{proc.log_tail()}")


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (all its threads) from /proc, in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rpartition(")")[2].split()  # the command name may contain spaces
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S


def core_busy_seconds(core: int) -> float:
    """Busy time of CPU ``core`` since boot, all processes together (from /proc/stat)."""
    prefix = f"cpu{core} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(prefix):
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            return (user + nice + system + irq + softirq + steal) / _TICKS_PER_S
    raise OSError(f"no {prefix.strip()} line in /proc/stat")


@attrs.define
class CpuMeter:
    """How much CPU a server burnt during the measured part of a load run, and how much of
    its core other processes took meanwhile.

    On a shared machine req/s moves with the neighbours; CPU time per request much less,
    so it is the steadier figure for comparing the gateway with the baseline. ``others_s``
    says how noisy the run was.
    """

    pid: int
    core: int | None = None
    cpu_s: float | None = None
    wall_s: float | None = None
    others_s: float | None = None
    _cpu0: float = 0.0
    _core0: float = 0.0
    _wall0: float = 0.0

    def start(self) -> None:
        self._cpu0, self._wall0 = cpu_seconds(self.pid), time.monotonic()
        if self.core is not None:
            self._core0 = core_busy_seconds(self.core)

    def stop(self) -> None:
        self.cpu_s = cpu_seconds(self.pid) - self._cpu0
        self.wall_s = time.monotonic() - self._wall0
        if self.core is not None:
            busy = core_busy_seconds(self.core) - self._core0
            self.others_s = max(0.0, busy - self.cpu_s)
