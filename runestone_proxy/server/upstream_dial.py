"""Opening a connection to an upstream origin: where it goes, TCP and TLS, and closing it.

:class:`Origin` is where the upstream pool's connections go (and what errors and logs name);
:func:`dial` opens a TCP stream to it, with TLS (SNI, hostname checks, ALPN held to
HTTP/1.1) for ``https``, mapping refusals and handshake failures to
:class:`~runestone_proxy.errors.UpstreamConnectError`; :func:`close` closes any stream in a
shielded, bounded scope. :class:`~runestone_proxy.server.upstream_h11.H11Connection` puts
h11 on what ``dial`` opened.
"""

from __future__ import annotations

import ssl
from contextlib import suppress
from typing import Final

import attrs
import trio

from runestone_proxy.errors import UpstreamConnectError

CLOSE_TIMEOUT_S: Final = 1.0


@attrs.frozen
class Origin:
    """Where connections go. ``label`` (scheme://host:port) is what errors and logs show."""

    scheme: str
    host: str
    port: int
    host_header: bytes  # RFC 9112 §3.2: uri-host [":" port], the port only when not default
    label: str
    proxy: str | None = attrs.field(default=None, repr=False)

    @classmethod
    def of(cls, scheme: str, host: str, port: int, proxy: str | None = None) -> Origin:
        hostport = f"[{host}]" if ":" in host else host
        default = port == (443 if scheme == "https" else 80)
        host_header = (hostport if default else f"{hostport}:{port}").encode()
        return cls(scheme, host, port, host_header, f"{scheme}://{hostport}:{port}", proxy)


async def dial(
    origin: Origin, ssl_context: ssl.SSLContext, due: float
) -> tuple[trio.abc.Stream, trio.SocketStream] | None:
    """The stream to ``origin`` (TLS over the TCP one for https) and its TCP stream, or None
    when ``due`` (trio time) passed first; the caller names that timeout."""
    label = origin.label
    with trio.CancelScope(deadline=due):
        try:
            tcp = await trio.open_tcp_stream(origin.host, origin.port)  # sets TCP_NODELAY
        except OSError as exc:  # refused, unreachable, DNS (gaierror)
            raise UpstreamConnectError(f"upstream {label}: cannot connect: {exc}") from exc
        stream: trio.abc.Stream = tcp
        try:
            if origin.scheme == "https":
                stream = trio.SSLStream(
                    tcp, ssl_context, server_hostname=origin.host, https_compatible=True
                )
                await stream.do_handshake()
                if stream.selected_alpn_protocol() not in (None, "http/1.1"):
                    raise UpstreamConnectError(f"upstream {label}: ALPN other than http/1.1")
        except trio.BrokenResourceError as exc:
            await close(tcp)
            reason = exc.__cause__ or exc
            raise UpstreamConnectError(f"upstream {label}: TLS failed: {reason}") from exc
        except BaseException:
            await close(tcp)
            raise
        return stream, tcp
    return None


async def close(stream: trio.abc.Stream) -> None:
    """Close in a shielded, bounded scope: safe in ``finally`` and under cancellation."""
    with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
        with suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.aclose()
