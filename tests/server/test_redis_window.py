"""The rate windows on Redis (server/redis_window.py, inside redis_scripts' ACQUIRE and
ADJUST) against the in-process window they must equal (gateway/rate_window.py), on a real
redis-server.

The scripts read the time from Redis (``TIME``); here each is loaded with that line
replaced by a read of a test key, so a property test can move time in steps of its own
choosing (bucket edges, idle gaps longer than the window) and compare, after every step,
what the script answers (the window's total, the time until it is empty, a denial and its
wait) with what :class:`~runestone_proxy.gateway.rate_window.Window` says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, redis_server

from runestone_proxy.gateway.rate_window import HOUR_S, MINUTE_S, Window
from runestone_proxy.server.redis_scripts import _NOW, ACQUIRE, ADJUST

T0_US = 1_800_000_000_000_000  # on the hour
NOW_KEY = "test:now_us"
FAKE_NOW = f"""
local now_us = tonumber(redis.call('GET', '{NOW_KEY}'))
local now_ms = math.floor(now_us / 1000)
"""
KEYS = ["t:slots", "t:gslots", "t:rl:rpm", "t:rl:rph", "t:rl:tpm", "t:kslots"]
WIDTHS_US = (1_000_000, 60_000_000, 1_000_000)
SPANS = (MINUTE_S, HOUR_S, MINUTE_S)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _source(script: Any) -> str:
    source: str = script.source
    assert _NOW in source
    return source.replace(_NOW, FAKE_NOW)


ACQUIRE_FAKE = _source(ACQUIRE)
ADJUST_FAKE = _source(ADJUST)


def acquire(redis: RedisServer, limits: tuple[int, int, int], tokens: int) -> list[int]:
    argv = [30_000, 10**6, 10**6, *limits, 0, "m", tokens, 0]
    reply: list[int] = redis.command("EVAL", ACQUIRE_FAKE, len(KEYS), *KEYS, *argv)
    return reply


def adjust(redis: RedisServer, bucket: int, delta: int) -> None:
    redis.command("EVAL", ADJUST_FAKE, 1, KEYS[4], bucket, delta, WIDTHS_US[2])


def fields(redis: RedisServer, key: str) -> dict[int, int]:
    flat = redis.command("HGETALL", key)
    return {int(f): int(c) for f, c in zip(flat[::2], flat[1::2], strict=True)}


class Model:
    """The three windows of a key, in process, fed the same steps."""

    def __init__(self, limits: tuple[int, int, int]) -> None:
        self.limits = limits
        self.windows = [Window.over(span, T0_US / 1e6) for span in SPANS]

    def acquire(self, now_us: int, tokens: int) -> tuple[int, int, list[int], list[float]]:
        now = now_us / 1e6
        which, wait = 0, 0.0
        for i, (window, limit) in enumerate(zip(self.windows, self.limits, strict=True)):
            if limit:
                window.advance(window.bucket(now))
                requested = tokens if i == 2 else 1
                w = window.wait_s(limit, requested, now)
                if w > 0 and (which == 0 or w > wait):
                    which, wait = i + 1, w
        if which == 0:
            for i, (window, limit) in enumerate(zip(self.windows, self.limits, strict=True)):
                requested = tokens if i == 2 else 1
                if limit and requested > 0:
                    window.add(window.bucket(now), requested)
        pairs = list(zip(self.windows, self.limits, strict=True))
        totals = [w.total if limit else 0 for w, limit in pairs]
        resets = [w.reset_s(now) if limit else 0.0 for w, limit in pairs]
        return which, -1 if wait == float("inf") else round(wait * 1e6), totals, resets


steps = st.lists(
    st.one_of(
        st.tuples(st.just("wait"), st.sampled_from([0, 1, 999_999, 1_000_000, 3_500_000])),
        st.tuples(st.just("wait"), st.sampled_from([59_000_000, 61_000_000, 4_000_000_000])),
        st.tuples(st.just("acquire"), st.integers(0, 40)),
        st.tuples(st.just("refund"), st.tuples(st.integers(0, 3), st.sampled_from([1, 7, 10**6]))),
        st.tuples(st.just("add"), st.integers(1, 30)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    limits=st.tuples(st.integers(1, 4), st.sampled_from([0, 6]), st.sampled_from([0, 50])),
    steps=steps,
)
def test_the_scripts_window_is_the_in_process_window(
    redis: RedisServer, limits: tuple[int, int, int], steps: list[tuple[str, Any]]
) -> None:
    redis.command("FLUSHDB")
    model = Model(limits)
    now_us = T0_US
    used: list[int] = []  # tpm buckets a request was counted in (what a refund names)
    for kind, value in steps:
        redis.command("SET", NOW_KEY, now_us)
        if kind == "wait":
            now_us += value
        elif kind == "acquire":
            reply = acquire(redis, limits, value)
            which, wait_us, totals, resets = model.acquire(now_us, value)
            assert reply[1] == which
            if which:
                assert abs(reply[2] - wait_us) <= 2 or reply[2] == wait_us == -1
            elif limits[2] and value:
                used.append(now_us // WIDTHS_US[2])
            assert [reply[6], reply[8], reply[10]] == totals
            for got, expected in zip((reply[7], reply[9], reply[11]), resets, strict=True):
                assert abs(got / 1e6 - expected) <= 2e-6
        elif kind == "refund" and used and limits[2]:
            back, amount = value  # the newest bucket a request used, or one before it
            bucket = used[-1 - back % len(used)]
            adjust(redis, bucket, -amount)
            model.windows[2].refund(bucket, amount)
        elif kind == "add" and limits[2]:
            adjust(redis, 0, value)
            window = model.windows[2]
            window.advance(window.bucket(now_us / 1e6))
            window.add(window.bucket(now_us / 1e6), value)
        for key, limit in zip(KEYS[2:5], limits, strict=True):
            held = fields(redis, key)
            if limit and -1 in held:  # the running total is the buckets' sum
                assert held[-1] == sum(c for f, c in held.items() if f >= 0)


def test_a_window_written_without_a_total_is_counted_once(redis: RedisServer) -> None:
    """A hash as the previous version left it (buckets only, one of them expired): the
    first admission counts it, drops the expired bucket and keeps the total from then on."""
    redis.command("FLUSHDB")
    now_us = T0_US + 100 * WIDTHS_US[0]
    b = now_us // WIDTHS_US[0]
    redis.command("SET", NOW_KEY, now_us)
    redis.command("HSET", KEYS[2], b - 61, 5, b - 60, 2, b - 1, 1, b, 1)
    reply = acquire(redis, (10, 0, 0), 0)
    assert reply[1] == 0
    assert reply[6] == 2 + 1 + 1 + 1  # b - 61 left the window; this request counted
    held = fields(redis, KEYS[2])
    assert b - 61 not in held
    assert held[-1] == 5
    assert held[-2] == b
    assert held[-3] == b


def test_a_window_idle_for_a_whole_span_is_dropped_in_one_step(redis: RedisServer) -> None:
    redis.command("FLUSHDB")
    redis.command("SET", NOW_KEY, T0_US)
    for _ in range(3):
        acquire(redis, (10, 0, 0), 0)
    redis.command("SET", NOW_KEY, T0_US + 61 * WIDTHS_US[0])
    reply = acquire(redis, (10, 0, 0), 0)
    assert reply[6] == 1
    assert fields(redis, KEYS[2]) == {
        T0_US // WIDTHS_US[0] + 61: 1,
        -1: 1,
        -2: T0_US // WIDTHS_US[0] + 61,
        -3: T0_US // WIDTHS_US[0] + 61,
    }


def test_refunding_the_newest_bucket_whole_moves_the_reset_back(redis: RedisServer) -> None:
    """A request's whole estimate refunded from the newest bucket with tokens in it (an
    error answer): the window empties when the bucket before it leaves, not that one."""
    redis.command("FLUSHDB")
    limits = (0, 0, 100)
    first = T0_US + 500_000
    redis.command("SET", NOW_KEY, first)
    acquire(redis, limits, 10)
    later = first + 10 * WIDTHS_US[2]
    redis.command("SET", NOW_KEY, later)
    acquire(redis, limits, 20)
    adjust(redis, later // WIDTHS_US[2], -20)
    reply = acquire(redis, limits, 0)
    assert reply[10] == 10
    assert reply[11] == (first // WIDTHS_US[2] + 61) * WIDTHS_US[2] - later
