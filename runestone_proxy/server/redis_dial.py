"""Where Redis is and how to reach it: the URL, a TCP or TLS stream, and the request/reply
exchange of a connection's handshake, before :mod:`.redis_conn` shares it (and of the
subscriber's ``SUBSCRIBE``). Used by :mod:`.redis_client`."""

from __future__ import annotations

import ssl
from urllib.parse import unquote, urlsplit

import attrs
import hiredis
import trio

from runestone_proxy.server.redis_conn import RedisUnavailable, Reply

__all__ = ["RedisURL", "exchange", "open_stream"]


@attrs.frozen
class RedisURL:
    """``redis://[[user]:password@]host[:port][/db]`` or ``rediss://`` (TLS)."""

    host: str
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = attrs.field(default=None, repr=False)
    tls: bool = False

    @classmethod
    def parse(cls, url: str) -> RedisURL:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("not a redis:// or rediss:// URL")
        path = parts.path.strip("/")
        try:
            db = int(path) if path else 0
            port = parts.port or 6379
        except ValueError:
            raise ValueError("the port and the db (the path) must be numbers") from None
        return cls(
            host=parts.hostname or "127.0.0.1",
            port=port,
            db=db,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password is not None else None,
            tls=parts.scheme == "rediss",
        )

    def __str__(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


async def open_stream(url: RedisURL, ssl_context: ssl.SSLContext | None) -> trio.abc.Stream:
    try:
        stream: trio.abc.Stream = await trio.open_tcp_stream(url.host, url.port)
    except OSError as exc:
        raise RedisUnavailable(f"cannot connect to {url}: {exc}") from None
    if not url.tls:
        return stream
    assert ssl_context is not None
    tls = trio.SSLStream(stream, ssl_context, server_hostname=url.host)
    try:
        await tls.do_handshake()
    except BaseException as exc:
        with trio.CancelScope(shield=True):
            await trio.aclose_forcefully(stream)
        if isinstance(exc, (OSError, trio.BrokenResourceError, ssl.SSLError)):
            raise RedisUnavailable(f"TLS with {url} failed: {exc}") from None
        raise
    return tls


async def exchange(
    stream: trio.abc.Stream, reader: hiredis.Reader, commands: list[bytes]
) -> list[Reply]:
    """Send ``commands`` and read their replies (before the connection is shared)."""
    try:
        await stream.send_all(b"".join(commands))
        replies: list[Reply] = []
        while len(replies) < len(commands):
            data = await stream.receive_some(65536)
            if not data:
                raise RedisUnavailable("Redis closed the connection during the handshake")
            reader.feed(data)  # type: ignore[arg-type]  # any buffer will do
            while (reply := reader.gets()) is not False:
                replies.append(reply)
        return replies
    except (OSError, trio.BrokenResourceError, ssl.SSLError) as exc:
        raise RedisUnavailable(f"handshake failed: {exc}") from None
