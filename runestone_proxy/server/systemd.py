"""systemd integration without libsystemd: readiness, watchdog and socket activation.

This module owns the three small protocols a ``Type=notify`` service speaks with its
service manager. Each one is a few environment variables and, for notifications, one
datagram; we implement them directly rather than depend on ``python-systemd``.

How this works
--------------

**Notifications** (sd_notify(3)). The manager sets ``NOTIFY_SOCKET`` to the address of an
``AF_UNIX``/``SOCK_DGRAM`` socket: a filesystem path (``/run/systemd/notify``) or, when it
starts with ``@``, a Linux abstract-namespace name (the ``@`` stands for a leading NUL). A
notification is one datagram of newline-separated ``KEY=VALUE`` assignments. The ones we
send:

    READY=1             startup finished: listeners are open (``systemctl start`` returns)
    STATUS=...          one line of free text shown by ``systemctl status``
    RELOADING=1         a reload began; must be followed by READY=1 when it is done.
                        Sent with MONOTONIC_USEC=<CLOCK_MONOTONIC in µs>, which
                        ``Type=notify-reload`` requires (systemd >= 253)
    STOPPING=1          shutdown began (draining)
    WATCHDOG=1          keep-alive ping for ``WatchdogSec=``

Without ``NOTIFY_SOCKET`` (run by hand, in a container, under another supervisor) every
notification is a no-op. A failed send is never raised: readiness is advisory, and a gateway
must not fall over because its supervisor went away. The first failure is reported through
an optional callback, later ones are dropped.

**Watchdog** (sd_watchdog_enabled(3)). With ``WatchdogSec=`` set, the manager exports
``WATCHDOG_USEC`` (and ``WATCHDOG_PID``, which must be our pid when present). It kills and,
with ``Restart=on-failure``, restarts a service that stays silent for that long; the man page
advises pinging at half the interval, which :func:`watchdog_interval` returns.
:func:`watchdog_loop` runs in the root nursery, so a wedged event loop stops the pings and
systemd restarts us: exactly the failure the watchdog exists to catch.

**Socket activation** (sd_listen_fds(3)). The manager opens the listening sockets of the
``.socket`` unit(s) and passes them as fds ``3 .. 3+LISTEN_FDS-1`` (``SD_LISTEN_FDS_START``),
with ``LISTEN_PID`` set to the pid they are meant for (a child that inherits the environment
must not take them) and ``LISTEN_FDNAMES`` holding one ``FileDescriptorName=`` per fd,
colon-separated. The order of fds from different ``.socket`` units is not specified, so the
gateway tells its main socket from its health socket by name (``main``, ``health``); only
when nothing is named does position decide (see :func:`assign_roles`). Like libsystemd we
mark the fds close-on-exec and, by default, drop the ``LISTEN_*`` variables from
``os.environ`` so that no child process believes the fds are its own.
"""

from __future__ import annotations

import os
import socket
import stat
import time
from collections.abc import Callable, Mapping, Sequence

import attrs
import trio

#: The first fd a socket-activated service receives (``SD_LISTEN_FDS_START``).
SD_LISTEN_FDS_START = 3

#: ``FileDescriptorName=`` values the gateway understands.
FDNAME_MAIN = "main"
FDNAME_HEALTH = "health"
#: The name libsystemd reports for every fd when ``LISTEN_FDNAMES`` is absent.
FDNAME_UNKNOWN = "unknown"

_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")

#: A notification that cannot be delivered within this long is dropped (and reported):
#: the manager reads its socket promptly, so a full buffer means something is wrong there,
#: and shutdown must not hang on it.
_SEND_TIMEOUT_S = 1.0


# --- notifications (sd_notify(3)) -----------------------------------------------------------


def _sockaddr(address: str) -> str:
    """``NOTIFY_SOCKET`` as an ``AF_UNIX`` address: ``@name`` is abstract (leading NUL)."""
    if address.startswith("@"):
        return "\0" + address[1:]
    if address.startswith("/"):
        return address
    # sd_notify also knows "vsock:CID:PORT" (systemd >= 254, for VMs); we do not.
    raise ValueError(f"unsupported NOTIFY_SOCKET address {address!r}")


def _uint(text: str) -> int | None:
    """A decimal unsigned integer as libsystemd parses one, else None (no signs, no units)."""
    return int(text) if text.isascii() and text.isdigit() else None


def _one_line(text: str) -> str:
    """A value for ``KEY=VALUE``: a newline inside it would start a new assignment."""
    return " ".join(text.splitlines())


@attrs.define(eq=False)
class Notifier:
    """Sends sd_notify(3) datagrams to ``address``; a no-op when ``address`` is None.

    Build it with :meth:`from_env` and own it with ``with`` (``close`` on exit). The socket
    is connected on first use and reused; sends are serialised. Errors are never raised: the
    first one goes to ``on_error`` (if given) and the socket is dropped, so the next
    notification reconnects. Cancellation is not an error and propagates as usual: to
    announce ``STOPPING=1`` from a cancelled scope, shield the call (an internal one-second
    timeout bounds it).
    """

    address: str | None = None
    on_error: Callable[[Exception], None] | None = attrs.field(default=None, repr=False)
    _sock: trio.socket.SocketType | None = attrs.field(default=None, init=False, repr=False)
    _lock: trio.Lock = attrs.field(factory=trio.Lock, init=False, repr=False)
    _reported: bool = attrs.field(default=False, init=False, repr=False)

    @classmethod
    def from_env(
        cls,
        env: Mapping[str, str] | None = None,
        *,
        on_error: Callable[[Exception], None] | None = None,
    ) -> Notifier:
        """A notifier for ``NOTIFY_SOCKET`` in ``env`` (default ``os.environ``)."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, on_error=on_error)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    async def notify(self, *messages: str) -> None:
        """Send ``messages`` (``KEY=VALUE`` each) as one datagram; never raises on failure."""
        if self.address is None or not messages:
            return
        data = "\n".join(messages).encode()
        async with self._lock:
            try:
                with trio.fail_after(_SEND_TIMEOUT_S):
                    sock = await self._connected(self.address)
                    await sock.send(data)
            except (OSError, ValueError, trio.TooSlowError) as exc:
                self.close()
                self._report(exc)

    async def _connected(self, address: str) -> trio.socket.SocketType:
        if self._sock is None:
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                await sock.connect(_sockaddr(address))
            except BaseException:
                sock.close()
                raise
            self._sock = sock
        return self._sock

    def _report(self, exc: Exception) -> None:
        if not self._reported:
            self._reported = True
            if self.on_error is not None:
                self.on_error(exc)

    def close(self) -> None:
        """Close the socket; a later notification would open it again."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    async def ready(self, status: str) -> None:
        """Startup (or a reload) finished: ``READY=1`` with a status line."""
        await self.notify("READY=1", f"STATUS={_one_line(status)}")

    async def reloading(self) -> None:
        """A reload began; send :meth:`ready` when it is done (or failed and was rolled back).

        ``MONOTONIC_USEC`` is ``CLOCK_MONOTONIC`` (not trio's clock): systemd compares it with
        the time it sent the reload signal, per ``Type=notify-reload`` in systemd.service(5).
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}")

    async def stopping(self) -> None:
        await self.notify("STOPPING=1")

    async def watchdog(self) -> None:
        await self.notify("WATCHDOG=1")

    async def status(self, text: str) -> None:
        await self.notify(f"STATUS={_one_line(text)}")


# --- watchdog (sd_watchdog_enabled(3)) ------------------------------------------------------


def watchdog_interval(env: Mapping[str, str] | None = None) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WATCHDOG_USEC``), or None if off.

    Off when ``WATCHDOG_USEC`` is unset, not a positive integer, or when ``WATCHDOG_PID`` is
    set to another process's pid (the variables were inherited, not meant for us).
    """
    env = os.environ if env is None else env
    usec = _uint(env.get("WATCHDOG_USEC", ""))
    pid_text = env.get("WATCHDOG_PID")
    if pid_text and _uint(pid_text) != os.getpid():
        return None
    if not usec:
        return None
    return usec / 1_000_000 / 2


async def watchdog_loop(
    notifier: Notifier,
    interval_s: float,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``WATCHDOG=1`` now and every ``interval_s`` after, until cancelled.

    Deadlines are absolute (``sleep_until``), so a slow send does not make pings drift.
    """
    deadline = trio.current_time()
    await notifier.watchdog()
    task_status.started()
    while True:
        deadline += interval_s
        await trio.sleep_until(deadline)
        await notifier.watchdog()


# --- socket activation (sd_listen_fds(3)) ---------------------------------------------------


class ListenFdsError(Exception):
    """``LISTEN_*`` variables that are malformed, or fds that are not what they claim.

    A startup error, like :class:`runestone_proxy.config.ConfigError`: the unit files and the
    service disagree, so the process should exit rather than serve on guesses.
    """


def _parse_listen_env(env: Mapping[str, str]) -> list[str]:
    """The fd names meant for this process (one per fd; empty when none), per sd_listen_fds.

    Decides only: touches no fd and no environment.
    """
    pid_text = env.get("LISTEN_PID")
    if not pid_text:
        return []
    pid = _uint(pid_text)
    if pid is None:
        raise ListenFdsError(f"LISTEN_PID is not a pid: {pid_text!r}")
    if pid != os.getpid():
        return []  # inherited from a parent that was activated; not ours
    count_text = env.get("LISTEN_FDS", "")
    count = _uint(count_text)
    if count is None:
        raise ListenFdsError(f"LISTEN_FDS is not a count: {count_text!r}")
    names_text = env.get("LISTEN_FDNAMES")
    if names_text is None:
        return [FDNAME_UNKNOWN] * count
    names = names_text.split(":") if count else []
    if len(names) != count:
        raise ListenFdsError(
            f"LISTEN_FDNAMES has {len(names)} names for LISTEN_FDS={count}: {names_text!r}"
        )
    return names


def _unset_listen_env() -> None:
    for name in _LISTEN_VARS:
        os.environ.pop(name, None)


def listen_fds_with_names(
    env: Mapping[str, str] | None = None, *, unset: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed us, each with its ``FileDescriptorName=``.

    ``env`` defaults to ``os.environ``. With ``unset`` (the default) the ``LISTEN_*``
    variables are removed from ``os.environ`` whatever the outcome, as
    ``sd_listen_fds(3)`` does. Family and type are read from each fd. Raises
    :class:`ListenFdsError` when the variables are malformed or an fd is not a socket.
    """
    env = os.environ if env is None else env
    try:
        names = _parse_listen_env(env)
    finally:
        if unset:
            _unset_listen_env()
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + len(names))
    for fd, name in zip(fds, names, strict=True):
        try:
            mode = os.fstat(fd).st_mode
        except OSError as exc:
            raise ListenFdsError(f"fd {fd} ({name}) is not open: {exc.strerror}") from None
        if not stat.S_ISSOCK(mode):
            raise ListenFdsError(f"fd {fd} ({name}) is not a socket")
    named = []
    for fd, name in zip(fds, names, strict=True):
        os.set_inheritable(fd, False)
        named.append((name, socket.socket(fileno=fd)))
    return named


def listen_fds(env: Mapping[str, str] | None = None, *, unset: bool = True) -> list[socket.socket]:
    """The sockets systemd passed us, in fd order; see :func:`listen_fds_with_names`."""
    return [sock for _name, sock in listen_fds_with_names(env, unset=unset)]


@attrs.frozen
class ActivatedSockets:
    """Passed sockets sorted by role. A role may hold several (e.g. IPv4 and IPv6)."""

    main: tuple[socket.socket, ...] = ()
    health: tuple[socket.socket, ...] = ()


def assign_roles(named: Sequence[tuple[str, socket.socket]]) -> ActivatedSockets:
    """Decide which passed socket serves what.

    If any fd is named ``main`` or ``health``, names decide and any other name is an error.
    Otherwise (all ``unknown``, or named after their socket units because
    ``FileDescriptorName=`` was not set) position decides: the first is main, the second
    health, and a third is an error.
    """
    roles = {FDNAME_MAIN, FDNAME_HEALTH}
    if any(name in roles for name, _ in named):
        stray = sorted({name for name, _ in named} - roles)
        if stray:
            raise ListenFdsError(
                f"passed sockets named {stray}; expected only {FDNAME_MAIN!r} and "
                f"{FDNAME_HEALTH!r} (FileDescriptorName= in the .socket units)"
            )
        return ActivatedSockets(
            main=tuple(sock for name, sock in named if name == FDNAME_MAIN),
            health=tuple(sock for name, sock in named if name == FDNAME_HEALTH),
        )
    if len(named) > 2:
        raise ListenFdsError(
            f"{len(named)} unnamed sockets passed; name them with FileDescriptorName="
        )
    socks = [sock for _, sock in named]
    return ActivatedSockets(main=tuple(socks[:1]), health=tuple(socks[1:2]))
