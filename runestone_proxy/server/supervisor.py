"""``server.workers = N``: one supervisor process, N gateway workers on the same sockets.

The supervisor serves no request. It owns the listening sockets (bound here, or systemd's
through socket activation), starts N workers that accept on them (:mod:`.supervisor_spawn`:
each worker is today's gateway, socket-activated by us), and is the service's one face to
systemd. With ``workers = 1`` none of this runs: ``__main__`` starts the gateway itself.

The tree::

    Supervisor.run                      root nursery
    ├── notifications                   the workers' sd_notify datagrams (NOTIFY_SOCKET we
    │                                   bound; SO_PASSCRED tells which worker sent one)
    ├── signals                         SIGHUP -> every worker; SIGTERM/SIGINT -> drain all
    ├── watchdog (WatchdogSec= set)     WATCHDOG=1 up only while every worker pings
    └── one watcher per worker          waits on its pidfd; reaps; restarts or gives up

Lifecycle: STARTING until every worker sent READY=1, then READY=1 to systemd and
``supervisor.ready`` logged (with the ports). SIGHUP: RELOADING=1 up, SIGHUP to every
worker (to a still-starting one once it is ready), READY=1 up when all have reloaded.
SIGTERM/SIGINT: STOPPING=1 up, SIGTERM to every worker (each drains as a single gateway
does), no more restarts; once all have exited the supervisor exits 0. A second
SIGTERM/SIGINT SIGKILLs what is left. A worker that dies unasked is logged with its exit
status and restarted (:func:`.supervisor_policy.decide_restart`: backoff, bounded rate);
one that dies before the service was ever ready stops everything (exit 1, or 2 for a
configuration error), since its siblings would fail the same way.

Signals go through pidfds (``pidfd_send_signal``), so a reaped worker's pid being reused
can never make us signal a stranger.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

import attrs
import structlog
import trio

from runestone_proxy.config import Config
from runestone_proxy.server import systemd
from runestone_proxy.server.supervisor_policy import (
    GiveUp,
    RestartPolicy,
    WorkerState,
    all_ready,
    decide_restart,
    describe_exit,
    next_state,
    parse_notification,
    startup_failed,
    worker_count,
)
from runestone_proxy.server.supervisor_spawn import (
    ENV_WORKER,
    Sockets,
    WorkerSpec,
    open_sockets,
    worker_spec,
)

log = structlog.get_logger("runestone.supervisor")

#: With the watchdog on, a worker that is not ready this long after its start is wedged
#: (systemd's default TimeoutStartSec=).
START_LIMIT_S = 90.0
_UCRED = struct.Struct("iII")  # struct ucred: pid, uid, gid (unix(7), SCM_CREDENTIALS)


def wanted(config: Config, env: Mapping[str, str]) -> bool:
    """Run the supervisor: more than one worker, and this process is not a worker."""
    return ENV_WORKER not in env and worker_count(config.server) > 1


@attrs.define(eq=False)
class Worker:
    slot: int
    pid: int
    pidfd: int
    last_ping: float
    state: WorkerState = WorkerState.STARTING
    was_ready: bool = False
    #: Asked to reload (SIGHUP sent, or due once it is ready) and not yet back to READY.
    reload_asked: bool = False
    reload_sent: bool = False
    #: The watchdog sent SIGABRT (a SIGKILL follows if it is still there next round).
    aborted: bool = False

    def signal(self, signum: int) -> None:
        try:
            signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass  # exited, not yet reaped: its watcher will see it


@attrs.define(eq=False)
class Supervisor:
    config: Config
    config_path: Path | None
    env: Mapping[str, str]
    count: int
    policy: RestartPolicy = attrs.Factory(RestartPolicy)
    notifier: systemd.Notifier = attrs.Factory(systemd.Notifier)
    phase: str = "starting"  # starting | ready | reloading | stopping
    exit_code: int = 0
    slots: list[Worker | None] = attrs.Factory(list)
    restarts: list[list[float]] = attrs.Factory(list)
    _spec: WorkerSpec | None = None
    _nursery: trio.Nursery | None = None
    _all_gone: trio.Event = attrs.Factory(trio.Event)
    _sockets: Sockets | None = None

    async def run(self) -> int:
        """Serve until stopped; the process's exit status."""
        self.slots = [None] * self.count
        self.restarts = [[] for _ in range(self.count)]
        directory = Path(
            tempfile.mkdtemp(prefix="runestone-", dir=self.env.get("RUNTIME_DIRECTORY"))
        )
        lifeline, keep_alive = os.pipe()
        notify_path = directory / "notify.sock"
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sockets = await open_sockets(self.config.server, self.env)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
            await sock.bind(str(notify_path))
            interval = systemd.watchdog_interval(self.env)
            self._spec = worker_spec(
                self.config_path,
                self.env,
                self._sockets,
                count=self.count,
                directory=directory,
                notify_socket=notify_path,
                watchdog_usec=self.env.get("WATCHDOG_USEC") if interval else None,
                lifeline=lifeline,
            )
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._notifications, sock)
                await nursery.start(self._signals)
                if interval is not None:
                    nursery.start_soon(self._watchdog, interval)
                for slot in range(self.count):
                    self._spawn(slot)
                log.info("supervisor.starting", workers=self.count, port=self._sockets.port)
                await self._all_gone.wait()
                nursery.cancel_scope.cancel()
        finally:
            sock.close()
            self.notifier.close()
            if self._sockets is not None:
                self._sockets.close()
            os.close(lifeline)
            os.close(keep_alive)
            shutil.rmtree(directory, ignore_errors=True)
        log.info("supervisor.stopped", exit_code=self.exit_code)
        return self.exit_code

    # --- workers ------------------------------------------------------------------------------

    def _live(self) -> list[Worker]:
        return [w for w in self.slots if w is not None]

    def _spawn(self, slot: int) -> None:
        assert self._spec is not None
        assert self._nursery is not None
        pid = self._spec.spawn(slot)
        worker = Worker(slot, pid, os.pidfd_open(pid), time.monotonic())
        self.slots[slot] = worker
        log.info("supervisor.worker.started", slot=slot, pid=pid)
        self._nursery.start_soon(self._watch, worker)

    async def _watch(self, worker: Worker) -> None:
        """Reap ``worker`` when it exits, then restart it or give up."""
        try:
            await trio.lowlevel.wait_readable(worker.pidfd)
            # The pidfd is readable once the child exited: this waitpid does not block.
            _, status = os.waitpid(worker.pid, 0)  # noqa: ASYNC222
        finally:
            os.close(worker.pidfd)
        self.slots[worker.slot] = None
        exit_fields = describe_exit(status)
        if self.phase == "stopping":
            log.info("supervisor.worker.stopped", slot=worker.slot, pid=worker.pid, **exit_fields)
            if not self._live():
                self._all_gone.set()
            return
        log.error("supervisor.worker.exited", slot=worker.slot, pid=worker.pid, **exit_fields)
        now = time.monotonic()
        if startup_failed(self.phase != "starting", worker.was_ready):
            code = 2 if exit_fields.get("exit_code") == 2 else 1
            await self._give_up(f"worker {worker.slot} failed to start", code)
            return
        decision = decide_restart(
            self.policy, self.restarts[worker.slot], now, was_ready=worker.was_ready
        )
        if isinstance(decision, GiveUp):
            await self._give_up(decision.reason, 1)
            return
        self.restarts[worker.slot] = [
            t for t in self.restarts[worker.slot] if now - t <= self.policy.window_s
        ] + [now]
        await trio.sleep(decision.delay_s)
        if self.phase != "stopping":
            self._spawn(worker.slot)

    async def _give_up(self, reason: str, code: int) -> None:
        log.error("supervisor.giving_up", reason=reason)
        self.exit_code = code
        await self._stop()

    # --- notifications ------------------------------------------------------------------------

    async def _notifications(self, sock: trio.socket.SocketType) -> None:
        while True:
            data, ancillary, _flags, _addr = await sock.recvmsg(4096, socket.CMSG_SPACE(12))
            pid = None
            for level, kind, cdata in ancillary:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_CREDENTIALS):
                    pid = _UCRED.unpack(cdata[: _UCRED.size])[0]
            worker = next((w for w in self._live() if w.pid == pid), None)
            if worker is not None:
                await self._noted(worker, data)

    async def _noted(self, worker: Worker, data: bytes) -> None:
        note = parse_notification(data)
        if "WATCHDOG" in note.flags:
            worker.last_ping = time.monotonic()
        before = worker.state
        worker.state = next_state(worker.state, note)
        if worker.state is WorkerState.READY and before is not WorkerState.READY:
            if before is WorkerState.RELOADING:
                worker.reload_asked = False
            if not worker.was_ready:
                worker.was_ready = True
                worker.last_ping = time.monotonic()  # the watchdog is armed from here
                log.info("supervisor.worker.ready", slot=worker.slot, pid=worker.pid)
            if worker.reload_asked and not worker.reload_sent:
                worker.reload_sent = True
                worker.signal(signal.SIGHUP)
        await self._check_ready()

    async def _check_ready(self) -> None:
        if self.phase not in ("starting", "reloading"):
            return
        states = [w.state if w is not None else None for w in self.slots]
        if not all_ready(states, self.count) or any(w.reload_asked for w in self._live()):
            return
        assert self._sockets is not None
        if self.phase == "starting":
            log.info(
                "supervisor.ready",
                workers=self.count,
                pids=[w.pid for w in self._live()],
                port=self._sockets.port,
                health_port=self._sockets.health_port,
            )
            status = f"{self.count} workers listening on port {self._sockets.port}"
        else:
            log.info("supervisor.reloaded", workers=self.count)
            status = f"{self.count} workers reloaded"
        self.phase = "ready"
        await self.notifier.ready(status)

    # --- signals ------------------------------------------------------------------------------

    async def _signals(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            task_status.started()
            async for signum in signals:
                name = signal.Signals(signum).name
                if signum == signal.SIGHUP:
                    await self._reload()
                elif self.phase == "stopping":
                    log.warning("supervisor.shutdown.forced", signal=name)
                    for worker in self._live():
                        worker.signal(signal.SIGKILL)
                else:
                    log.info("supervisor.shutdown", signal=name)
                    await self._stop()

    async def _reload(self) -> None:
        if self.phase == "stopping":
            return
        log.info("supervisor.reloading", workers=len(self._live()))
        await self.notifier.reloading()
        if self.phase == "ready":
            self.phase = "reloading"
        for worker in self._live():
            worker.reload_asked = True
            worker.reload_sent = worker.state is WorkerState.READY
            if worker.reload_sent:
                worker.signal(signal.SIGHUP)
        await self._check_ready()

    async def _stop(self) -> None:
        if self.phase == "stopping":
            return
        self.phase = "stopping"
        with trio.CancelScope(shield=True):
            await self.notifier.stopping()
        for worker in self._live():
            worker.signal(signal.SIGTERM)
        if not self._live():
            self._all_gone.set()

    # --- watchdog -----------------------------------------------------------------------------

    async def _watchdog(self, interval_s: float) -> None:
        """``WATCHDOG=1`` while every worker pinged within its ``WATCHDOG_USEC`` (twice our
        interval) since it was ready: as systemd's, a worker's watchdog is armed once its
        start-up is complete (until then it has ``START_LIMIT_S``). A worker that did not
        ping is wedged: SIGABRT (systemd's WatchdogSignal=, for
        a core dump), SIGKILL a round later if it is still there (a stopped process holds
        SIGABRT pending), then restarted as any dead worker; meanwhile the service's own
        ping waits, so systemd restarts everything if the supervisor cannot recover."""
        limit_s = 2 * interval_s
        while True:
            now = time.monotonic()
            stale = [
                w
                for w in self._live()
                if now - w.last_ping > (limit_s if w.was_ready else max(limit_s, START_LIMIT_S))
            ]
            for worker in stale:
                if worker.aborted:
                    worker.signal(signal.SIGKILL)
                    continue
                log.error("supervisor.worker.watchdog", slot=worker.slot, pid=worker.pid)
                worker.aborted = True
                worker.signal(signal.SIGABRT)
            if not stale:
                await self.notifier.watchdog()
            await trio.sleep(interval_s)


def main(config: Config, config_path: Path | None) -> int:
    """The supervisor's process: ``trio.run`` and the exit status."""
    env = os.environ
    notifier = systemd.Notifier.from_env(env)
    supervisor = Supervisor(
        config, config_path, dict(env), worker_count(config.server), notifier=notifier
    )
    try:
        return trio.run(supervisor.run)
    except KeyboardInterrupt:  # a signal before the handler was installed
        return 0
    except systemd.ListenFdsError as exc:
        print(f"runestone-proxy: socket activation: {exc}", flush=True, file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"runestone-proxy: cannot listen: {exc}", flush=True, file=sys.stderr)
        return 1
