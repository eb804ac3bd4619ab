"""The proxy ceiling: a bare trio + h11 reverse proxy, nothing else.

Each client connection gets its own keep-alive h11 connection to the upstream (opened on the
first request); every request is forwarded as it came (method, target, body; only ``host``
and the framing are rewritten) and the upstream's status and body go back with
``content-type`` and ``content-length``. No parsing of the JSON, no routing, no limits, no
timeouts, no streaming, no logging: it is what any Trio proxy on h11 must spend per request,
both h11 exchanges and the four socket operations, so the gateway's ``chat_h1`` req/s as a
ratio of this server's says how much the gateway's own work costs on top.

    python -m bench.bare_proxy --port 0 --upstream 127.0.0.1:8001
"""

from __future__ import annotations

import h11
import trio

from bench.serving import MAX_RECV, StreamHandler, next_request, run, server_args


async def _exchange(
    upstream: trio.SocketStream, proto: h11.Connection, request: h11.Request, body: bytes
) -> tuple[int, bytes]:
    """One request to the upstream, on its kept-alive connection; its status and body."""
    headers = [
        (b"host", b"upstream"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    out = proto.send(h11.Request(method=request.method, target=request.target, headers=headers))
    out += proto.send(h11.Data(data=body)) + proto.send(h11.EndOfMessage())
    await upstream.send_all(out)
    status, parts = 0, []
    while True:
        event = proto.next_event()
        if event is h11.NEED_DATA:
            proto.receive_data(await upstream.receive_some(MAX_RECV))
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            parts.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            proto.start_next_cycle()
            return status, b"".join(parts)
        else:
            raise RuntimeError(f"upstream sent {event!r}")


def make_handler(host: str, port: int) -> StreamHandler:
    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        upstream: trio.SocketStream | None = None
        up_proto = h11.Connection(h11.CLIENT)
        try:
            while (got := await next_request(stream, conn)) is not None:
                request, body = got
                if upstream is None:
                    upstream = await trio.open_tcp_stream(host, port)
                status, answer = await _exchange(upstream, up_proto, request, body)
                headers = [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(answer)).encode()),
                ]
                out = conn.send(h11.Response(status_code=status, headers=headers))
                out += conn.send(h11.Data(data=answer)) + conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            if upstream is not None:
                await upstream.aclose()
            await stream.aclose()

    return handle


def main() -> None:
    parser = server_args(__doc__ or "")
    parser.add_argument("--upstream", required=True, help="host:port of the upstream")
    args = parser.parse_args()
    up_host, _, up_port = args.upstream.rpartition(":")
    run(make_handler(up_host, int(up_port)), args.host, args.port)


if __name__ == "__main__":
    main()
