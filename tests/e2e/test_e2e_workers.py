"""``server.workers`` > 1: one supervisor, N gateway workers behind one port, as real
processes (``python -m runestone_proxy``), with a real redis-server for ``[state]``.

What is checked: READY=1 reaches the service manager's NOTIFY_SOCKET once, when every worker
is ready; every worker takes connections on the one port; ``/metrics`` and ``/health``
answer for all workers; SIGHUP reaches every worker (RELOADING=1 ... READY=1 up); SIGTERM
drains all (an in-flight request completes) and the supervisor exits 0; a worker SIGKILLed
while jobs run is restarted and no acknowledged (202) job is lost, with two drainers on one
SQLite queue never claiming a job twice; a worker that cannot start stops the service with
its status; a dead supervisor's workers drain and exit; socket activation hands systemd's
socket through to the workers.

Test rules: 127.0.0.1, port 0 (ports come from the ``supervisor.ready`` log line); waits are
for log lines, datagrams and exits, under ``trio.fail_after``; where nothing can be awaited
(a job's status, a request being in flight) a bounded loop polls the gateway's API.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio
from helpers import HOST, NotifyReceiver, RawClient, child_env, request
from tenancy_fakes import TenancyFake
from workers_helpers import pidfd_exit, redis_server, supervisor_process, write_config

#: A hang guard, not a speed check: N interpreters start at once on a 2-core machine.
TIMEOUT_S = 60
POLL_S = 0.02
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}


async def answered_by(port: int) -> int:
    """Which worker answered ``/health`` on a fresh connection."""
    async with await RawClient.connect(port) as client:
        response = await client.exchange(request("GET", "/health", {"connection": "close"}))
    assert response.status == 200, response.body
    slot: int = response.json()["components"]["workers"]["answered_by"]
    return slot


def sample(metrics_text: str, series: str) -> float:
    for line in metrics_text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in /metrics")


@pytest.mark.parametrize("workers", [2, 3])
async def test_workers_behind_one_port(workers: int, tmp_path: Path) -> None:
    """Ready once all are; every worker serves; metrics and health for the whole gateway;
    SIGHUP reaches all; SIGTERM drains all and exits 0."""
    notify = NotifyReceiver(tmp_path / "notify.sock")
    async with redis_server(tmp_path) as redis_url, notify:
        config = write_config(tmp_path / "config.toml", workers=workers, redis_url=redis_url)
        env = {"NOTIFY_SOCKET": str(notify.path)}
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config, env, ready=False) as sup:
                first = await notify.next()
                # READY=1 went up only now: /health (which asks every worker) sees all ready.
                assert first["READY"] == "1"
                record = await sup.wait_for_log("supervisor.ready")
                port, health_port = record["port"], record["health_port"]
                assert sup.count("supervisor.worker.ready") == workers
                view = (await _get_json(port, "/health"))["components"]["workers"]
                assert (view["count"], view["ready"], view["status"]) == (workers, workers, "ok")
                assert sorted(int(w["pid"]) for w in view["workers"].values()) == sorted(
                    record["pids"]
                )

                # Every worker takes connections on the one port. Connections go in bursts
                # of 16 at once: one at a time, the kernel may keep waking the same worker.
                seen: set[int] = set()
                asked = 0

                async def ask() -> None:
                    seen.add(await answered_by(port))

                while seen != set(range(workers)):
                    assert asked < 400, f"only workers {seen} answered"
                    async with trio.open_nursery() as burst:
                        for _ in range(16):
                            burst.start_soon(ask)
                    asked += 16

                # /metrics sums every worker: each request above was answered 200 once.
                async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
                    for _ in range(10):
                        assert (await http.get("/v1/models")).status_code == 200
                    asked += 10 + 1  # and the /health above
                    text = (await http.get(f"http://{HOST}:{health_port}/metrics")).text
                assert sample(text, 'runestone_workers{state="scraped"}') == workers
                assert sample(text, 'runestone_http_requests_total{status="200"}') == asked
                assert text.count("# TYPE runestone_http_requests_total counter") == 1

                # SIGHUP: every worker reloads the changed file; RELOADING=1 ... READY=1 up.
                config.write_text(config.read_text() + '\n[aliases]\nfresh = "mock-1"\n')
                sup.send_signal(signal.SIGHUP)
                assert (await notify.next())["RELOADING"] == "1"
                assert (await notify.next())["READY"] == "1"
                # Each worker logged its reload before it told the supervisor (the pipe that
                # carries the lines may lag the datagram).
                await sup.wait_for_count("config.reloaded", workers)
                reloaded = {r["worker"] for r in sup.records if r.get("event") == "config.reloaded"}
                assert reloaded == set(range(workers))
                async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}") as http:
                    for _ in range(2 * workers):
                        chat = {**CHAT, "model": "fresh"}
                        fresh = await http.post(
                            "/v1/chat/completions", json=chat, headers={"connection": "close"}
                        )
                        assert fresh.status_code == 200, fresh.text

                # SIGTERM with a request in flight: it completes, every worker stops, exit 0.
                async with trio.open_nursery() as nursery:
                    answers: list[int] = []
                    nursery.start_soon(_slow_request, port, answers)
                    await _until_in_flight(health_port)
                    sup.send_signal(signal.SIGTERM)
                    assert (await notify.next())["STOPPING"] == "1"
                assert answers == [200]
                assert await sup.wait() == 0
                assert sup.count("gateway.stopped") == workers
                assert sup.count("supervisor.worker.stopped", exit_code=0) == workers


async def _get_json(port: int, target: str) -> dict[str, object]:
    async with httpx.AsyncClient() as http:
        response = await http.get(f"http://{HOST}:{port}{target}")
        result: dict[str, object] = response.json()
        return result


async def _slow_request(port: int, answers: list[int]) -> None:
    async with httpx.AsyncClient(base_url=f"http://{HOST}:{port}", timeout=20) as http:
        slow = await http.post("/v1/chat/completions", json={**CHAT, "model": "hold-1"})
        answers.append(slow.status_code)


async def _until_in_flight(health_port: int) -> None:
    """Until some worker has the slow request upstream (bounded by the caller)."""
    series = 'runestone_provider_in_flight{provider="slow"}'
    async with httpx.AsyncClient() as http:
        while True:
            text = (await http.get(f"http://{HOST}:{health_port}/metrics")).text
            if sample(text, series) == 1:
                return
            await trio.sleep(POLL_S)


async def test_a_killed_worker_is_restarted_and_loses_no_acknowledged_job(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Two workers, one slot each, queue on limit: a burst gets mostly 202s; SIGKILL one
    worker while jobs run; it comes back and every acknowledged job succeeds, each claimed
    once (twice at most for the one the dead worker held)."""
    async with redis_server(tmp_path) as redis_url:
        config = write_config(
            tmp_path / "config.toml",
            workers=2,
            redis_url=redis_url,
            max_concurrent=1,
            on_limit="queue",
            latency_ms=150.0,
        )
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config) as sup:
                base = f"http://{HOST}:{sup.port}"
                limits = httpx.Limits(max_keepalive_connections=0)
                async with httpx.AsyncClient(base_url=base, timeout=20, limits=limits) as http:
                    answers: list[httpx.Response] = []

                    async def one(i: int) -> None:
                        rid = f"req-workers-{i}"
                        answers.append(
                            await http.post(
                                "/v1/chat/completions", json=CHAT, headers={"x-request-id": rid}
                            )
                        )

                    async with trio.open_nursery() as burst:
                        for i in range(24):
                            burst.start_soon(one, i)
                    assert {a.status_code for a in answers} <= {200, 202}
                    jobs = [a.json()["job_id"] for a in answers if a.status_code == 202]
                    assert len(jobs) >= 10

                    async def status(job_id: str) -> str:
                        value: str = (await http.get(f"/v1/jobs/{job_id}")).json()["status"]
                        return value

                    while "running" not in {await status(j) for j in jobs[:4]}:
                        await trio.sleep(POLL_S)
                    victim = sup.pids[0]
                    os.kill(victim, signal.SIGKILL)
                    await sup.wait_for_count("supervisor.worker.exited", 1, signal="SIGKILL")
                    await sup.wait_for_count("supervisor.worker.ready", 3)

                    pending = set(jobs)
                    while pending:
                        statuses = {j: await status(j) for j in sorted(pending)}
                        assert set(statuses.values()) <= {"queued", "running", "succeeded"}
                        pending = {j for j, s in statuses.items() if s != "succeeded"}
                        if pending:
                            await trio.sleep(0.05)
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
    exited = [r for r in sup.records if r.get("event") == "supervisor.worker.exited"]
    assert [(r["pid"], r["signal"]) for r in exited] == [(victim, "SIGKILL")]
    conn = sqlite3.connect(tmp_path / "jobs.sqlite3")
    try:
        rows = conn.execute("SELECT id, status, attempts FROM jobs").fetchall()
    finally:
        conn.close()
    assert {r[0] for r in rows} == set(jobs)
    assert {r[1] for r in rows} == {"succeeded"}
    # Claimed once each, across two drainers on one SQLite file, but for the dead worker's
    # claims, taken again once their leases expired: its running job (one slot: at most
    # one) and the job its drainer had claimed and was waiting to get a slot for (a drainer
    # holds at most one such claim; the slot is on Redis, so another worker may have it).
    assert sum(r[2] for r in rows) - len(rows) <= 2


async def test_a_worker_that_cannot_start_stops_the_service(tmp_path: Path) -> None:
    """A bad aliases file fails each worker at start (exit 2): no restart loop, the
    supervisor stops the others and exits 2 itself."""
    bad = tmp_path / "aliases.toml"
    bad.write_text("this is = = not toml")
    async with redis_server(tmp_path) as redis_url:
        config = write_config(tmp_path / "config.toml", workers=2, redis_url=redis_url)
        env = {"RUNESTONE_ALIASES_PATH": str(bad)}
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config, env, ready=False) as sup:
                assert await sup.wait() == 2
    assert sup.count("supervisor.giving_up") == 1
    assert sup.count("supervisor.ready") == 0
    assert sup.count("supervisor.worker.started") == 2


async def test_workers_drain_when_the_supervisor_dies(tmp_path: Path) -> None:
    """SIGKILL to the supervisor: its workers read EOF on their lifeline and exit."""
    async with redis_server(tmp_path) as redis_url:
        config = write_config(tmp_path / "config.toml", workers=2, redis_url=redis_url)
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config) as sup:
                fds = [pidfd_exit(pid) for pid in sup.pids]
                sup.process.kill()
                await sup.wait()
                for fd in fds:
                    if fd is not None:
                        await trio.lowlevel.wait_readable(fd)
                        os.close(fd)
                await sup.wait_for_count("gateway.stopped", 2)
    assert sup.count("worker.supervisor_gone") == 2


# --- socket activation ----------------------------------------------------------------------

#: What systemd does between fork and exec, then exec (the pid stays): socket at fd 3.
_ACTIVATE = """
import os, sys
os.dup2(int(os.environ.pop("TEST_SOCKET_FD")), 3)
os.environ["LISTEN_PID"] = str(os.getpid())
os.execv(sys.executable, [sys.executable, "-m", "runestone_proxy", *sys.argv[1:]])
"""


async def test_socket_activation_reaches_the_workers(tmp_path: Path) -> None:
    """systemd's socket (fd 3, LISTEN_FDNAMES=main) is the one the workers accept on."""
    async with redis_server(tmp_path) as redis_url:
        config = write_config(tmp_path / "config.toml", workers=2, redis_url=redis_url)
        with socket.create_server((HOST, 0)) as listening, trio.fail_after(TIMEOUT_S):
            port = listening.getsockname()[1]
            env = child_env(
                {
                    "TEST_SOCKET_FD": str(listening.fileno()),
                    "LISTEN_FDS": "1",
                    "LISTEN_FDNAMES": "main",
                }
            )
            process = await trio.lowlevel.open_process(
                [sys.executable, "-c", _ACTIVATE, "--config", str(config)],
                env=env,
                pass_fds=[listening.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            assert process.stderr is not None
            log = b""
            try:
                while b"supervisor.ready" not in log:
                    data = await process.stderr.receive_some(65536)
                    assert data, log.decode()
                    log += data
                ready = json.loads(
                    next(line for line in log.splitlines() if b"supervisor.ready" in line)
                )
                assert ready["port"] == port
                listening.close()  # only the supervisor and its workers hold it now
                assert await answered_by(port) in (0, 1)
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
            finally:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
                await process.stderr.aclose()


async def test_the_watchdog_replaces_a_wedged_worker(tmp_path: Path) -> None:
    """WatchdogSec= covers the workers: one that stops pinging (SIGSTOP) is killed and
    restarted, and the service's WATCHDOG=1 pings go on once it is back."""
    notify = NotifyReceiver(tmp_path / "notify.sock")
    async with redis_server(tmp_path) as redis_url, notify:
        config = write_config(tmp_path / "config.toml", workers=2, redis_url=redis_url)
        env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "1000000"}
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config, env) as sup:
                while "READY" not in await notify.next():
                    pass
                wedged = sup.pids[0]
                os.kill(wedged, signal.SIGSTOP)
                await sup.wait_for_count("supervisor.worker.watchdog", 1, pid=wedged)
                await sup.wait_for_count("supervisor.worker.exited", 1, pid=wedged)
                await sup.wait_for_count("supervisor.worker.ready", 3)
                while "WATCHDOG" not in await notify.next():
                    pass
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
    exited = next(r for r in sup.records if r.get("event") == "supervisor.worker.exited")
    assert exited["signal"] == "SIGKILL"  # a stopped process keeps SIGABRT pending


# --- limits across workers (the Redis state backend) ----------------------------------------

_TENANCY_PROVIDER = """
[[providers]]
name = "tenancy"
kind = "openai"
base_url = "{base_url}"
api_key_env = "TENANCY_UPSTREAM_KEY"

[[models]]
id = "t-hold"
provider = "tenancy"
"""


async def test_tenant_concurrency_is_exact_across_workers(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """max_concurrent = 2, two workers, a burst of 12 held streams over fresh connections:
    the fake upstream never sees more than 2 of the tenant's calls at once."""
    fake = TenancyFake()
    await nursery.start(fake.serve)
    async with redis_server(tmp_path) as redis_url:
        config = write_config(
            tmp_path / "config.toml",
            workers=2,
            redis_url=redis_url,
            max_concurrent=2,
            extra=_TENANCY_PROVIDER.format(base_url=fake.base_url),
        )
        env = {"TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789"}
        with trio.fail_after(TIMEOUT_S):
            async with supervisor_process(config, env) as sup:
                limits = httpx.Limits(max_keepalive_connections=0)
                base = f"http://{HOST}:{sup.port}"
                statuses: list[int] = []
                body = {
                    "model": "t-hold",
                    "messages": CHAT["messages"],
                    "stream": True,
                    "user": "default",
                }
                async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:

                    async def one() -> None:
                        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                            statuses.append(r.status_code)
                            await r.aread()

                    async with trio.open_nursery() as burst:
                        for _ in range(12):
                            burst.start_soon(one)
                        for left in range(12, 0, -1):
                            want = min(2, left)
                            await fake.wait_until(lambda want=want: len(fake.held) >= want)  # type: ignore[misc]
                            assert fake.peak["default"] <= 2
                            fake.release_oldest()
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
    assert statuses == [200] * 12
    assert fake.peak["default"] == 2
