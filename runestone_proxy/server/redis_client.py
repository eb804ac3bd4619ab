"""A Redis client for Trio: never blocks the loop, reconnects by itself, fails fast when down.

Why this client and not redis-py: redis-py's asyncio client cannot run on Trio, and its sync
client would block the loop (or need a thread per call). Here the I/O is Trio's own sockets
(``trio.SSLStream`` for ``rediss://``) and RESP parsing is hiredis' reader (``hiredis``, the
Redis project's C parser, the one redis-py uses): sans-IO, bytes in, values out, so nothing
here parses RESP by hand. Commands are packed with ``hiredis.pack_command``.

What it offers (everything the shared-state backend needs, nothing more):

- :meth:`RedisClient.call` / :meth:`RedisClient.pipeline`: one command, or several in one
  round trip; :meth:`RedisClient.send`: fire-and-forget (queued on the connection, reply
  dropped; lost if the connection breaks first).
- :meth:`RedisClient.evalsha` runs a :class:`Script` by its SHA1; the scripts registered
  with the client are ``SCRIPT LOAD``-ed at every connect, and a ``NOSCRIPT`` reply (after a
  ``SCRIPT FLUSH``) falls back to ``EVAL``, which caches it again.
- Pre-encoded commands for the hot path: :func:`command_prefix` encodes a command's fixed
  head once (``EVALSHA``, the SHA, the keys, the arguments that do not change per call); a
  caller appends the few per-call arguments as RESP bulk strings itself and hands the bytes
  to :meth:`RedisClient.call_encoded` (awaited) or :meth:`RedisClient.send_encoded`
  (fire-and-forget). A ``NOSCRIPT`` answer to either has every registered script loaded
  again and the same bytes resent: no caller keeps its arguments for that rare case.
- A per-call deadline (``timeout_s``, the connection's watchdog: see :mod:`.redis_conn`).
- :class:`RedisUnavailable` whenever Redis cannot answer. While the connection is down a call
  fails at once (no waiting for a timeout per request); :meth:`RedisClient.run` reconnects
  with exponential backoff (50 ms doubling to 2 s) and tells ``on_state`` when Redis comes
  and goes.
- :class:`Subscriber`: one ``SUBSCRIBE`` connection per process for all its channels, each
  channel's messages handed to its callback; it reconnects the same way (and reports a
  reconnect, since messages sent while it was away are lost: pub/sub is at-most-once).

One multiplexed connection carries every command (see :mod:`.redis_conn` for why it is not
a pool of connections); the subscriber is the second. The URL and the dialing (TCP or
TLS) are in :mod:`.redis_dial`.
"""

from __future__ import annotations

import hashlib
import ssl
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import Any

import attrs
import hiredis
import structlog
import trio

from runestone_proxy.server.redis_conn import (
    Connection,
    RedisError,
    RedisUnavailable,
    Reply,
    pack,
)
from runestone_proxy.server.redis_dial import RedisURL, exchange, open_stream

__all__ = [
    "RedisClient",
    "RedisError",
    "RedisURL",
    "RedisUnavailable",
    "Reply",
    "Script",
    "Subscriber",
    "command_prefix",
]

log = structlog.get_logger("runestone.redis")

BACKOFF_MIN_S = 0.05
BACKOFF_MAX_S = 2.0

Arg = str | bytes | int | float


@attrs.frozen
class Script:
    """A Lua script, known to Redis by its SHA1 once loaded."""

    source: str
    sha: str = attrs.field(init=False)

    @sha.default
    def _sha(self) -> str:
        return hashlib.sha1(self.source.encode()).hexdigest()


def command_prefix(nargs: int, fixed: Sequence[Arg]) -> bytes:
    """The RESP encoding of a command of ``nargs`` arguments, up to its first ``len(fixed)``:
    the rest are appended per call, each as ``b"$%d\\r\\n%b\\r\\n" % (len(arg), arg)``."""
    packed = pack(tuple(fixed))
    return b"*%d%b" % (nargs, packed[packed.index(b"\r\n") :])


def _noscript(reply: Reply) -> bool:
    return isinstance(reply, hiredis.ReplyError) and str(reply).startswith("NOSCRIPT")


def _check(reply: Reply, what: str) -> Reply:
    if isinstance(reply, hiredis.ReplyError):
        raise RedisError(f"{what}: {reply}")
    return reply


@attrs.define(eq=False)
class RedisClient:
    """See the module docstring. ``run`` must be running (started in the app's nursery)."""

    url: RedisURL
    timeout_s: float = 0.5
    ssl_context: ssl.SSLContext | None = None
    #: Called with True when a connection is up, False when it went down.
    on_state: Callable[[bool], None] | None = None
    scripts: list[Script] = attrs.Factory(list)
    conn: Connection | None = None
    #: Why the last connection attempt or connection failed (for errors and /health).
    why_down: str = "not connected yet"

    @classmethod
    def from_url(cls, url: str, timeout_s: float, ca_file: str | None = None) -> RedisClient:
        parsed = RedisURL.parse(url)
        context = ssl.create_default_context(cafile=ca_file) if parsed.tls else None
        return cls(parsed, timeout_s, context)

    @property
    def up(self) -> bool:
        return self.conn is not None and self.conn.broken is None

    def register(self, script: Script) -> Script:
        """Have ``script`` loaded at every connect."""
        self.scripts.append(script)
        return script

    # --- commands ----------------------------------------------------------------------------

    def _conn(self) -> Connection:
        conn = self.conn
        if conn is None or conn.broken is not None:
            raise RedisUnavailable(self.why_down)
        return conn

    async def call(self, *args: Arg) -> Reply:
        """One command's reply (an error reply is returned, as a ``hiredis.ReplyError``)."""
        conn = self._conn()
        return await conn.wait(conn.submit(pack(args)))

    async def pipeline(self, commands: Sequence[Sequence[Arg]]) -> list[Reply]:
        """Several commands, one round trip; their replies in order."""
        conn = self._conn()
        payload = b"".join(pack(tuple(c)) for c in commands)
        if len(commands) == 1:
            return [await conn.wait(conn.submit(payload))]
        reply: list[Reply] = await conn.wait(conn.submit(payload, len(commands)))
        return reply

    def send(self, *args: Arg, orphan: Callable[[Reply], None] | None = None) -> bool:
        """Queue a command nobody waits for. False: Redis is down, it was not sent."""
        conn = self.conn
        if conn is None or conn.broken is not None:
            return False
        conn.submit(pack(args), wait=False, orphan=orphan)
        return True

    def send_script(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> bool:
        """Fire-and-forget ``script`` (a ``NOSCRIPT`` reply, after a flush, has the scripts
        loaded again and the command resent). False: Redis is down, it was not sent."""
        return self.send_encoded(pack(self.evalsha_args(script, keys, args)))

    def send_encoded(self, payload: bytes) -> bool:
        """Fire-and-forget one pre-encoded ``EVALSHA`` (:func:`command_prefix`). False:
        Redis is down, it was not sent."""
        conn = self.conn
        if conn is None or conn.broken is not None:
            return False
        conn.submit(payload, wait=False, script=True)
        return True

    def call_encoded(
        self, payload: bytes, orphan: Callable[[Reply], None] | None = None
    ) -> Coroutine[Any, Any, Reply]:
        """Submit one pre-encoded ``EVALSHA`` now (:class:`RedisUnavailable` if down); await
        the result for its reply. ``orphan`` gets the reply if the caller is cancelled
        before it comes. An error reply is returned as it is: hand it to
        :meth:`recover_encoded`. (Two steps rather than one coroutine: the hot path awaits
        one frame less per command.)"""
        conn = self._conn()
        return conn.wait(conn.submit(payload, orphan=orphan))

    async def recover_encoded(
        self, reply: Reply, payload: bytes, orphan: Callable[[Reply], None] | None = None
    ) -> Reply:
        """After an error ``reply`` to :meth:`call_encoded`: ``NOSCRIPT`` (the script cache
        was flushed) has the scripts loaded again and the command run again; any other
        raises :class:`RedisError`."""
        if _noscript(reply):
            conn = self._conn()
            self._load_scripts(conn)
            reply = await conn.wait(conn.submit(payload, orphan=orphan))
        return _check(reply, "script")

    def _load_scripts(self, conn: Connection) -> None:
        """Queue ``SCRIPT LOAD`` of every registered script (before what is sent next)."""
        for script in self.scripts:
            conn.submit(pack(("SCRIPT", "LOAD", script.source)), wait=False)

    def _resend(self, payload: bytes) -> None:
        """A fire-and-forget script answered ``NOSCRIPT``: load the scripts, send it again."""
        conn = self.conn
        if conn is not None and conn.broken is None:
            self._load_scripts(conn)
            conn.submit(payload, wait=False)

    def evalsha_args(
        self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]
    ) -> tuple[Arg, ...]:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    async def evalsha(self, script: Script, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """Run ``script``; ``NOSCRIPT`` (flushed since connect) falls back to ``EVAL``."""
        reply = await self.call(*self.evalsha_args(script, keys, args))
        if _noscript(reply):
            reply = await self.call("EVAL", script.source, len(keys), *keys, *args)
        return _check(reply, "script")

    # --- connecting --------------------------------------------------------------------------

    async def connect(self) -> Connection:
        """A new connection, authenticated, on its db, with the scripts loaded."""
        url = self.url
        with trio.move_on_after(self.timeout_s * 4) as scope:
            stream = await open_stream(url, self.ssl_context)
            try:
                reader = hiredis.Reader()
                commands: list[bytes] = []
                if url.password is not None:
                    auth: tuple[Arg, ...] = ("AUTH", url.password)
                    if url.username:
                        auth = ("AUTH", url.username, url.password)
                    commands.append(pack(auth))
                if url.db:
                    commands.append(pack(("SELECT", url.db)))
                commands.append(pack(("PING",)))
                commands += [pack(("SCRIPT", "LOAD", s.source)) for s in self.scripts]
                for reply in await exchange(stream, reader, commands):
                    if isinstance(reply, hiredis.ReplyError):
                        # WRONGPASS / NOAUTH / a bad db: Redis answers, but not for us.
                        raise RedisUnavailable(f"{url} refused the handshake: {reply}")
            except BaseException:
                with trio.CancelScope(shield=True):
                    await trio.aclose_forcefully(stream)
                raise
            return Connection(stream, self.timeout_s, reader, self._resend)
        assert scope.cancelled_caught
        raise RedisUnavailable(f"cannot connect to {url}: no answer within {self.timeout_s * 4:g}s")

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Keep a connection up: connect, serve it until it fails, back off, again. Reports
        started after the first attempt, whether or not it succeeded."""
        delay = BACKOFF_MIN_S
        started = False
        while True:
            try:
                conn = await self.connect()
            except RedisUnavailable as exc:
                if self.why_down != str(exc):
                    log.warning("redis.connect.failed", url=str(self.url), error=str(exc))
                self.why_down = str(exc)
                if not started:
                    started = True
                    task_status.started()
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
                continue
            delay = BACKOFF_MIN_S
            self.conn = conn
            log.info("redis.connected", url=str(self.url))
            if self.on_state is not None:
                self.on_state(True)
            if not started:
                started = True
                task_status.started()
            try:
                await conn.serve()
            finally:
                self.why_down = conn.broken or "connection closed"
                self.conn = None
                if self.on_state is not None:
                    self.on_state(False)
            log.warning("redis.disconnected", url=str(self.url), error=self.why_down)


@attrs.define(eq=False)
class Subscriber:
    """One ``SUBSCRIBE`` connection for all of a process's channels: ``channels[name]``
    gets each message on ``name``, and ``None`` after each (re)subscribe (messages may
    have been lost). One connection whatever the number of channels: the slots' ``freed``
    and the breakers' ``health`` share it, so a process holds two connections to Redis."""

    client: RedisClient
    channels: Mapping[str, Callable[[bytes | None], None]]

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        delay = BACKOFF_MIN_S
        while True:
            try:
                await self._subscribed()
            except RedisUnavailable:
                await trio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)
            else:
                delay = BACKOFF_MIN_S

    async def _subscribed(self) -> None:
        """Subscribe and hand messages on until the connection fails (a silent network
        partition is not detected here: the backend's waiters poll as well)."""
        handlers = {name.encode(): handler for name, handler in self.channels.items()}
        conn = await self.client.connect()
        stream, reader = conn.stream, conn.reader
        try:
            await stream.send_all(pack(("SUBSCRIBE", *self.channels)))
            unconfirmed = len(handlers)  # one confirmation per channel, then messages
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    raise RedisUnavailable("Redis closed the subscriber connection")
                reader.feed(data)  # type: ignore[arg-type]  # any buffer will do
                while (reply := reader.gets()) is not False:
                    _check(reply, "SUBSCRIBE")
                    if not (isinstance(reply, list) and len(reply) == 3):
                        continue
                    if reply[0] == b"message":
                        handler = handlers.get(reply[1])
                        if handler is not None:
                            handler(reply[2])
                    elif reply[0] == b"subscribe" and unconfirmed:
                        unconfirmed -= 1
                        if not unconfirmed:  # subscribed: whatever came before is lost
                            for handler in handlers.values():
                                handler(None)
        except (OSError, trio.BrokenResourceError, hiredis.ProtocolError) as exc:
            raise RedisUnavailable(f"subscriber: {exc}") from None
        finally:
            with trio.CancelScope(shield=True):
                await trio.aclose_forcefully(stream)
