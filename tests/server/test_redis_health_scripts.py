"""The shared breakers' scripts (server/redis_health_scripts.py) on a real redis-server:
a breaker's hash expires a week after its last transition, and one made anew never
repeats an epoch a process may have seen before it expired."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from redis_server import RedisServer, redis_server

from runestone_proxy.server.redis_health_scripts import BREAKER_TTL_MS, CLOSE, OPEN

BRK, PROBE = "p:brk:gpt", "p:brk:gpt:probe"


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def open_(redis: RedisServer, cooldown_ms: int) -> list[int]:
    reply: list[int] = redis.command("EVAL", OPEN.source, 2, BRK, PROBE, cooldown_ms, "ch", "gpt")
    return reply


def close(redis: RedisServer) -> list[int]:
    reply: list[int] = redis.command("EVAL", CLOSE.source, 2, BRK, PROBE, "ch", "gpt")
    return reply


def test_each_transition_sets_the_breakers_expiry(redis: RedisServer) -> None:
    redis.command("DEL", BRK)
    opened, _, first = open_(redis, 0)
    assert opened == 1
    assert BREAKER_TTL_MS - 60_000 < redis.command("PTTL", BRK) <= BREAKER_TTL_MS
    redis.command("PEXPIRE", BRK, 1000)
    closed, second = close(redis)  # the cooldown (0 ms) is over: the probe's success closes
    assert (closed, second) == (1, first + 1)
    assert BREAKER_TTL_MS - 60_000 < redis.command("PTTL", BRK) <= BREAKER_TTL_MS


def test_a_breaker_made_anew_starts_its_epoch_from_the_clock(redis: RedisServer) -> None:
    """Not 1 again (a process that saw epoch 1 before would think itself in step): the
    clock in ms, which has moved on by the hash's week of expiry since any epoch it gave."""
    redis.command("DEL", BRK)  # as if it had expired
    opened, _, epoch = open_(redis, 60_000)
    assert opened == 1
    seconds, micros = (int(x) for x in redis.command("TIME"))
    assert abs(epoch - (seconds * 1000 + micros // 1000)) < 60_000
