"""The ceiling: a bare trio + h11 keep-alive server, nothing else.

Every request, whatever its method and path, gets ``200`` with a tiny JSON body. There is
no routing, no logging, no timeouts and no per-request task: one task per connection runs
h11's read / respond / ``start_next_cycle`` loop. The gateway's listener does strictly more
work than this, so its req/s as a ratio of this server's (same machine, same core, same
load tool, same run) says how much our own code costs.

    python -m bench.baseline --port 0     # prints the chosen port, then serves
"""

from __future__ import annotations

import h11
import trio

from bench.serving import run, server_args

BODY = b'{"status":"ok"}'
HEADERS = [
    ("content-type", "application/json"),
    ("content-length", str(len(BODY))),
]
MAX_RECV = 65536


async def handle(stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER)
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(MAX_RECV)
                conn.receive_data(data)  # b"" marks EOF; h11 then reports ConnectionClosed
                continue
            if isinstance(event, h11.Request | h11.Data):
                continue  # the body (if any) is read and dropped
            if isinstance(event, h11.EndOfMessage):
                out = conn.send(h11.Response(status_code=200, headers=HEADERS))
                out += conn.send(h11.Data(data=BODY))
                out += conn.send(h11.EndOfMessage())
                await stream.send_all(out)
                if conn.our_state is not h11.DONE:
                    return  # the client asked to close
                conn.start_next_cycle()
                continue
            return  # ConnectionClosed or PAUSED without a next request
    except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    finally:
        await stream.aclose()


def main() -> None:
    args = server_args(__doc__ or "").parse_args()
    run(handle, args.host, args.port)


if __name__ == "__main__":
    main()
