"""One load run: what to send (:class:`LoadSpec`), what came back (:class:`LoadResult`), and
the drivers that produce it with ``wrk``, ``h2load`` or our own :mod:`bench.loadgen`.

A Python load generator on one core is about as CPU-bound as the Python server it loads,
so it under-reports the server's ceiling. The compiled tools are preferred when installed
(``apt-get install wrk nghttp2-client``), found with :func:`shutil.which`; every result
names the ``tool`` that produced it. Each driver runs its tool as a subprocess pinned to
``spec.cpu``, first for ``warmup_s`` (discarded), then for ``duration_s`` (measured).

Tool quirks handled here (nghttp2 1.52, wrk 4.1):

* wrk takes whole seconds only, so its durations are rounded up; latency percentiles come
  from a Lua ``done`` hook. wrk counts a status >= 400 as an error ("non_2xx" here; 3xx
  counts as success).
* h2load's ``--warm-up-time`` yields zero requests over h2c, so warm-up is a separate run.
  h2load prints no percentiles, so they come from its ``--log-file`` (one line per request:
  start, status, microseconds).
"""

from __future__ import annotations

import json
import math
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal
from typing import Protocol as TypingProtocol

import attrs

from bench.procs import ROOT, pin_to

Protocol = Literal["h1", "h2"]
Tool = Literal["wrk", "h2load", "python", "streamgen"]
#: Extra seconds a load tool may take past warm-up + duration before it is killed.
SLACK_S = 30.0


@attrs.frozen
class Request:
    """The one request a scenario repeats."""

    method: str = "GET"
    path: str = "/"
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


@attrs.frozen
class LoadSpec:
    host: str
    port: int
    protocol: Protocol
    request: Request
    concurrency: int
    duration_s: float = 5.0
    warmup_s: float = 1.0
    #: CPU to pin the load tool to; None leaves it to the scheduler.
    cpu: int | None = None
    #: The server under load (streamgen samples its RSS).
    server_pid: int | None = None
    #: A tool the scenario needs whatever is installed (streamgen).
    force_tool: Tool | None = None

    @property
    def h2_layout(self) -> tuple[int, int]:
        """(connections, streams per connection) whose product is ``concurrency``: up to four
        connections, as a browser or SDK pool would open, the streams spread evenly."""
        for conns in (4, 3, 2, 1):
            if self.concurrency % conns == 0:
                return conns, self.concurrency // conns
        raise AssertionError("unreachable")

    @property
    def layout(self) -> tuple[int, int]:
        return self.h2_layout if self.protocol == "h2" else (self.concurrency, 1)


@attrs.frozen
class LoadResult:
    tool: str
    protocol: str
    concurrency: int
    connections: int
    streams_per_connection: int
    requests: int
    errors: int
    non_2xx: int
    duration_s: float
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    #: Filled in by the runner from a :class:`bench.procs.CpuMeter` on the target:
    #: the server's CPU seconds, the wall seconds they were measured over, and the CPU
    #: seconds other processes used on the server's core meanwhile.
    server_cpu_s: float | None = None
    server_wall_s: float | None = None
    others_cpu_s: float | None = None
    #: Tool-specific figures (streamgen: TTFC, gaps, stalls, RSS; see bench/streamgen.py).
    extra: dict[str, float | None] | None = None

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoadResult:
        return cls(**data)


class LoadError(RuntimeError):
    """A load tool failed or printed something we could not read."""


class Meter(TypingProtocol):
    """Told when the measured part of a run starts and stops (after warm-up)."""

    def start(self) -> None: ...

    def stop(self) -> None: ...


class _NoMeter:
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass


def percentile(sorted_values: list[int], pct: float) -> int:
    """Nearest-rank percentile of an ascending list (0 for an empty one)."""
    if not sorted_values:
        return 0
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def summarize(
    spec: LoadSpec, tool: str, latencies_us: list[int], errors: int, non_2xx: int, elapsed_s: float
) -> LoadResult:
    """A result from raw per-request latencies (microseconds)."""
    latencies_us.sort()
    conns, streams = spec.layout
    return LoadResult(
        tool=tool,
        protocol=spec.protocol,
        concurrency=spec.concurrency,
        connections=conns,
        streams_per_connection=streams,
        requests=len(latencies_us),
        errors=errors,
        non_2xx=non_2xx,
        duration_s=round(elapsed_s, 3),
        rps=len(latencies_us) / elapsed_s if elapsed_s > 0 else 0.0,
        p50_ms=percentile(latencies_us, 50) / 1000,
        p90_ms=percentile(latencies_us, 90) / 1000,
        p99_ms=percentile(latencies_us, 99) / 1000,
        max_ms=(latencies_us[-1] / 1000) if latencies_us else 0.0,
    )


# --- choosing a tool ----------------------------------------------------------------------


def available_tools() -> dict[str, str | None]:
    """Where each external tool is installed, or None."""
    return {"wrk": shutil.which("wrk"), "h2load": shutil.which("h2load")}


def choose_tool(spec: LoadSpec, prefer: str = "auto") -> Tool:
    """The scenario's own tool if it names one; ``auto``: wrk for HTTP/1.1, h2load for
    HTTP/2 (GET/POST only), else Python."""
    if spec.force_tool is not None:
        return spec.force_tool
    if prefer == "python":
        return "python"
    tools = available_tools()
    if spec.protocol == "h1" and tools["wrk"]:
        return "wrk"
    if spec.protocol == "h2" and tools["h2load"] and spec.request.method in ("GET", "POST"):
        if spec.request.method == "GET" or spec.request.body is not None:
            return "h2load"
    return "python"


def run_load(spec: LoadSpec, prefer: str = "auto", meter: Meter | None = None) -> LoadResult:
    """Warm up, then measure; ``meter`` brackets the measured part only."""
    tool = choose_tool(spec, prefer)
    meter = meter or _NoMeter()
    with tempfile.TemporaryDirectory(prefix="runestone-bench-") as tmp:
        if tool == "wrk":
            return _run_wrk(spec, Path(tmp), meter)
        if tool == "h2load":
            return _run_h2load(spec, Path(tmp), meter)
        if tool == "streamgen":
            return _run_streamgen(spec, Path(tmp), meter)
        return _run_python(spec, Path(tmp), meter)


def _run(argv: list[str], spec: LoadSpec, timeout_s: float) -> str:
    try:
        done = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            preexec_fn=pin_to(spec.cpu),
            cwd=ROOT,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # run() has killed it
        raise LoadError(f"{argv[0]} did not finish within {timeout_s:.0f} s") from exc
    if done.returncode != 0:
        raise LoadError(f"{' '.join(argv)} exited {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def _url(spec: LoadSpec) -> str:
    return f"http://{spec.host}:{spec.port}{spec.request.path}"


def _body_file(spec: LoadSpec, tmp: Path) -> Path | None:
    if spec.request.body is None:
        return None
    path = tmp / "body"
    path.write_bytes(spec.request.body)
    return path


# --- wrk ----------------------------------------------------------------------------------

_WRK_DONE = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RUNESTONE-WRK %.0f %.0f %.0f %.0f %.0f %.0f %.0f %.1f %.1f %.1f %.1f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string with ASCII escapes is a valid Lua string literal


def _wrk_script(spec: LoadSpec, tmp: Path) -> Path:
    lines = [f"wrk.method = {_lua_string(spec.request.method)}"]
    for name, value in spec.request.headers:
        lines.append(f"wrk.headers[{_lua_string(name)}] = {_lua_string(value)}")
    body = _body_file(spec, tmp)
    if body is not None:
        lines.append(f'local f = assert(io.open({_lua_string(str(body))}, "rb"))')
        lines.append('wrk.body = f:read("*a")')
        lines.append("f:close()")
    script = tmp / "bench.lua"
    script.write_text("\n".join(lines) + "\n" + _WRK_DONE)
    return script


def _run_wrk(spec: LoadSpec, tmp: Path, meter: Meter) -> LoadResult:
    script = _wrk_script(spec, tmp)

    def argv(seconds: float) -> list[str]:
        secs = max(1, math.ceil(seconds))
        c = str(spec.concurrency)
        return ["wrk", "-t", "1", "-c", c, "-d", f"{secs}s", "--timeout", "10s", "-s", str(script)]

    if spec.warmup_s > 0:
        _run([*argv(spec.warmup_s), _url(spec)], spec, spec.warmup_s + SLACK_S)
    meter.start()
    out = _run([*argv(spec.duration_s), _url(spec)], spec, spec.duration_s + SLACK_S)
    meter.stop()
    return parse_wrk(out, spec)


def parse_wrk(output: str, spec: LoadSpec) -> LoadResult:
    for line in output.splitlines():
        if line.startswith("RUNESTONE-WRK "):
            f = [float(x) for x in line.split()[1:]]
            requests, duration_us, connect, read, write, status, timeout = f[:7]
            p50, p90, p99, top = f[7:]
            elapsed = duration_us / 1e6
            return LoadResult(
                tool="wrk",
                protocol=spec.protocol,
                concurrency=spec.concurrency,
                connections=spec.concurrency,
                streams_per_connection=1,
                requests=int(requests),
                errors=int(connect + read + write + timeout),
                non_2xx=int(status),
                duration_s=round(elapsed, 3),
                rps=requests / elapsed if elapsed > 0 else 0.0,
                p50_ms=p50 / 1000,
                p90_ms=p90 / 1000,
                p99_ms=p99 / 1000,
                max_ms=top / 1000,
            )
    raise LoadError(f"no RUNESTONE-WRK line in wrk output:\n{output[-2000:]}")


# --- h2load -------------------------------------------------------------------------------


def _h2load_argv(spec: LoadSpec, seconds: float, tmp: Path, log: Path | None) -> list[str]:
    conns, streams = spec.h2_layout
    argv = ["h2load", "-t", "1", "-c", str(conns), "-m", str(streams)]
    argv += ["-D", f"{max(1, round(seconds * 1000))}ms"]
    for name, value in spec.request.headers:
        argv += ["-H", f"{name}: {value}"]
    body = _body_file(spec, tmp)
    if body is not None:
        argv += ["-d", str(body)]
    if log is not None:
        argv += ["--log-file", str(log)]
    return [*argv, _url(spec)]


def _run_h2load(spec: LoadSpec, tmp: Path, meter: Meter) -> LoadResult:
    if spec.warmup_s > 0:
        _run(_h2load_argv(spec, spec.warmup_s, tmp, None), spec, spec.warmup_s + SLACK_S)
    log = tmp / "h2load.log"
    meter.start()
    out = _run(_h2load_argv(spec, spec.duration_s, tmp, log), spec, spec.duration_s + SLACK_S)
    meter.stop()
    return parse_h2load(out, log.read_text() if log.exists() else "", spec)


def parse_h2load(output: str, log: str, spec: LoadSpec) -> LoadResult:
    """Counts and elapsed time from the summary; latencies and statuses from the log file."""
    elapsed = errored = timeouts = None
    for line in output.splitlines():
        if line.startswith("finished in "):
            value = line.removeprefix("finished in ").split(",")[0].strip()
            elapsed = _h2load_seconds(value)
        elif line.startswith("requests: "):
            counts = {word: int(n) for n, word, *_ in (p.split() for p in line[10:].split(","))}
            errored, timeouts = counts["errored"], counts["timeout"]
    if elapsed is None or errored is None or timeouts is None:
        raise LoadError(f"could not read h2load's summary:\n{output[-2000:]}")
    latencies: list[int] = []
    non_2xx = 0
    for row in log.splitlines():
        _start, status, micros = row.split("\t")[:3]
        latencies.append(int(micros))
        if not status.startswith("2"):
            non_2xx += 1
    return summarize(spec, "h2load", latencies, errored + timeouts, non_2xx, elapsed)


def _h2load_seconds(text: str) -> float:
    for unit, scale in (("ms", 1e-3), ("us", 1e-6), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    raise LoadError(f"unknown h2load duration {text!r}")


# --- our own generator --------------------------------------------------------------------


def _run_python(spec: LoadSpec, tmp: Path, meter: Meter) -> LoadResult:
    """Warm-up and measurement are two runs of bench.loadgen, as with the other tools."""
    argv = [sys.executable, "-m", "bench.loadgen", "--host", spec.host, "--port", str(spec.port)]
    argv += ["--protocol", spec.protocol, "--concurrency", str(spec.concurrency)]
    argv += ["--method", spec.request.method, "--path", spec.request.path, "--warmup", "0"]
    for name, value in spec.request.headers:
        argv += ["--header", f"{name}: {value}"]
    body = _body_file(spec, tmp)
    if body is not None:
        argv += ["--body-file", str(body)]
    if spec.warmup_s > 0:
        _run([*argv, "--duration", str(spec.warmup_s)], spec, spec.warmup_s + SLACK_S)
    meter.start()
    out = _run([*argv, "--duration", str(spec.duration_s)], spec, spec.duration_s + SLACK_S)
    meter.stop()
    try:
        return LoadResult.from_dict(json.loads(out.strip().splitlines()[-1]))
    except (ValueError, IndexError, TypeError) as exc:
        raise LoadError(f"bench.loadgen printed no result:\n{out[-2000:]}") from exc


# --- streamgen ----------------------------------------------------------------------------

#: Seconds streamgen may spend opening its connections before it starts (its own bound).
STREAMGEN_CONNECT_S = 30.0


def _run_streamgen(spec: LoadSpec, tmp: Path, meter: Meter) -> LoadResult:
    """One bench.streamgen process does warm-up and measurement; ``@start`` / ``@stop`` on
    its stdout bracket the measured window, so the meter sees only that."""
    argv = [sys.executable, "-m", "bench.streamgen", "--host", spec.host, "--port", str(spec.port)]
    argv += ["--streams", str(spec.concurrency), "--duration", str(spec.duration_s)]
    argv += ["--warmup", str(spec.warmup_s), "--method", spec.request.method]
    argv += ["--path", spec.request.path]
    if spec.server_pid is not None:
        argv += ["--pid", str(spec.server_pid)]
    for name, value in spec.request.headers:
        argv += ["--header", f"{name}: {value}"]
    body = _body_file(spec, tmp)
    if body is not None:
        argv += ["--body-file", str(body)]
    budget = STREAMGEN_CONNECT_S + max(spec.warmup_s, 2.0) + spec.duration_s + SLACK_S
    deadline = time.monotonic() + budget
    err_path = tmp / "streamgen.err"
    with err_path.open("wb") as err:
        proc = subprocess.Popen(
            argv,
            stdout=subprocess.PIPE,
            stderr=err,
            stdin=subprocess.DEVNULL,
            preexec_fn=pin_to(spec.cpu),
            cwd=ROOT,
        )
    assert proc.stdout is not None
    last = ""
    try:
        fd = proc.stdout.fileno()
        pending = b""
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise LoadError(f"bench.streamgen did not finish within {budget:.0f} s")
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in (x.decode().strip() for x in lines):
                if line == "@start":
                    meter.start()
                elif line == "@stop":
                    meter.stop()
                elif line:
                    last = line
        if proc.wait(timeout=10) != 0:
            stderr = err_path.read_text(errors="replace")
            raise LoadError(f"bench.streamgen exited {proc.returncode}: {stderr[-2000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        proc.stdout.close()
    try:
        return LoadResult.from_dict(json.loads(last))
    except (ValueError, TypeError) as exc:
        raise LoadError(f"bench.streamgen printed no result: {last[-2000:]!r}") from exc
