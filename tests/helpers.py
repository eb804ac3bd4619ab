"""Shared helpers for the real-socket tests: run the gateway, talk raw HTTP/1.1 to it.

Two ways to run the gateway, both on port 0 so tests never fight over ports:

* in-process, :func:`running_app`: ``App.build(config, None, env={})`` (no systemd, no
  environment overrides), ``await nursery.start(app.run)`` reports the bound ports; leaving the
  block cancels whatever is still running. Test routes are added to ``app.gateway.router``.
* as a child process, :func:`gateway_process`: ``python -m runestone_proxy --config PATH`` with
  ``PORT=0`` and JSON logs on stderr. The port comes from the ``gateway.ready`` log line, so
  there is no free-port race and nothing polls: every wait is for a log line or an exit.

One way to talk to it, :class:`RawClient`: a loopback TCP (or TLS) client that writes
hand-made bytes and parses responses by hand, independently of h11, so the server's parser is
not also the test's. :class:`TLSFiles` (built by the ``tls_files`` fixture in ``conftest.py``)
holds a throwaway ``trustme`` CA and certificate for the TLS listener.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import attrs
import trio
import trustme

from runestone_proxy.api.http import Handler
from runestone_proxy.config import Config
from runestone_proxy.gateway.ledger import UsageRecord
from runestone_proxy.server.app import App, Bound

HOST = "127.0.0.1"


# --- configs --------------------------------------------------------------------------------


def make_config(*, server: Mapping[str, Any] | None = None, **limits: Any) -> Config:
    """``Config()`` on port 0, with ``limits`` (and ``server``) fields replaced."""
    config = Config()
    return attrs.evolve(
        config,
        server=attrs.evolve(config.server, port=0, **(server or {})),
        limits=attrs.evolve(config.limits, **limits),
    )


# --- usage records -------------------------------------------------------------------------


def usage_record(at: float, tenant: str = "a", **fields: Any) -> UsageRecord:
    """One ledger record of a plain chat request (10 prompt, 5 completion tokens, 200 ok) by
    key ``k1``; ``fields`` replace any of its values."""
    values: dict[str, Any] = {
        "request_id": "req_1",
        "key_id": "k1",
        "endpoint": "chat",
        "model": "fast",
        "provider": "openai",
        "upstream_model": "gpt-4o-mini",
        "attempts": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "cached_tokens": 2,
        "reasoning_tokens": 1,
        "cost_usd": 0.00123,
        "status": 200,
        "outcome": "ok",
        "stream": False,
        "estimated": False,
        "latency_ms": 12.5,
    }
    values.update(fields)
    return UsageRecord(at=at, tenant=tenant, **values)


# --- TLS ------------------------------------------------------------------------------------


@attrs.frozen
class TLSFiles:
    """A throwaway CA and a ``localhost``/``127.0.0.1`` certificate issued by it."""

    ca: trustme.CA
    cert: Path
    key: Path

    def client_context(self, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        if alpn is not None:
            context.set_alpn_protocols(alpn)
        return context


# --- the gateway in-process -----------------------------------------------------------------


@attrs.frozen
class Running:
    app: App
    bound: Bound

    @property
    def port(self) -> int:
        return self.bound.port


@asynccontextmanager
async def running_app(
    config: Config, routes: Mapping[tuple[str, str], Handler] | None = None
) -> AsyncIterator[Running]:
    """The gateway serving ``config`` (plus test ``routes``) until the block ends."""
    app = App.build(config, None, env={})
    # SQLite on the loop's own thread: a worker thread would let an autojump MockClock leap
    # to the test's deadline while the store opens.
    app.store.inline = True
    for (method, path), handler in (routes or {}).items():
        app.gateway.router.add(method, path, handler)
    async with trio.open_nursery() as nursery:
        bound = await nursery.start(app.run)
        yield Running(app, bound)
        nursery.cancel_scope.cancel()


# --- a raw HTTP/1.1 client ------------------------------------------------------------------


def request(
    method: str,
    target: str,
    headers: Mapping[str, str] | Sequence[tuple[str, str]] = (),
    body: bytes = b"",
) -> bytes:
    """A request as bytes: ``host`` first, then ``headers``, then ``content-length`` if a
    body is given and neither ``content-length`` nor ``transfer-encoding`` is."""
    pairs = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
    names = {name.lower() for name, _ in pairs}
    if body and not names & {"content-length", "transfer-encoding"}:
        pairs.append(("content-length", str(len(body))))
    lines = [f"{method} {target} HTTP/1.1", "host: test", *(f"{n}: {v}" for n, v in pairs)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def chunked(*parts: bytes) -> bytes:
    """``parts`` in the chunked coding, with the last-chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts if p) + b"0\r\n\r\n"


@attrs.frozen
class Response:
    status: int
    reason: str
    #: Names lower-cased, in order.
    headers: tuple[tuple[str, str], ...]
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class RawClient:
    """One connection; reads what it is told to and keeps the rest buffered."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.eof = False

    @classmethod
    async def connect(cls, port: int, *, ssl_context: ssl.SSLContext | None = None) -> RawClient:
        stream: trio.abc.Stream = await trio.open_tcp_stream(HOST, port)
        if ssl_context is not None:
            stream = trio.SSLStream(stream, ssl_context, server_hostname="localhost")
            await stream.do_handshake()
        return cls(stream)

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def _fill(self) -> bool:
        """Read more into the buffer; False at EOF (a reset counts as EOF)."""
        if self.eof:
            return False
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, ConnectionResetError):
            data = b""
        if not data:
            self.eof = True
            return False
        self.buffer += data
        return True

    async def read_until(self, delimiter: bytes) -> bytes:
        while (index := self.buffer.find(delimiter)) < 0:
            if not await self._fill():
                raise EOFError(f"EOF before {delimiter!r}; got {bytes(self.buffer)!r}")
        end = index + len(delimiter)
        out = bytes(self.buffer[:end])
        del self.buffer[:end]
        return out

    async def read_exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            if not await self._fill():
                raise EOFError(f"EOF after {len(self.buffer)} of {size} bytes")
        out = bytes(self.buffer[:size])
        del self.buffer[:size]
        return out

    async def read_eof(self) -> bytes:
        """Everything up to EOF (what the server sent before it closed)."""
        while await self._fill():
            pass
        out = bytes(self.buffer)
        self.buffer.clear()
        return out

    async def read_head(self) -> Response:
        head = (await self.read_until(b"\r\n\r\n")).decode("latin-1")
        status_line, *lines = head[:-4].split("\r\n")
        version, status, reason = [*status_line.split(" ", 2), ""][:3]
        assert version == "HTTP/1.1", status_line
        headers = []
        for line in lines:
            name, _, value = line.partition(":")
            headers.append((name.lower(), value.strip()))
        return Response(int(status), reason, tuple(headers))

    async def read_chunk(self) -> bytes:
        """One chunk of a chunked body; ``b""`` for the last-chunk (trailers consumed)."""
        size = int((await self.read_until(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while await self.read_until(b"\r\n") != b"\r\n":
                pass
            return b""
        data = await self.read_exactly(size)
        assert await self.read_exactly(2) == b"\r\n"
        return data

    async def read_response(self, *, head: bool = False) -> Response:
        """The next response (a 1xx one included), body framed per RFC 9112 §6.3."""
        response = await self.read_head()
        if head or response.status < 200 or response.status in (204, 304):
            return response
        if response.header("transfer-encoding") == "chunked":
            parts = []
            while part := await self.read_chunk():
                parts.append(part)
            body = b"".join(parts)
        elif (length := response.header("content-length")) is not None:
            body = await self.read_exactly(int(length))
        else:
            body = await self.read_eof()
        return attrs.evolve(response, body=body)

    async def exchange(self, data: bytes, *, head: bool = False) -> Response:
        await self.send(data)
        return await self.read_response(head=head)


async def get(port: int, target: str) -> Response:
    """One request on a fresh connection."""
    async with await RawClient.connect(port) as client:
        return await client.exchange(request("GET", target, {"connection": "close"}))


# --- the gateway as a child process ---------------------------------------------------------

#: Variables a developer's shell might set that would change what the child does.
_SCRUBBED = (
    "PORT",
    "HEALTH_PORT",
    "RUNESTONE_CONFIG",
    "RUNESTONE_HOST",
    "RUNESTONE_LOG_LEVEL",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "LISTEN_PID",
    "LISTEN_FDS",
    "LISTEN_FDNAMES",
)


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
    env.update({"PORT": "0", "RUNESTONE_LOG_FORMAT": "json", "PYTHONUNBUFFERED": "1"})
    env.update(extra or {})
    return env


def cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m runestone_proxy ARGS`` to completion (for ``--check-config``)."""
    return subprocess.run(
        [sys.executable, "-m", "runestone_proxy", *args],
        env=child_env(env),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@attrs.define(eq=False)
class GatewayProcess:
    """A ``python -m runestone_proxy`` child: its log records as they come, its ports from
    its ready line. Subclasses name another ready line and another way to stop."""

    #: The log line that says the child listens (it carries the ports).
    READY: ClassVar[str] = "gateway.ready"
    NAME: ClassVar[str] = "gateway"

    process: trio.Process
    #: Every stderr line so far: the JSON log record, or ``{"raw": line}``.
    records: list[dict[str, Any]] = attrs.Factory(list)
    port: int = 0
    health_port: int | None = None
    stderr_closed: bool = False
    _changed: trio.Event = attrs.Factory(trio.Event)

    def events(self) -> list[str]:
        return [r.get("event", "") for r in self.records]

    async def wait_for_log(self, event: str) -> dict[str, Any]:
        """The first log record named ``event``, waiting for it if need be."""
        seen = 0
        while True:
            for record in self.records[seen:]:
                if record.get("event") == event:
                    return record
            seen = len(self.records)
            if self.stderr_closed:
                lines = "\n".join(json.dumps(r) for r in self.records)
                raise AssertionError(f"the gateway exited without logging {event!r}:\n{lines}")
            self._changed = trio.Event()
            await self._changed.wait()

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        pending = b""
        while data := await self.process.stderr.receive_some(65536):
            *lines, pending = (pending + data).split(b"\n")
            for line in lines:
                try:
                    record = json.loads(line)
                except ValueError:
                    record = {"raw": line.decode(errors="replace")}
                self.records.append(record if isinstance(record, dict) else {"raw": record})
            self._changed.set()
        self.stderr_closed = True
        self._changed.set()

    def ready(self, record: Mapping[str, Any]) -> None:
        """Take what the ready line says (the ports)."""
        self.port = record["port"]
        self.health_port = record.get("health_port")

    async def stop(self) -> None:
        """End a child the test left running."""
        self.process.kill()

    def send_signal(self, signum: int) -> None:
        self.process.send_signal(signum)

    async def wait(self) -> int:
        return await self.process.wait()


Child = TypeVar("Child", bound=GatewayProcess)


@asynccontextmanager
async def child_process(
    kind: type[Child], config_path: Path, env: Mapping[str, str] | None, *, ready: bool = True
) -> AsyncIterator[Child]:
    """``python -m runestone_proxy --config PATH`` as a ``kind``, once it logged its ready
    line (unless ``ready`` is false); stopped at the end if the test did not stop it, and
    its log printed (pytest shows it when the test fails)."""
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "runestone_proxy", "--config", str(config_path)],
        env=child_env(env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    child = kind(process)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(child._read_stderr)
            try:
                if ready:
                    child.ready(await child.wait_for_log(kind.READY))
                yield child
            finally:
                if process.returncode is None:
                    await child.stop()
                with trio.CancelScope(shield=True), trio.move_on_after(10):
                    await process.wait()
                print(f"{kind.NAME} exited with {process.returncode}; its log:")
                for record in child.records:
                    print(json.dumps(record))
    finally:
        assert process.stderr is not None
        with trio.CancelScope(shield=True):
            await process.stderr.aclose()


def gateway_process(
    config_path: Path, env: Mapping[str, str] | None = None
) -> AbstractAsyncContextManager[GatewayProcess]:
    """The gateway as a child process, once it logged ``gateway.ready``; killed at the end
    if the test did not stop it."""
    return child_process(GatewayProcess, config_path, env)


# --- sd_notify ------------------------------------------------------------------------------


class NotifyReceiver:
    """The service manager's end of ``NOTIFY_SOCKET``: a bound ``AF_UNIX`` datagram socket."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)

    async def __aenter__(self) -> NotifyReceiver:
        await self.sock.bind(str(self.path))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.sock.close()

    async def next(self) -> dict[str, str]:
        """The next notification as ``{KEY: VALUE}``."""
        data = await self.sock.recv(4096)
        return dict(line.split("=", 1) for line in data.decode().splitlines())
