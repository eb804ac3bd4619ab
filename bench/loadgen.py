"""Our own load generator, in trio: the fallback when ``wrk`` / ``h2load`` are missing.

* HTTP/1.1: ``concurrency`` keep-alive connections, each a loop of one request and one
  response. Requests are pre-encoded bytes; responses are parsed by hand (status line,
  ``content-length`` or chunked body, ``connection: close``), which is several times cheaper
  than a general client. A closed connection is reopened.
* HTTP/2 (prior knowledge, h2c): a few connections (:attr:`LoadSpec.h2_layout`), each with
  one reader task and ``streams`` worker tasks that each keep one stream in flight; writes
  to a connection are serialised by a lock.

Latency is ``perf_counter_ns`` from just before a request is written to when its response
has been read whole. Only requests that complete inside the measured window count (warm-up
first, then ``duration``); errors and non-2xx statuses are counted, not hidden. It prints
one JSON :class:`bench.load.LoadResult` line on stdout.

    python -m bench.loadgen --port 8000 --protocol h2 --concurrency 64 --path /health/live
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import attrs
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import trio

from bench.load import LoadSpec, Request, summarize

RECV = 65536
RECONNECT_PAUSE_S = 0.01
#: How long streams in flight at a graceful GOAWAY may take before they are abandoned.
DRAIN_GRACE_S = 1.0
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)


class ResponseError(Exception):
    """The peer sent something this minimal parser cannot read, or reset the stream."""


@attrs.define
class Recorder:
    start_ns: int
    end_ns: int
    latencies_us: list[int] = attrs.Factory(list)
    errors: int = 0
    non_2xx: int = 0

    def ok(self, t0: int, status: int) -> None:
        now = time.perf_counter_ns()
        if self.start_ns <= now <= self.end_ns:
            self.latencies_us.append((now - t0) // 1000)
            if not 200 <= status < 300:
                self.non_2xx += 1

    def error(self) -> None:
        if self.start_ns <= time.perf_counter_ns() <= self.end_ns:
            self.errors += 1


# --- HTTP/1.1 -----------------------------------------------------------------------------


def encode_h1(spec: LoadSpec) -> bytes:
    req = spec.request
    lines = [f"{req.method} {req.path} HTTP/1.1", f"host: {spec.host}:{spec.port}"]
    lines += [f"{name}: {value}" for name, value in req.headers]
    if req.body is not None:
        lines.append(f"content-length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (req.body or b"")


@attrs.define
class H1Reader:
    """Reads responses off one connection; keeps bytes that arrived early in ``buf``."""

    stream: trio.SocketStream
    buf: bytearray = attrs.Factory(bytearray)

    async def _fill(self) -> None:
        data = await self.stream.receive_some(RECV)
        if not data:
            raise EOFError
        self.buf += data

    async def _take(self, n: int) -> None:
        while len(self.buf) < n:
            await self._fill()
        del self.buf[:n]

    async def _line(self) -> bytes:
        while (end := self.buf.find(b"\r\n")) < 0:
            await self._fill()
        line = bytes(self.buf[:end])
        del self.buf[: end + 2]
        return line

    async def response(self) -> tuple[int, bool]:
        """Read one whole response; return (status, keep_alive)."""
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                await self._fill()
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            try:
                status = int(head[9:12])
            except ValueError:
                raise ResponseError(f"bad status line {head[:40]!r}") from None
            if status >= 200:
                break  # 1xx: informational, another head follows
        keep_alive = b"\r\nconnection: close" not in head
        if b"\r\ntransfer-encoding: chunked" in head:
            await self._chunked()
        elif (at := head.find(b"\r\ncontent-length:")) >= 0:
            eol = head.find(b"\r\n", at + 2)  # -1: it was the last header line
            await self._take(int(head[at + 17 : eol if eol > 0 else None]))
        elif status not in (204, 304):
            while True:  # delimited by EOF (RFC 9112 §6.3 rule 8)
                try:
                    await self._fill()
                except EOFError:
                    break
            self.buf.clear()
            keep_alive = False
        return status, keep_alive

    async def _chunked(self) -> None:
        while True:
            size = int((await self._line()).split(b";")[0], 16)
            if size == 0:
                while await self._line():  # trailer fields, then the empty line
                    pass
                return
            await self._take(size + 2)


async def h1_worker(spec: LoadSpec, raw: bytes, rec: Recorder) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream(spec.host, spec.port)
        except OSError:
            rec.error()
            await trio.sleep(RECONNECT_PAUSE_S)
            continue
        reader = H1Reader(stream)
        try:
            keep_alive = True
            while keep_alive:
                t0 = time.perf_counter_ns()
                await stream.send_all(raw)
                status, keep_alive = await reader.response()
                rec.ok(t0, status)
        except (*NETWORK_ERRORS, ResponseError, ValueError):
            rec.error()
            await trio.sleep(RECONNECT_PAUSE_S)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


# --- HTTP/2 -------------------------------------------------------------------------------


@attrs.define(eq=False)
class Pending:
    done: trio.Event = attrs.Factory(trio.Event)
    status: int = 0
    failed: bool = False
    #: Refused by GOAWAY unprocessed (RFC 9113 §6.8): safe to retry on a new connection.
    refused: bool = False


@attrs.define(eq=False)
class H2Client:
    stream: trio.SocketStream
    conn: h2.connection.H2Connection
    headers: list[tuple[bytes, bytes]]
    body: bytes | None
    pending: dict[int, Pending] = attrs.Factory(dict)
    write_lock: trio.Lock = attrs.Factory(trio.Lock)
    #: Set by a graceful GOAWAY: finish what is in flight, start nothing new.
    draining: bool = False
    #: The stream workers' scope, given a deadline when the connection starts draining.
    workers_scope: trio.CancelScope | None = None

    @classmethod
    def for_spec(cls, stream: trio.SocketStream, spec: LoadSpec) -> H2Client:
        config = h2.config.H2Configuration(client_side=True, header_encoding=None)
        req = spec.request
        headers = [
            (b":method", req.method.encode()),
            (b":scheme", b"http"),
            (b":authority", f"{spec.host}:{spec.port}".encode()),
            (b":path", req.path.encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in req.headers]
        if req.body is not None:
            headers.append((b"content-length", str(len(req.body)).encode()))
        return cls(stream, h2.connection.H2Connection(config), headers, req.body)

    async def flush(self) -> None:
        async with self.write_lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def read_loop(self) -> None:
        """The connection's one reader: wakes the stream that each event belongs to."""
        try:
            while True:
                data = await self.stream.receive_some(RECV)
                if not data:
                    if self.draining and not self.pending:
                        return
                    raise EOFError
                for event in self.conn.receive_data(data):
                    self._on_event(event)
                await self.flush()  # window updates, SETTINGS and PING acks
        finally:
            for pending in self.pending.values():
                pending.failed = True
                pending.done.set()

    def _on_event(self, event: h2.events.Event) -> None:
        if isinstance(event, h2.events.ResponseReceived):
            if (p := self.pending.get(event.stream_id)) is not None:
                p.status = int(dict(event.headers)[b":status"])
        elif isinstance(event, h2.events.DataReceived):
            self.conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
        elif isinstance(event, h2.events.StreamEnded):
            if (p := self.pending.pop(event.stream_id, None)) is not None:
                p.done.set()
        elif isinstance(event, h2.events.StreamReset):
            if (p := self.pending.pop(event.stream_id, None)) is not None:
                p.failed = True
                p.done.set()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # A server may retire a connection (hypercorn does after 1,000 requests):
            # streams above last_stream_id were never processed and are retried elsewhere.
            if event.error_code != 0:
                raise EOFError(f"GOAWAY {event.error_code!r}")
            self.draining = True
            if self.workers_scope is not None:
                self.workers_scope.deadline = trio.current_time() + DRAIN_GRACE_S
            last = event.last_stream_id or 0
            for sid in [sid for sid in self.pending if sid > last]:
                refused = self.pending.pop(sid)
                refused.refused = True
                refused.done.set()

    async def request(self) -> int | None:
        """One request on a new stream: its status, or None if the stream was refused."""
        sid = self.conn.get_next_available_stream_id()
        pending = self.pending[sid] = Pending()
        self.conn.send_headers(sid, self.headers, end_stream=self.body is None)
        if self.body is not None:  # bodies are small: assume they fit the initial window
            size = self.conn.max_outbound_frame_size
            for at in range(0, len(self.body), size):
                last = at + size >= len(self.body)
                self.conn.send_data(sid, self.body[at : at + size], end_stream=last)
        await self.flush()
        await pending.done.wait()
        if pending.refused:
            return None
        if pending.failed:
            raise ResponseError(f"stream {sid} reset or connection lost")
        return pending.status


async def h2_stream_worker(client: H2Client, rec: Recorder) -> None:
    while not client.draining:
        t0 = time.perf_counter_ns()
        status = await client.request()
        if status is not None:
            rec.ok(t0, status)


async def h2_connection(spec: LoadSpec, streams: int, rec: Recorder) -> None:
    while True:
        try:
            stream = await trio.open_tcp_stream(spec.host, spec.port)
        except OSError:
            rec.error()
            await trio.sleep(RECONNECT_PAUSE_S)
            continue
        client = H2Client.for_spec(stream, spec)
        try:
            client.conn.initiate_connection()
            await client.flush()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.read_loop)
                async with trio.open_nursery() as workers:
                    client.workers_scope = workers.cancel_scope
                    for _ in range(streams):
                        workers.start_soon(h2_stream_worker, client, rec)
                for _ in client.pending:  # accepted before GOAWAY, never answered
                    rec.error()
                nursery.cancel_scope.cancel()  # the workers are done: the connection drained
        except* (*NETWORK_ERRORS, ResponseError, h2.exceptions.ProtocolError):
            rec.error()
            await trio.sleep(RECONNECT_PAUSE_S)
        finally:
            with trio.CancelScope(shield=True):
                await stream.aclose()


# --- driver -------------------------------------------------------------------------------


async def generate(spec: LoadSpec) -> dict[str, object]:
    start = time.perf_counter_ns() + int(spec.warmup_s * 1e9)
    rec = Recorder(start, start + int(spec.duration_s * 1e9))
    with trio.move_on_after(spec.warmup_s + spec.duration_s):
        async with trio.open_nursery() as nursery:
            if spec.protocol == "h1":
                raw = encode_h1(spec)
                for _ in range(spec.concurrency):
                    nursery.start_soon(h1_worker, spec, raw, rec)
            else:
                conns, streams = spec.h2_layout
                for _ in range(conns):
                    nursery.start_soon(h2_connection, spec, streams, rec)
    result = summarize(spec, "python", rec.latencies_us, rec.errors, rec.non_2xx, spec.duration_s)
    return result.to_dict()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--protocol", choices=("h1", "h2"), default="h1")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/")
    parser.add_argument("--header", action="append", default=[], help="'name: value'")
    parser.add_argument("--body-file", type=Path)
    args = parser.parse_args()
    headers = tuple((n.strip(), v.strip()) for n, _, v in (h.partition(":") for h in args.header))
    body = args.body_file.read_bytes() if args.body_file else None
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        protocol=args.protocol,
        request=Request(args.method, args.path, headers, body),
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    print(json.dumps(trio.run(generate, spec)))


if __name__ == "__main__":
    main()
