"""The supervisor's decisions, with no I/O: how many workers, what a worker's notification
means, when the service is ready, and whether a dead worker is restarted.

:mod:`.supervisor` carries these decisions out ("decide, then do"); everything here is a
plain function or a frozen value, tested without processes or an event loop.

A worker's lifecycle, as the supervisor sees it through the worker's sd_notify datagrams
(the same ones a single gateway sends systemd, see :mod:`.systemd`)::

    STARTING  --READY=1----->  READY  --RELOADING=1-->  RELOADING  --READY=1-->  READY
    any       --STOPPING=1-->  STOPPING
    any       --(exit)------>  (gone: restarted after a backoff, or given up)

The service is ready (READY=1 to systemd, ``supervisor.ready`` logged) once every worker
slot holds a READY worker; a reload (SIGHUP) is finished once every worker that was asked
to reload has gone RELOADING -> READY.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Iterable, Mapping

import attrs

from runestone_proxy.config import ServerConfig


def worker_count(server: ServerConfig) -> int:
    """``server.workers`` as a number: ``"auto"`` is the CPUs this process may run on."""
    if server.workers == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return server.workers


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    RELOADING = "reloading"
    STOPPING = "stopping"


#: (state, notification) -> next state. A pair that is not here leaves the state as it is
#: (a repeated READY=1, a STATUS= line, WATCHDOG=1).
TRANSITIONS: Mapping[tuple[WorkerState, str], WorkerState] = {
    (WorkerState.STARTING, "READY"): WorkerState.READY,
    (WorkerState.READY, "RELOADING"): WorkerState.RELOADING,
    (WorkerState.RELOADING, "READY"): WorkerState.READY,
    (WorkerState.STARTING, "STOPPING"): WorkerState.STOPPING,
    (WorkerState.READY, "STOPPING"): WorkerState.STOPPING,
    (WorkerState.RELOADING, "STOPPING"): WorkerState.STOPPING,
}


@attrs.frozen
class Notification:
    """One sd_notify datagram, read: the flags it raised (``READY``, ``RELOADING``,
    ``STOPPING``, ``WATCHDOG``) and its ``STATUS=`` text, if any."""

    flags: frozenset[str]
    status: str | None = None


def parse_notification(data: bytes) -> Notification:
    """``KEY=VALUE`` lines (sd_notify(3)); flags are the keys set to ``1``."""
    flags = set()
    status = None
    for line in data.decode("utf-8", "replace").split("\n"):
        key, sep, value = line.partition("=")
        if not sep:
            continue
        if value == "1" and key in ("READY", "RELOADING", "STOPPING", "WATCHDOG"):
            flags.add(key)
        elif key == "STATUS":
            status = value
    return Notification(frozenset(flags), status)


def next_state(state: WorkerState, note: Notification) -> WorkerState:
    """Apply a notification's flags in the order a worker sends them within one datagram
    (RELOADING before READY never share one; STOPPING wins over everything)."""
    for flag in ("RELOADING", "READY", "STOPPING"):
        if flag in note.flags:
            state = TRANSITIONS.get((state, flag), state)
    return state


def all_ready(states: Iterable[WorkerState | None], expected: int) -> bool:
    """Every one of ``expected`` slots holds a READY worker (None: the slot is empty)."""
    listed = list(states)
    return len(listed) == expected and all(s is WorkerState.READY for s in listed)


# --- restarts -------------------------------------------------------------------------------


@attrs.frozen
class RestartPolicy:
    """A dead worker comes back after ``base_s * 2**n`` (capped at ``max_s``), where ``n``
    counts its slot's restarts within the last ``window_s``; more than ``max_restarts``
    there and the supervisor gives up (stops every worker and exits 1, so the service
    manager's own restart policy takes over, as systemd's StartLimitBurst= would)."""

    base_s: float = 0.1
    max_s: float = 5.0
    window_s: float = 60.0
    max_restarts: int = 10


@attrs.frozen
class Restart:
    delay_s: float


@attrs.frozen
class GiveUp:
    reason: str


def decide_restart(
    policy: RestartPolicy, recent: Iterable[float], now: float, *, was_ready: bool
) -> Restart | GiveUp:
    """What to do about a worker that died unasked. ``recent`` holds the times its slot was
    restarted before; ``was_ready``: it had once reported READY=1 (a worker that dies
    before it was ever ready while the service starts means the configuration or the
    environment is wrong: the caller gives up at once, see :func:`startup_failed`)."""
    n = sum(1 for t in recent if now - t <= policy.window_s)
    if n >= policy.max_restarts:
        return GiveUp(f"{n} restarts within {policy.window_s:g} s")
    delay = 0.0 if was_ready and n == 0 else min(policy.max_s, policy.base_s * 2**n)
    return Restart(delay)


def startup_failed(service_ready: bool, was_ready: bool) -> bool:
    """A worker died before the service was ever ready, and before it was ready itself:
    restarting it would fail the same way, so the supervisor stops and reports it."""
    return not service_ready and not was_ready


def describe_exit(status: int) -> dict[str, int | str]:
    """A ``waitpid`` status as log fields: ``exit_code``, or ``signal`` by name."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return {"signal": name}
    return {"exit_code": os.waitstatus_to_exitcode(status)}
