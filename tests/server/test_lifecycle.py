"""The process lifecycle: readiness, the drain, signals, SIGHUP reload and sd_notify.

Test rules: the drain's fine detail (an in-flight stream finishes, idle keep-alives close,
the grace period cancels what is left) is tested in-process, where a test route can stream on
cue and ``begin_drain()`` stands in for SIGTERM; the signal plumbing is tested on a real child
process (``helpers.gateway_process``: port 0, learnt from the ``gateway.ready`` log line). Every
wait is for an event, a log line, a datagram or an exit, under ``trio.fail_after``.
"""

from __future__ import annotations

import gc
import json
import signal
import socket
from pathlib import Path

import pytest
import trio
import trio.testing
from helpers import (
    HOST,
    NotifyReceiver,
    RawClient,
    cli,
    gateway_process,
    get,
    make_config,
    request,
)

from runestone_proxy.api.dispatch import Phase
from runestone_proxy.api.http import SSE_HEADERS, Request, Responder
from runestone_proxy.config import Config
from runestone_proxy.server.app import App

TIMEOUT_S = 10
#: A hang guard, not a speed check: a child interpreter starts slowly on a loaded machine.
CHILD_TIMEOUT_S = 30
LIVE = request("GET", "/health/live")


def drain_config(grace_s: float) -> Config:
    # Readiness is read on the health port: the main port stops accepting when draining.
    return make_config(server={"health_port": 0, "shutdown_grace_s": grace_s})


# --- the drain, in-process ------------------------------------------------------------------


async def test_drain_finishes_an_in_flight_stream() -> None:
    go = trio.Event()

    async def stream(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        await responder.send(b"data: one\n\n")
        await go.wait()
        await responder.send(b"data: two\n\n")

    app = App.build(drain_config(grace_s=30), None, env={})
    app.gateway.router.add("GET", "/stream", stream)
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(app.run)
            assert bound.health_port is not None
            assert (await get(bound.health_port, "/health/ready")).status == 200

            streaming = await RawClient.connect(bound.port)
            await streaming.send(request("GET", "/stream"))
            assert (await streaming.read_head()).status == 200
            assert await streaming.read_chunk() == b"data: one\n\n"
            idle = await RawClient.connect(bound.port)
            assert (await idle.exchange(LIVE)).status == 200

            await app.begin_drain()
            await trio.testing.wait_all_tasks_blocked()

            ready = await get(bound.health_port, "/health/ready")
            assert (ready.status, ready.json()) == (503, {"status": "draining"})
            live = await get(bound.health_port, "/health/live")
            assert live.status == 200
            # The idle keep-alive connection is closed at once, not after the grace period.
            assert await idle.read_eof() == b""
            # The listening socket is closed: new connections are refused.
            with pytest.raises(OSError, match="all attempts to connect"):
                await trio.open_tcp_stream(HOST, bound.port)

            # The stream is still being served, and ends normally; then the connection closes.
            go.set()
            assert await streaming.read_chunk() == b"data: two\n\n"
            assert await streaming.read_chunk() == b""
            assert await streaming.read_eof() == b""
            await streaming.aclose()
            await idle.aclose()
        # app.run returned by itself: nothing was left to cancel.
    assert app.gateway.phase is Phase.DRAINING
    assert app.gateway.open_connections == 0


async def test_drain_closes_a_request_arriving_on_a_kept_alive_connection() -> None:
    app = App.build(drain_config(grace_s=30), None, env={})
    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(app.run)
            async with await RawClient.connect(bound.port) as client:
                assert (await client.exchange(LIVE)).status == 200
                head = request("GET", "/health/live")
                await client.send(head[:10])  # a request has begun when the drain starts
                await trio.testing.wait_all_tasks_blocked()
                await app.begin_drain()
                await client.send(head[10:])
                response = await client.read_response()
                assert await client.read_eof() == b""
    assert response.status == 200
    assert response.header("connection") == "close"


async def test_drain_cancels_what_outlives_the_grace_period(
    autojump_clock: trio.testing.MockClock,
) -> None:
    started, cancelled = trio.Event(), trio.Event()

    async def forever(_request: Request, responder: Responder) -> None:
        await responder.start(200, SSE_HEADERS)
        started.set()
        try:
            await trio.sleep_forever()
        finally:
            cancelled.set()

    app = App.build(drain_config(grace_s=5), None, env={})
    app.store.inline = True  # no worker thread for the autojump clock to leap over
    app.gateway.router.add("GET", "/forever", forever)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            bound = await nursery.start(app.run)
            async with await RawClient.connect(bound.port) as client:
                await client.send(request("GET", "/forever"))
                await started.wait()
                began = trio.current_time()
                await app.begin_drain()
                await cancelled.wait()
                cancelled_after = trio.current_time() - began
                assert (await client.read_head()).status == 200
                await client.read_eof()
    assert 5 <= cancelled_after < 6


async def test_sd_notify_in_process(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    app = App.build(drain_config(grace_s=30), None, env={"NOTIFY_SOCKET": str(path)})
    with trio.fail_after(TIMEOUT_S):
        async with NotifyReceiver(path) as manager, trio.open_nursery() as nursery:
            bound = await nursery.start(app.run)
            ready = await manager.next()
            await app.begin_drain()
            stopping = await manager.next()
    assert ready == {"READY": "1", "STATUS": f"listening on port {bound.port}"}
    assert stopping == {"STOPPING": "1"}
    gc.collect()  # an unclosed notify socket would warn here (and fail: warnings are errors)


# --- signals, on a child process ------------------------------------------------------------


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.toml"
    path.write_text('[logging]\nlevel = "info"\naccess_log = false\n')
    return path


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["TERM", "INT"])
async def test_signal_on_an_idle_gateway_exits_0(config_file: Path, signum: int) -> None:
    with trio.fail_after(CHILD_TIMEOUT_S):
        async with gateway_process(config_file) as gateway:
            assert (await get(gateway.port, "/health/ready")).status == 200
            gateway.send_signal(signum)
            assert await gateway.wait() == 0
            await gateway.wait_for_log("gateway.stopped")
    events = gateway.events()
    assert events.index("gateway.shutdown") < events.index("gateway.draining")
    assert events.index("gateway.draining") < events.index("gateway.stopped")


async def test_sigterm_drains_an_in_flight_stream(tmp_path: Path) -> None:
    # The built-in mock provider, paced: ten chunks 200 ms apart keep a stream in flight.
    path = tmp_path / "config.toml"
    path.write_text(
        "[server]\nhealth_port = 0\nshutdown_grace_s = 30\n"
        '[[providers]]\nname = "mock"\nkind = "mock"\nchunk_count = 10\n'
        "chunk_interval_ms = 200\n"
        '[[models]]\nid = "mock-1"\nprovider = "mock"\ncapabilities = ["chat", "streaming"]\n'
    )
    body = json.dumps(
        {"model": "mock-1", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    chat = request("POST", "/v1/chat/completions", {"content-type": "application/json"}, body)
    with trio.fail_after(CHILD_TIMEOUT_S):
        async with gateway_process(path) as gateway:
            assert gateway.health_port is not None
            async with await RawClient.connect(gateway.port) as client:
                await client.send(chat)
                head = await client.read_head()
                chunks = [await client.read_chunk()]
                gateway.send_signal(signal.SIGTERM)
                await gateway.wait_for_log("gateway.draining")
                ready = await get(gateway.health_port, "/health/ready")
                while chunk := await client.read_chunk():
                    chunks.append(chunk)
                assert await client.read_eof() == b""
            assert await gateway.wait() == 0
    assert head.status == 200
    assert (ready.status, ready.json()) == (503, {"status": "draining"})
    assert b"".join(chunks).endswith(b"data: [DONE]\n\n")
    events = gateway.events()
    streamed = next(
        i
        for i, r in enumerate(gateway.records)
        if r.get("event") == "http.access" and r["path"] == "/v1/chat/completions"
    )
    # The stream's access line comes after the drain began: it was in flight, and finished.
    assert events.index("gateway.draining") < streamed < events.index("gateway.stopped")
    assert gateway.records[streamed]["status"] == 200
    assert "gateway.drain.cancelled" not in events


async def test_sighup_with_a_broken_config_keeps_serving(config_file: Path) -> None:
    with trio.fail_after(CHILD_TIMEOUT_S):
        async with gateway_process(config_file) as gateway:
            config_file.write_text("[server]\nprot = 1\n")
            gateway.send_signal(signal.SIGHUP)
            failed = await gateway.wait_for_log("config.reload.failed")
            assert (await get(gateway.port, "/health/live")).status == 200
            assert (await get(gateway.port, "/health/ready")).status == 200
            gateway.send_signal(signal.SIGTERM)
            assert await gateway.wait() == 0
    assert failed["level"] == "error"
    assert failed["source"] == str(config_file)
    assert any("$.server.prot" in message for message in failed["errors"])
    assert "config.reloaded" not in gateway.events()


async def test_sighup_with_a_valid_config_applies_it(config_file: Path) -> None:
    def tagged(tag: str) -> bytes:
        return request("GET", "/health/live", {"x-request-id": tag})

    with trio.fail_after(CHILD_TIMEOUT_S):
        async with gateway_process(config_file) as gateway:
            async with await RawClient.connect(gateway.port) as client:
                # The access line of "before" is decided by the time "pad" is answered.
                assert (await client.exchange(tagged("before"))).status == 200
                assert (await client.exchange(tagged("pad"))).status == 200
            config_file.write_text(
                '[server]\nbacklog = 16\n[logging]\nlevel = "info"\naccess_log = true\n'
            )
            gateway.send_signal(signal.SIGHUP)
            await gateway.wait_for_log("config.reloaded")
            async with await RawClient.connect(gateway.port) as client:
                assert (await client.exchange(tagged("after"))).status == 200
            access = await gateway.wait_for_log("http.access")
            gateway.send_signal(signal.SIGTERM)
            assert await gateway.wait() == 0
    logged = [r["request_id"] for r in gateway.records if r.get("event") == "http.access"]
    assert "before" not in logged
    assert "after" in logged
    assert access["path"] == "/health/live"
    restart = [r for r in gateway.records if r.get("event") == "config.reload.needs_restart"]
    assert [r["setting"] for r in restart] == ["server.backlog"]


async def test_sighup_applies_a_new_log_level(config_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with trio.fail_after(CHILD_TIMEOUT_S):
        async with NotifyReceiver(path) as manager:
            async with gateway_process(config_file, {"NOTIFY_SOCKET": str(path)}) as gateway:
                assert (await manager.next())["READY"] == "1"
                config_file.write_text('[logging]\nlevel = "warning"\naccess_log = true\n')
                gateway.send_signal(signal.SIGHUP)
                assert (await manager.next())["RELOADING"] == "1"
                assert (await manager.next())["READY"] == "1"
                assert (await get(gateway.port, "/health/live")).status == 200
                # An error line is a fence: every line before it has been read once it is.
                config_file.write_text("[logging]\nlevel = 1\n")
                gateway.send_signal(signal.SIGHUP)
                await gateway.wait_for_log("config.reload.failed")
                gateway.send_signal(signal.SIGTERM)
                assert await gateway.wait() == 0
    # At "warning", the info lines of the reload and of the request are not written.
    assert "config.reloaded" not in gateway.events()
    assert "http.access" not in gateway.events()


async def test_sd_notify_ready_reloading_stopping(config_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with trio.fail_after(CHILD_TIMEOUT_S):
        async with NotifyReceiver(path) as manager:
            async with gateway_process(config_file, {"NOTIFY_SOCKET": str(path)}) as gateway:
                ready = await manager.next()
                gateway.send_signal(signal.SIGHUP)
                reloading = await manager.next()
                reloaded = await manager.next()
                gateway.send_signal(signal.SIGTERM)
                stopping = await manager.next()
                assert await gateway.wait() == 0
    assert ready["READY"] == "1"
    assert ready["STATUS"] == f"listening on port {gateway.port}"
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) > 0
    assert reloaded["READY"] == "1"
    assert stopping == {"STOPPING": "1"}


async def test_a_taken_port_exits_1(config_file: Path) -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen()
        result = await trio.to_thread.run_sync(
            lambda: cli("--config", str(config_file), env={"PORT": str(taken.getsockname()[1])})
        )
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
