"""The Trio Redis client against a real redis-server (tests/redis_server.py).

Test rules: 127.0.0.1 only, redis on a free port in tmp_path; waits are for the client's
own state callbacks or replies, bounded by ``fail_after``; the few loops that wait for a
restarted server are bounded too.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
import trustme
from redis_server import RedisServer, redis_server

from runestone_proxy.server.redis_client import (
    RedisClient,
    RedisError,
    RedisUnavailable,
    Script,
    Subscriber,
    command_prefix,
)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


class Watched:
    """A client plus an event per state change, to await reconnects instead of sleeping."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self.changed = trio.Event()
        client.on_state = self._on_state

    def _on_state(self, up: bool) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def until(self, up: bool) -> None:
        with trio.fail_after(10):
            while self.client.up != up:
                await self.changed.wait()


async def started(
    nursery: trio.Nursery, url: str, *, timeout_s: float = 0.5, **kw: object
) -> Watched:
    client = RedisClient.from_url(url, timeout_s, **kw)  # type: ignore[arg-type]
    watched = Watched(client)
    await nursery.start(client.run)
    return watched


@pytest.fixture
async def client(redis: RedisServer, nursery: trio.Nursery) -> RedisClient:
    watched = await started(nursery, redis.url)
    await watched.until(True)
    return watched.client


async def test_commands_and_a_pipeline_in_order(client: RedisClient) -> None:
    assert await client.call("SET", "k", "v") == b"OK"
    assert await client.call("GET", "k") == b"v"
    replies = await client.pipeline([("INCR", "n")] * 100 + [("GET", "n")])
    assert replies[:100] == list(range(1, 101))
    assert replies[100] == b"100"
    assert await client.pipeline([("DEL", "n")]) == [1]


async def test_many_tasks_share_the_connection(client: RedisClient) -> None:
    seen: list[int] = []

    async def incr() -> None:
        seen.append(await client.call("INCR", "shared"))

    async with trio.open_nursery() as nursery:
        for _ in range(300):
            nursery.start_soon(incr)
    assert sorted(seen) == list(range(1, 301))
    await client.call("DEL", "shared")


async def test_error_replies_are_values_and_fire_and_forget(client: RedisClient) -> None:
    await client.call("SET", "str", "x")
    reply = await client.call("INCR", "str")
    assert "not an integer" in str(reply)
    assert client.send("SET", "ff", "1")
    assert await client.call("GET", "ff") == b"1"  # same connection: in order


async def test_evalsha_survives_a_script_flush(redis: RedisServer, nursery: trio.Nursery) -> None:
    watched = await started(nursery, redis.url)
    client = watched.client
    script = client.register(Script("return tonumber(ARGV[1]) + 1"))
    await watched.until(True)
    assert await client.evalsha(script, [], [41]) == 42
    assert await client.call("SCRIPT", "FLUSH") == b"OK"
    assert await client.evalsha(script, [], [1]) == 2  # NOSCRIPT -> EVAL
    assert await client.call("SCRIPT", "EXISTS", script.sha) == [1]
    with pytest.raises(RedisError):
        await client.evalsha(client.register(Script("return redis.call('NOPE')")), [], [])


async def test_pre_encoded_scripts_survive_a_script_flush(
    redis: RedisServer, nursery: trio.Nursery
) -> None:
    """A pre-encoded EVALSHA answered NOSCRIPT: awaited, it is recovered (scripts loaded
    again, run again); fire-and-forget, it is resent by the connection."""
    watched = await started(nursery, redis.url)
    client = watched.client
    script = client.register(Script("redis.call('INCRBY', KEYS[1], ARGV[1]) return 7"))
    await watched.until(True)  # registered after the connect: not loaded yet
    head = command_prefix(5, ("EVALSHA", script.sha, 1, "encoded-n"))
    payload = head + b"$1\r\n2\r\n"
    assert await client.recover_encoded(await client.call_encoded(payload), payload) == 7
    assert await client.call_encoded(payload) == 7
    assert await client.call("SCRIPT", "FLUSH") == b"OK"
    reply = await client.call_encoded(payload)
    assert str(reply).startswith("NOSCRIPT")  # not run: returned as it is
    assert await client.recover_encoded(reply, payload) == 7
    assert await client.call("SCRIPT", "FLUSH") == b"OK"
    assert client.send_encoded(payload)  # NOSCRIPT: loaded again and resent
    assert await client.call("PING") == b"PONG"
    assert await client.call("PING") == b"PONG"  # behind the resend
    assert await client.call("GET", "encoded-n") == b"8"
    with pytest.raises(RedisError):
        await client.recover_encoded(await client.call("NOPE"), payload)


async def test_a_cancelled_callers_reply_goes_to_its_orphan_handler(client: RedisClient) -> None:
    conn = client.conn
    assert conn is not None
    orphaned: list[object] = []
    with trio.CancelScope() as scope:
        slot = conn.submit(b"*1\r\n$4\r\nPING\r\n", orphan=orphaned.append)
        scope.cancel()
        await conn.wait(slot)
    assert await client.call("PING") == b"PONG"
    assert orphaned == [b"PONG"]


async def test_auth_and_db_from_the_url(tmp_path: Path, nursery: trio.Nursery) -> None:
    with redis_server(tmp_path, password="s3cret") as server:
        watched = await started(nursery, server.url.replace("/0", "/3"))
        await watched.until(True)
        await watched.client.call("SET", "in-db-3", "yes")
        assert server.command("GET", "in-db-3") is None  # db 0
        assert server.command("EXISTS", "in-db-3") == 0
        bad = RedisClient.from_url(server.url.replace("s3cret", "wrong"), 0.5)
        with pytest.raises(RedisUnavailable, match="refused the handshake"):
            await bad.connect()
        nopass = RedisClient.from_url(server.url.replace(":s3cret@", ""), 0.5)
        nopass.register(Script("return 1"))
        with pytest.raises(RedisUnavailable, match="NOAUTH"):
            await nopass.connect()


async def test_a_stalled_server_times_out_and_a_dead_one_fails_fast(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    with redis_server(tmp_path) as server:
        watched = await started(nursery, server.url, timeout_s=0.3)
        client = watched.client
        await watched.until(True)
        server.stop_signal(signal.SIGSTOP)
        try:
            t0 = trio.current_time()
            with pytest.raises(RedisUnavailable, match="no reply within"):
                await client.call("PING")
            assert 0.3 <= trio.current_time() - t0 < 1.5
        finally:
            server.stop_signal(signal.SIGCONT)
        await watched.until(True)  # reconnected once it answers again
        assert await client.call("PING") == b"PONG"
        server.kill()
        await watched.until(False)
        t0 = trio.current_time()
        with pytest.raises(RedisUnavailable):
            await client.call("PING")
        assert trio.current_time() - t0 < 0.05  # no wait while it is down
        server.start(server.port)
        await watched.until(True)
        assert await client.call("PING") == b"PONG"


async def test_rediss_with_a_ca_file(tmp_path: Path, nursery: trio.Nursery) -> None:
    with redis_server(tmp_path, tls=trustme.CA()) as server:
        watched = await started(nursery, server.url, ca_file=server.ca_file)
        await watched.until(True)
        assert await watched.client.call("PING") == b"PONG"
        untrusted = RedisClient.from_url(server.url, 0.5)
        with pytest.raises(RedisUnavailable):
            await untrusted.connect()


async def test_the_subscriber_hands_messages_on(client: RedisClient, nursery: trio.Nursery) -> None:
    got: list[bytes | None] = []
    arrived = trio.Event()

    def on_message(payload: bytes | None) -> None:
        got.append(payload)
        arrived.set()

    await nursery.start(Subscriber(client, {"chan": on_message}).run)
    with trio.fail_after(5):
        await arrived.wait()  # None: subscribed
        while b"hello" not in got:
            await client.call("PUBLISH", "chan", "hello")
            await trio.sleep(0.01)
    assert got[0] is None


async def test_one_subscriber_connection_serves_every_channel(
    client: RedisClient, nursery: trio.Nursery
) -> None:
    got: dict[str, list[bytes | None]] = {"one": [], "two": []}
    both = trio.Event()

    def on(channel: str) -> Callable[[bytes | None], None]:
        def on_message(payload: bytes | None) -> None:
            got[channel].append(payload)
            if all(got.values()):
                both.set()

        return on_message

    await nursery.start(Subscriber(client, {"one": on("one"), "two": on("two")}).run)
    with trio.fail_after(5):
        await both.wait()  # each told once it is subscribed: None
        while b"b" not in got["two"] or b"a" not in got["one"]:
            await client.call("PUBLISH", "one", "a")
            await client.call("PUBLISH", "two", "b")
            await trio.sleep(0.01)
    assert got["one"][0] is None
    assert got["two"][0] is None
    assert set(got["one"][1:]) == {b"a"}
    assert set(got["two"][1:]) == {b"b"}


async def test_every_caller_parked_on_a_failed_connection_gets_redis_unavailable(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    """Redis stalls past the deadline with many commands in flight: each caller gets its own
    RedisUnavailable (one shared outcome could be unwrapped once: the rest got
    ``outcome.AlreadyUsedError``, a 500 at the gateway)."""
    with redis_server(tmp_path) as server:
        watched = await started(nursery, server.url, timeout_s=0.2)
        await watched.until(True)
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await watched.client.call("PING")
            except RedisUnavailable as exc:
                errors.append(exc)

        server.stop_signal(signal.SIGSTOP)
        try:
            with trio.fail_after(10):
                async with trio.open_nursery() as callers:
                    for _ in range(20):
                        callers.start_soon(call)
        finally:
            server.stop_signal(signal.SIGCONT)
        assert len(errors) == 20
