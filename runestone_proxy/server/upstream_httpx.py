"""The outbound-proxy transport: httpx where ``HTTPS_PROXY``/``HTTP_PROXY`` apply.

The direct h11 pool (:mod:`.upstream`) does not speak to proxies. For an origin that an
outbound proxy covers (and ``NO_PROXY`` does not exempt) the pool hands the request to this
module, which runs it on ``httpx.AsyncClient`` (on trio through anyio) behind the same
``async with ... as resp`` interface, with the same timeouts and the same error mapping.
It is the cold path: httpx is several times slower per request than the h11 pool.

How this works
--------------
One ``httpx.AsyncClient`` per proxy URL, created on first use, with the pool's TLS context,
limits and keep-alive expiry, no default headers (so the bytes sent match the direct
path: no ``accept-encoding``, no ``user-agent``) and ``trust_env=False`` (the pool already
chose the proxy). httpx bounds connecting and writing; trio cancel scopes bound the wait for
the response head and each body chunk, exactly as on the direct path. httpx tunnels
``https://`` origins with ``CONNECT`` and sends ``http://`` requests in absolute form to
the proxy (RFC 9112 §3.2.2). httpx itself only reuses a connection whose response was read
to the end; leaving early closes it.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncGenerator, Mapping
from contextlib import suppress
from types import TracebackType
from typing import cast

import attrs
import httpx
import trio

from runestone_proxy.errors import (
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.gateway.transport import Body, Headers, UpstreamTimeouts
from runestone_proxy.protocol.h1 import FRAMING_HEADERS, WITH_CONTENT
from runestone_proxy.server.upstream_dial import CLOSE_TIMEOUT_S, Origin
from runestone_proxy.server.upstream_response import UpstreamResponse, timed_out


def _env(env: Mapping[str, str], name: str) -> str:
    """Lower-case first, as curl does, then upper-case."""
    return (env.get(name) or env.get(name.upper()) or "").strip()


def proxy_for(scheme: str, host: str, port: int, env: Mapping[str, str]) -> str | None:
    """The proxy URL for an origin, or None to connect directly.

    ``https_proxy`` for https, ``http_proxy`` for http, ``all_proxy`` for either;
    ``no_proxy`` is a comma list of ``*``, host names (matching their subdomains too, with
    or without a leading dot), IP addresses, CIDR blocks, each optionally with ``:port``.
    """
    if _bypass(host, port, _env(env, "no_proxy")):
        return None
    url = _env(env, f"{scheme}_proxy") or _env(env, "all_proxy")
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _bypass(host: str, port: int, no_proxy: str) -> bool:
    host = host.lower().strip("[]")
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
    except ValueError:
        address = None
    for raw in no_proxy.replace(" ", ",").split(","):
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        name, entry_port = entry, ""
        if entry.startswith("["):  # [v6]:port
            name, _, rest = entry[1:].partition("]")
            entry_port = rest.removeprefix(":")
        elif entry.count(":") == 1:
            name, _, entry_port = entry.partition(":")
        if entry_port and entry_port != str(port):
            continue
        if address is not None:
            with suppress(ValueError):
                if address in ipaddress.ip_network(name, strict=False):
                    return True
            continue
        name = name.lstrip(".")
        if host == name or host.endswith(f".{name}"):
            return True
    return False


def _mapped(exc: httpx.HTTPError, origin: str) -> UpstreamError:
    # Never the proxy URL (it may carry credentials), never the request URL's query.
    message = f"upstream {origin} (via proxy): {type(exc).__name__}: {exc}"
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamTimeout(message)
    if isinstance(exc, httpx.ProxyError | httpx.NetworkError):  # connect, read, write, close
        return UpstreamConnectError(message)
    if isinstance(exc, httpx.ProtocolError | httpx.DecodingError):
        return UpstreamProtocolError(message)
    return UpstreamError(message)


@attrs.define(eq=False)
class HttpxResponse(UpstreamResponse):
    _response: httpx.Response = attrs.field(repr=False)
    _chunks: AsyncGenerator[bytes, None] = attrs.field(repr=False)
    _deadline: float = attrs.field(repr=False)
    _timeouts: UpstreamTimeouts = attrs.field(repr=False)
    _done: bool = attrs.field(default=False, repr=False)

    async def receive(self) -> bytes:
        t = self._timeouts
        while not self._done:
            deadline = min(self._deadline, trio.current_time() + t.between_chunks_s)
            with trio.CancelScope(deadline=deadline) as scope:
                try:
                    chunk = await self._chunks.__anext__()
                except StopAsyncIteration:
                    self._done = True
                    return b""
                except httpx.HTTPError as exc:
                    raise _mapped(exc, self.origin) from exc
            if scope.cancelled_caught:
                raise timed_out(self.origin, "no body bytes", t.between_chunks_s, t, self._deadline)
            if chunk:
                return chunk
        return b""

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
            try:
                await self._chunks.aclose()
            finally:
                await self._response.aclose()


@attrs.define(eq=False)
class _ProxiedExchange:
    client: httpx.AsyncClient
    origin: str
    method: str
    url: str
    headers: Headers
    body: Body
    timeouts: UpstreamTimeouts
    _response: HttpxResponse | None = None

    async def __aenter__(self) -> UpstreamResponse:
        t = self.timeouts
        now = trio.current_time()
        deadline = now + t.total_s
        content = self.body if self.body or self.method in WITH_CONTENT else None
        request = self.client.build_request(
            self.method,
            self.url,
            headers=[field for field in self.headers if field[0].lower() not in FRAMING_HEADERS],
            content=content,
            timeout=httpx.Timeout(
                connect=t.connect_s, pool=t.connect_s, write=t.between_chunks_s, read=None
            ),
        )
        # httpx bounds the connect; the head must then follow within first_byte_s.
        with trio.CancelScope(deadline=min(deadline, now + t.connect_s + t.first_byte_s)):
            try:
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _mapped(exc, self.origin) from exc
            headers = [(name.lower(), value) for name, value in response.headers.raw]
            # Raw: the bytes untouched (no content decoding), as on the direct path.
            chunks = cast("AsyncGenerator[bytes, None]", response.aiter_raw())
            self._response = HttpxResponse(
                response.status_code, headers, self.origin, response, chunks, deadline, t
            )
            return self._response
        raise timed_out(self.origin, "no response head", t.connect_s + t.first_byte_s, t, deadline)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._response is not None:
            await self._response.aclose()


@attrs.define(eq=False)
class ProxyTransport:
    """httpx clients keyed by proxy URL; owned and closed by the :class:`UpstreamPool`."""

    ssl_context: ssl.SSLContext = attrs.field(repr=False)
    max_connections: int
    idle_timeout_s: float
    _clients: dict[str, httpx.AsyncClient] = attrs.field(init=False, factory=dict, repr=False)

    def request(
        self,
        origin: Origin,
        method: str,
        url: str,
        headers: Headers,
        body: Body,
        timeouts: UpstreamTimeouts,
    ) -> _ProxiedExchange:
        proxy = origin.proxy
        assert proxy is not None
        client = self._clients.get(proxy)
        if client is None:
            client = self._clients[proxy] = self._new_client(proxy)
        return _ProxiedExchange(client, origin.label, method, url, headers, body, timeouts)

    def _new_client(self, proxy: str) -> httpx.AsyncClient:
        limits = httpx.Limits(
            max_connections=self.max_connections,
            max_keepalive_connections=self.max_connections,
            keepalive_expiry=self.idle_timeout_s,
        )
        client = httpx.AsyncClient(
            proxy=proxy,
            verify=self.ssl_context,
            limits=limits,
            trust_env=False,
            follow_redirects=False,
        )
        client.headers.clear()  # no default Accept-Encoding / User-Agent: match the direct path
        return client

    async def aclose(self) -> None:
        clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
                await client.aclose()
