"""systemd integration: sd_notify datagrams, the watchdog, socket activation.

Test rules: notifications go to a real ``AF_UNIX``/``SOCK_DGRAM`` socket bound in
``tmp_path`` (or in the abstract namespace under a random name); every wait is bounded by
``trio.fail_after``; time-dependent tests run on ``MockClock(autojump_threshold=0)`` and
never sleep. Socket activation needs real fds at 3, 4, ... which pytest itself may be
using, so those tests run a child interpreter that moves the sockets we pass it onto fd 3
and up, sets ``LISTEN_PID`` to its own pid, as systemd does between fork and exec, and
reports what :func:`listen_fds_with_names` found.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from runestone_proxy.server.systemd import (
    ActivatedSockets,
    ListenFdsError,
    Notifier,
    assign_roles,
    listen_fds,
    listen_fds_with_names,
    watchdog_interval,
    watchdog_loop,
)

REPO = Path(__file__).resolve().parents[2]


class Receiver:
    """The service manager's end of ``NOTIFY_SOCKET``."""

    def __init__(self, sock: trio.socket.SocketType, address: str) -> None:
        self.sock = sock
        self.address = address

    async def next(self) -> list[str]:
        # Generous: under the autojump clock this is virtual time, and must outlast a
        # watchdog interval; in real time a datagram is already there or never comes.
        with trio.fail_after(60):
            data = await self.sock.recv(4096)
        return data.decode().split("\n")


@pytest.fixture
async def receiver(tmp_path: Path) -> AsyncIterator[Receiver]:
    path = str(tmp_path / "notify")
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind(path)
        yield Receiver(sock, path)


# --- notifications --------------------------------------------------------------------------


async def test_ready_sends_ready_and_status(receiver: Receiver) -> None:
    with Notifier.from_env({"NOTIFY_SOCKET": receiver.address}) as notifier:
        assert notifier.enabled
        await notifier.ready("listening on 127.0.0.1:4003")
        assert await receiver.next() == ["READY=1", "STATUS=listening on 127.0.0.1:4003"]
    assert notifier._sock is None


async def test_each_message_is_one_datagram_on_one_connected_socket(
    receiver: Receiver,
) -> None:
    with Notifier(receiver.address) as notifier:
        await notifier.stopping()
        first_socket = notifier._sock
        await notifier.watchdog()
        await notifier.status("draining\n3 streams left")
        await notifier.notify("A=1", "B=2")
        assert await receiver.next() == ["STOPPING=1"]
        assert await receiver.next() == ["WATCHDOG=1"]
        # A newline inside a value would start a new assignment, so status folds it.
        assert await receiver.next() == ["STATUS=draining 3 streams left"]
        assert await receiver.next() == ["A=1", "B=2"]
        assert notifier._sock is first_socket is not None


async def test_reloading_carries_clock_monotonic_usec(receiver: Receiver) -> None:
    with Notifier(receiver.address) as notifier:
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        await notifier.reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    reloading, usec = await receiver.next()
    assert reloading == "RELOADING=1"
    key, _, value = usec.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


async def test_abstract_namespace_address() -> None:
    name = f"runestone-test-{secrets.token_hex(8)}"
    with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        await sock.bind("\0" + name)
        with Notifier.from_env({"NOTIFY_SOCKET": "@" + name}) as notifier:
            await notifier.ready("up")
        assert await Receiver(sock, "@" + name).next() == ["READY=1", "STATUS=up"]


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}])
async def test_without_notify_socket_everything_is_a_no_op(env: dict[str, str]) -> None:
    errors: list[Exception] = []
    notifier = Notifier.from_env(env, on_error=errors.append)
    assert not notifier.enabled
    await notifier.ready("up")
    await notifier.reloading()
    await notifier.stopping()
    await notifier.watchdog()
    assert errors == []
    assert notifier._sock is None


async def test_send_errors_are_reported_once_and_never_raised(tmp_path: Path) -> None:
    errors: list[Exception] = []
    notifier = Notifier(str(tmp_path / "nobody-listens"), on_error=errors.append)
    await notifier.ready("up")
    await notifier.watchdog()
    await notifier.stopping()
    assert len(errors) == 1
    assert isinstance(errors[0], FileNotFoundError)


async def test_unsupported_address_is_reported_not_raised() -> None:
    errors: list[Exception] = []
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"}, on_error=errors.append)
    await notifier.ready("up")
    assert len(errors) == 1
    assert isinstance(errors[0], ValueError)


async def test_reconnects_after_the_manager_socket_comes_back(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    errors: list[Exception] = []
    with Notifier(path, on_error=errors.append) as notifier:
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(path)
            await notifier.status("one")
            assert await Receiver(sock, path).next() == ["STATUS=one"]
        os.unlink(path)
        await notifier.status("lost")  # the manager's socket is gone: reported, dropped
        assert len(errors) == 1
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            await sock.bind(path)
            await notifier.status("two")
            assert await Receiver(sock, path).next() == ["STATUS=two"]


# --- watchdog -------------------------------------------------------------------------------


async def test_watchdog_loop_pings_now_and_every_interval(
    receiver: Receiver, autojump_clock: trio.testing.MockClock
) -> None:
    start = trio.current_time()
    with Notifier(receiver.address) as notifier:
        async with trio.open_nursery() as nursery:
            await nursery.start(watchdog_loop, notifier, 15.0)
            seen = []
            for _ in range(4):
                assert await receiver.next() == ["WATCHDOG=1"]
                seen.append(trio.current_time() - start)
            nursery.cancel_scope.cancel()
    assert seen == pytest.approx([0.0, 15.0, 30.0, 45.0])


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, None),
        ({"WATCHDOG_USEC": "500"}, 0.00025),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "3²"}, None),
        ({"WATCHDOG_USEC": ""}, None),
    ],
)
def test_watchdog_interval(env: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(env) == expected


# --- socket activation, in process (only paths that touch no fd) ----------------------------


def test_no_listen_pid_means_no_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    assert listen_fds() == []
    assert listen_fds_with_names({"LISTEN_FDS": "2"}) == []


def test_fds_meant_for_another_pid_are_ignored_and_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "main:health")
    assert listen_fds(unset=False) == []
    assert os.environ["LISTEN_FDS"] == "2"
    assert listen_fds() == []
    assert not {"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"} & set(os.environ)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"LISTEN_PID": "me"}, "LISTEN_PID is not a pid"),
        ({"LISTEN_FDS": "two"}, "LISTEN_FDS is not a count"),
        ({"LISTEN_FDS": "-1"}, "LISTEN_FDS is not a count"),
        ({"LISTEN_FDS": "2", "LISTEN_FDNAMES": "main"}, "1 names for LISTEN_FDS=2"),
    ],
)
def test_malformed_listen_variables_are_errors(env: dict[str, str], message: str) -> None:
    env = {"LISTEN_PID": str(os.getpid()), **env}
    with pytest.raises(ListenFdsError, match=message):
        listen_fds(env, unset=False)


def test_zero_fds_for_us_is_empty() -> None:
    assert listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "0"}, unset=False) == []


# --- socket activation, in a child that owns fd 3 and up ------------------------------------

CHILD = """
import fcntl, json, os, socket, sys
from runestone_proxy.server import systemd

sources = [int(fd) for fd in os.environ.pop("TEST_SOURCE_FDS").split(",")]
# Lift the inherited fds above the target range first, so that dup2 onto 3, 4, ... never
# overwrites a source that happens to sit there; then do what systemd does before exec.
lifted = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in sources]
for fd in sources:
    os.close(fd)
for i, fd in enumerate(lifted):
    os.dup2(fd, systemd.SD_LISTEN_FDS_START + i)
    os.close(fd)
os.environ["LISTEN_PID"] = str(os.getpid())
os.environ["LISTEN_FDS"] = str(len(sources))
try:
    found = systemd.listen_fds_with_names()
except systemd.ListenFdsError as exc:
    print(json.dumps({"error": str(exc)}))
    sys.exit(0)
report = {
    "found": [
        [name, s.fileno(), int(s.family), int(s.type), os.get_inheritable(s.fileno()),
         list(s.getsockname())]
        for name, s in found
    ],
    "env_left": sorted(k for k in os.environ if k.startswith("LISTEN_")),
}
roles = systemd.assign_roles(found)
conn, _ = roles.main[0].accept()
with conn:
    conn.sendall(b"hello from fd %d" % roles.main[0].fileno())
print(json.dumps(report))
"""


def run_child(fds: list[int], fdnames: str | None) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LISTEN_")}
    env["PYTHONPATH"] = str(REPO)
    env["TEST_SOURCE_FDS"] = ",".join(map(str, fds))
    if fdnames is not None:
        env["LISTEN_FDNAMES"] = fdnames
    done = subprocess.run(
        [sys.executable, "-c", CHILD],
        pass_fds=fds,
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize(
    ("fdnames", "names"),
    [("main:health", ["main", "health"]), (None, ["unknown", "unknown"])],
)
def test_child_takes_over_passed_listening_sockets(fdnames: str | None, names: list[str]) -> None:
    with (
        socket.create_server(("127.0.0.1", 0)) as main,
        socket.create_server(("127.0.0.1", 0)) as health,
        # The handshake completes against main's backlog; the child accepts it later.
        socket.create_connection(main.getsockname(), timeout=10) as client,
    ):
        report = run_child([main.fileno(), health.fileno()], fdnames)
        assert report["env_left"] == []
        stream, inet = int(socket.SOCK_STREAM), int(socket.AF_INET)
        assert report["found"] == [
            [names[0], 3, inet, stream, False, list(main.getsockname())],
            [names[1], 4, inet, stream, False, list(health.getsockname())],
        ]
        assert client.recv(100) == b"hello from fd 3"


def test_child_rejects_a_passed_fd_that_is_not_a_socket() -> None:
    read_end, write_end = os.pipe()
    try:
        report = run_child([read_end], "main")
    finally:
        os.close(read_end)
        os.close(write_end)
    assert report == {"error": "fd 3 (main) is not a socket"}


# --- roles ----------------------------------------------------------------------------------


@pytest.fixture
def socks() -> Iterator[list[socket.socket]]:
    made = [socket.socket() for _ in range(3)]
    yield made
    for s in made:
        s.close()


def test_roles_by_name_whatever_the_order(socks: list[socket.socket]) -> None:
    a, b, c = socks
    roles = assign_roles([("health", a), ("main", b), ("main", c)])
    assert roles == ActivatedSockets(main=(b, c), health=(a,))


def test_roles_by_position_when_nothing_is_named(socks: list[socket.socket]) -> None:
    a, b, _ = socks
    assert assign_roles([]) == ActivatedSockets()
    assert assign_roles([("unknown", a)]) == ActivatedSockets(main=(a,))
    assert assign_roles([("runestone-proxy.socket", a), ("unknown", b)]) == ActivatedSockets(
        main=(a,), health=(b,)
    )


def test_roles_refuse_to_guess(socks: list[socket.socket]) -> None:
    a, b, c = socks
    with pytest.raises(ListenFdsError, match="expected only 'main' and 'health'"):
        assign_roles([("main", a), ("metrics", b)])
    with pytest.raises(ListenFdsError, match="3 unnamed sockets"):
        assign_roles([("unknown", a), ("unknown", b), ("unknown", c)])
