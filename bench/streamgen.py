"""Many long-lived SSE streams at once, in trio: time to first chunk, gaps, stalls, RSS.

``streams`` keep-alive HTTP/1.1 connections each run one streamed request after another, so
``streams`` streams are in flight at every moment once the ramp is over. The first request
on connection ``i`` starts ``i / streams * ramp`` seconds into the run, which spreads the
starts (and so the first chunks) evenly instead of firing them all in one burst.

For each stream it records:

* **TTFC**, time to first chunk: from just before the request is written to the arrival of
  the first body bytes that hold a ``data:`` event;
* **gaps** between successive arrivals of ``data:`` bytes; a gap longer than ``--stall-ms``
  (200) is a **stall**;
* a **failure**: a connect or read error, a non-200 status, or a body that ends without
  ``data: [DONE]`` (the connection is then reopened).

Only what happens inside the measured window counts (warm-up first: connections are opened
and the ramp runs during it). With ``--pid`` it samples that process's ``VmRSS`` from
``/proc/<pid>/status``: before any connection is opened, with all of them open and idle,
and at the peak during the loaded run, so ``(peak - before) / streams`` is the memory each
active stream costs the server (connection included).

The generator watches itself too: its own CPU% over the window and how late its event loop
wakes up (``lag``: a task sleeping 10 ms measures its oversleep). A CPU% near 100 or a lag
p99 of tens of milliseconds means the generator, not the server, set the numbers; measure
the direct baseline (the upstream alone) with the same generator to see its ceiling.

Protocol with the runner: ``@start`` and ``@stop`` lines on stdout bracket the measured
window (the runner meters the server's CPU between them), then one JSON line: a
:class:`bench.load.LoadResult` whose latency columns are TTFC and whose ``extra`` holds the
rest. Raises ``RLIMIT_NOFILE`` to its hard limit first.

    python -m bench.streamgen --port 8000 --streams 1000 --body-file body.json --pid 1234
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import attrs
import trio

from bench.load import LoadSpec, Request, percentile, summarize

RECV = 65536
RECONNECT_PAUSE_S = 0.05
#: Connections being opened at once (a burst of 1,000 SYNs overflows a listen backlog).
CONNECT_PARALLEL = 64
RSS_EVERY_S = 0.05
LAG_TICK_S = 0.01
NETWORK_ERRORS = (OSError, trio.BrokenResourceError, trio.ClosedResourceError, EOFError)


class StreamFailed(Exception):
    pass


def raise_nofile() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return soft


def rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


@attrs.define
class Stats:
    """Everything the workers record; ``measuring`` gates what counts."""

    measuring: bool = False
    ttfc_us: list[int] = attrs.Factory(list)
    gaps_us: list[int] = attrs.Factory(list)
    max_gap_us: int = 0
    stalls: int = 0
    failures: int = 0
    non_200: int = 0
    completed: int = 0
    #: Streams whose end arrived inside the window, wherever they started.
    ended: int = 0
    chunks: int = 0
    connected: int = 0
    active: int = 0
    active_samples: list[int] = attrs.Factory(list)
    lag_us: list[int] = attrs.Factory(list)
    rss_peak_kb: int = 0


@attrs.define
class Conn:
    """One keep-alive connection; bytes that arrived early stay in ``buf``."""

    stream: trio.SocketStream
    buf: bytearray = attrs.Factory(bytearray)

    async def fill(self) -> None:
        data = await self.stream.receive_some(RECV)
        if not data:
            raise EOFError
        self.buf += data

    async def head(self) -> tuple[int, bool, int | None]:
        """(status, chunked, content-length) of the next response head."""
        while True:
            while (end := self.buf.find(b"\r\n\r\n")) < 0:
                await self.fill()
            head = bytes(self.buf[:end]).lower()
            del self.buf[: end + 4]
            status = int(head[9:12])
            if status >= 200:
                break
        if b"\r\nconnection: close" in head:
            raise StreamFailed("server closes the connection")
        chunked = b"\r\ntransfer-encoding: chunked" in head
        length = None
        if (at := head.find(b"\r\ncontent-length:")) >= 0:
            eol = head.find(b"\r\n", at + 2)
            length = int(head[at + 17 : eol if eol > 0 else None])
        return status, chunked, length


@attrs.define
class Chunked:
    """An incremental chunked-transfer decoder that consumes what it can from a buffer."""

    state: str = "size"
    left: int = 0

    def feed(self, buf: bytearray) -> tuple[bytes, bool]:
        """Take whole framing and data from ``buf``; return (data, body finished)."""
        parts: list[bytes] = []
        while True:
            if self.state == "size":
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                size = int(bytes(buf[:eol]).split(b";")[0], 16)
                del buf[: eol + 2]
                self.state, self.left = ("trailer", 0) if size == 0 else ("data", size)
            elif self.state == "data":
                take = min(self.left, len(buf))
                if not take:
                    break
                parts.append(bytes(buf[:take]))
                del buf[:take]
                self.left -= take
                if self.left:
                    break
                self.state = "crlf"
            elif self.state == "crlf":
                if len(buf) < 2:
                    break
                del buf[:2]
                self.state = "size"
            else:  # trailer fields, up to an empty line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    break
                del buf[: eol + 2]
                if eol == 0:
                    return b"".join(parts), True
        return b"".join(parts), False


async def one_stream(conn: Conn, raw: bytes, stats: Stats, stall_us: int) -> None:
    """Send one streamed request and read its response whole, timing the data events."""
    # A time to first chunk counts if the stream started inside the window: one sent during
    # the warm-up (the ramp, connections still being opened) would charge its wait to it.
    started_inside = stats.measuring
    t0 = time.perf_counter_ns()
    await conn.stream.send_all(raw)
    status, chunked, length = await conn.head()
    if status != 200:
        if stats.measuring:
            stats.non_200 += 1
        raise StreamFailed(f"status {status}")
    if not chunked and length is None:
        raise StreamFailed("neither chunked nor content-length")
    measured = stats.measuring
    decoder = Chunked()
    remaining = length or 0
    buf = conn.buf
    last = 0
    events = 0
    saw_done = False
    while True:
        if chunked:
            payload, done = decoder.feed(buf)
        else:
            payload = bytes(buf[:remaining])
            del buf[:remaining]
            remaining -= len(payload)
            done = remaining == 0
        if payload and (n := payload.count(b"data:")):
            now = time.perf_counter_ns()
            if events == 0:
                if started_inside:
                    stats.ttfc_us.append((now - t0) // 1000)
            elif measured:
                gap = (now - last) // 1000
                stats.gaps_us.append(gap)
                stats.max_gap_us = max(stats.max_gap_us, gap)
                if gap > stall_us:
                    stats.stalls += 1
            last = now
            events += n
            if stats.measuring:
                stats.chunks += n  # every data event that arrives inside the window
            saw_done = saw_done or b"[DONE]" in payload
        if done:
            break
        await conn.fill()
    if not saw_done:
        raise StreamFailed("the stream ended without data: [DONE]")
    if stats.measuring:
        stats.ended += 1
        if measured:
            stats.completed += 1


async def worker(
    host: str,
    port: int,
    raw: bytes,
    stats: Stats,
    stall_us: int,
    delay_s: float,
    opening: trio.Semaphore,
    go: trio.Event,
) -> None:
    """Open a connection, wait for ``go`` and the ramp delay, then stream back to back."""
    conn: Conn | None = None
    first = True
    while True:
        if conn is None:
            try:
                async with opening:
                    conn = Conn(await trio.open_tcp_stream(host, port))
            except OSError:
                if stats.measuring:
                    stats.failures += 1
                await trio.sleep(RECONNECT_PAUSE_S)
                continue
        if first:
            first = False
            stats.connected += 1
            await go.wait()
            await trio.sleep(delay_s)
        stats.active += 1
        try:
            await one_stream(conn, raw, stats, stall_us)
        except (*NETWORK_ERRORS, StreamFailed, ValueError):
            if stats.measuring:
                stats.failures += 1
            with trio.CancelScope(shield=True):
                await conn.stream.aclose()
            conn = None
            await trio.sleep(RECONNECT_PAUSE_S)
        finally:
            stats.active -= 1


async def watch_lag(stats: Stats) -> None:
    while True:
        t0 = time.perf_counter_ns()
        await trio.sleep(LAG_TICK_S)
        late = (time.perf_counter_ns() - t0) // 1000 - int(LAG_TICK_S * 1e6)
        if stats.measuring:
            stats.lag_us.append(max(0, late))


async def watch_rss(stats: Stats, pid: int | None) -> None:
    while True:
        if pid is not None and (kb := rss_kb(pid)) is not None:
            stats.rss_peak_kb = max(stats.rss_peak_kb, kb)
        if stats.measuring:
            stats.active_samples.append(stats.active)
        await trio.sleep(RSS_EVERY_S)


def encode(spec: LoadSpec) -> bytes:
    req = spec.request
    lines = [f"{req.method} {req.path} HTTP/1.1", f"host: {spec.host}:{spec.port}"]
    lines += [f"{name}: {value}" for name, value in req.headers]
    if req.body is not None:
        lines.append(f"content-length: {len(req.body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (req.body or b"")


def mark(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


async def generate(
    spec: LoadSpec, pid: int | None, ramp_s: float, stall_ms: float
) -> dict[str, object]:
    stats = Stats()
    raw = encode(spec)
    rss_before = rss_kb(pid) if pid is not None else None
    opening = trio.Semaphore(CONNECT_PARALLEL)
    go = trio.Event()
    stall_us = int(stall_ms * 1000)
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_lag, stats)
        nursery.start_soon(watch_rss, stats, pid)
        for i in range(spec.concurrency):
            delay = ramp_s * i / spec.concurrency
            nursery.start_soon(
                worker, spec.host, spec.port, raw, stats, stall_us, delay, opening, go
            )
        # Let every connection open (within a bound), note the idle RSS, then start.
        with trio.move_on_after(30.0):
            while stats.connected < spec.concurrency:
                await trio.sleep(0.02)
        connect_s = time.monotonic() - started
        await trio.sleep(0.2)
        rss_idle = rss_kb(pid) if pid is not None else None
        stats.rss_peak_kb = 0
        go.set()
        # Warm-up: at least the ramp plus one second, so the window sees a steady state.
        await trio.sleep(max(spec.warmup_s, ramp_s + 1.0))
        cpu0 = time.process_time()
        t0 = time.monotonic()
        mark("@start")
        stats.measuring = True
        await trio.sleep(spec.duration_s)
        stats.measuring = False
        mark("@stop")
        elapsed = time.monotonic() - t0
        gen_cpu = time.process_time() - cpu0
        nursery.cancel_scope.cancel()
    lag = sorted(stats.lag_us)
    gaps = sorted(stats.gaps_us)
    result = summarize(spec, "streamgen", stats.ttfc_us, stats.failures, stats.non_200, elapsed)
    result = attrs.evolve(result, requests=stats.completed, rps=stats.completed / elapsed)
    extra: dict[str, float | None] = {
        "streams": spec.concurrency,
        "completed": stats.completed,
        "ended": stats.ended,
        "chunks": stats.chunks,
        "chunks_per_s": stats.chunks / elapsed,
        "ttfc_measured": len(stats.ttfc_us),
        "gap_p50_ms": percentile(gaps, 50) / 1000,
        "gap_p99_ms": percentile(gaps, 99) / 1000,
        "gap_max_ms": stats.max_gap_us / 1000,
        "stalls": stats.stalls,
        "failures": stats.failures,
        "active_mean": (
            sum(stats.active_samples) / len(stats.active_samples) if stats.active_samples else 0
        ),
        "rss_before_kb": rss_before,
        "rss_idle_kb": rss_idle,
        "rss_peak_kb": stats.rss_peak_kb or None,
        "kb_per_stream": (
            (stats.rss_peak_kb - rss_before) / spec.concurrency
            if rss_before is not None and stats.rss_peak_kb
            else None
        ),
        "gen_cpu_pct": 100 * gen_cpu / elapsed,
        "gen_lag_p50_ms": percentile(lag, 50) / 1000,
        "gen_lag_p99_ms": percentile(lag, 99) / 1000,
        "connected": stats.connected,
        "connect_s": connect_s,
    }
    return {**result.to_dict(), "extra": extra}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--ramp", type=float, default=1.0, help="spread the first starts (s)")
    parser.add_argument("--stall-ms", type=float, default=200.0)
    parser.add_argument("--pid", type=int, help="server whose VmRSS to sample")
    parser.add_argument("--method", default="POST")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--header", action="append", default=[], help="'name: value'")
    parser.add_argument("--body-file", type=Path)
    args = parser.parse_args()
    nofile = raise_nofile()
    if nofile < args.streams + 64:
        parser.error(f"RLIMIT_NOFILE is {nofile}: too low for {args.streams} streams")
    headers = tuple((n.strip(), v.strip()) for n, _, v in (h.partition(":") for h in args.header))
    body = args.body_file.read_bytes() if args.body_file else None
    spec = LoadSpec(
        host=args.host,
        port=args.port,
        protocol="h1",
        request=Request(args.method, args.path, headers, body),
        concurrency=args.streams,
        duration_s=args.duration,
        warmup_s=args.warmup,
    )
    print(json.dumps(trio.run(generate, spec, args.pid, args.ramp, args.stall_ms)), flush=True)


if __name__ == "__main__":
    main()
