"""The failover executor on trio's ``MockClock(autojump_threshold=0)``: retries, backoff,
``retry-after`` pauses, breakers, concurrency caps, deadlines and hedging.

The providers are a stub with the pipeline's two entry points, ``complete(target, call)``
and ``open_stream(target, call)``. Each provider follows a plan of :class:`Step` values, one
per call (the last one repeats); the stub records every call with its (virtual) time, counts
concurrency per provider, and notes the calls that were cancelled. Every test runs under
``trio.fail_after`` on the virtual clock, so a hang fails fast instead of stalling the suite.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from runestone_proxy import telemetry
from runestone_proxy.config import (
    BreakerConfig,
    Config,
    ModelConfig,
    ProviderConfig,
    RoutingConfig,
)
from runestone_proxy.errors import (
    GatewayError,
    ProviderError,
    ServiceUnavailable,
    UpstreamConnectError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.gateway.breaker import State
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.failover import Failover
from runestone_proxy.gateway.routing import Target
from runestone_proxy.providers.base import ProviderCall

LIMIT_S = 600.0  # virtual seconds: generous, it costs no real time


def server_error() -> GatewayError:
    return ProviderError("boom", status=500, error_type="server_error", retryable=True)


def bad_request() -> GatewayError:
    return ProviderError(
        "bad temperature", status=400, error_type="invalid_request_error", retryable=False
    )


def refused() -> GatewayError:
    return UpstreamConnectError("upstream 127.0.0.1:9: connection refused")


def rate_limited(after_s: float) -> Callable[[], GatewayError]:
    return lambda: ProviderError(
        "slow down", status=429, error_type="requests", retryable=True, retry_after_s=after_s
    )


@attrs.frozen
class Step:
    """One call's behaviour: wait ``delay_s`` (inf: forever), then fail with ``error()`` or
    answer (``chunks`` payloads for a stream, dying after ``die_after`` of them if set)."""

    delay_s: float = 0.0
    error: Callable[[], GatewayError] | None = None
    chunks: int = 3
    die_after: int | None = None


OK = Step()
STALL = Step(delay_s=math.inf)


def fail(error: Callable[[], GatewayError], delay_s: float = 0.0) -> Step:
    return Step(delay_s=delay_s, error=error)


async def wait(delay_s: float) -> None:
    if delay_s == math.inf:
        await trio.sleep_forever()
    await trio.sleep(delay_s)


@attrs.define(eq=False)
class StubStream:
    provider: str
    step: Step
    sent: int = 0

    async def next(self) -> list[bytes] | None:
        if self.sent == 0:
            await wait(self.step.delay_s)
            if self.step.error is not None:
                raise self.step.error()
        if self.step.die_after is not None and self.sent >= self.step.die_after:
            raise UpstreamProtocolError(f"{self.provider} died mid-stream")
        if self.sent >= self.step.chunks:
            return None
        self.sent += 1
        return [f"{self.provider}:{self.sent}".encode()]


@attrs.define(eq=False)
class StubProviders:
    plans: dict[str, list[Step]]
    calls: list[tuple[str, float]] = attrs.Factory(list)
    in_flight: Counter[str] = attrs.Factory(Counter)
    peak: Counter[str] = attrs.Factory(Counter)
    cancelled: list[str] = attrs.Factory(list)

    def called(self) -> list[str]:
        return [name for name, _ in self.calls]

    def times(self, name: str | None = None) -> list[float]:
        return [t for n, t in self.calls if name is None or n == name]

    def _step(self, provider: str) -> Step:
        plan = self.plans[provider]
        return plan.pop(0) if len(plan) > 1 else plan[0]

    @contextmanager
    def _counting(self, provider: str) -> Iterator[None]:
        self.calls.append((provider, trio.current_time()))
        self.in_flight[provider] += 1
        self.peak[provider] = max(self.peak[provider], self.in_flight[provider])
        try:
            yield
        except trio.Cancelled:
            self.cancelled.append(provider)
            raise
        finally:
            self.in_flight[provider] -= 1

    async def complete(self, target: Target, call: ProviderCall, deadline: float) -> bytes:
        # Honours ``deadline`` as Providers.complete does (the upstream pool's scopes).
        step = self._step(target.provider)
        with self._counting(target.provider):
            with trio.move_on_at(deadline):
                await wait(step.delay_s)
            if trio.current_time() >= deadline:
                raise UpstreamTimeout(f"upstream {target.provider}: request exceeded its bound")
            if step.error is not None:
                raise step.error()
            return json.dumps({"provider": target.provider}).encode()

    @asynccontextmanager
    async def open_stream(self, target: Target, call: ProviderCall) -> AsyncIterator[StubStream]:
        step = self._step(target.provider)
        with self._counting(target.provider):
            await trio.lowlevel.checkpoint()  # a connect is a checkpoint
            yield StubStream(target.provider, step)


def top() -> float:
    """Full jitter at its top: the backoff is exactly ``min(max, base * 2**(failed - 1))``."""
    return 1.0


def make(
    names: str = "ab",
    *,
    max_concurrent: int | None = None,
    hedge_delay_ms: float | None = None,
    breaker: BreakerConfig | None = None,
    **routing: Any,
) -> tuple[Failover, list[Target]]:
    routing.setdefault("retry_base_ms", 100.0)
    routing.setdefault("retry_max_ms", 1000.0)
    config = Config(
        providers=tuple(ProviderConfig(n, "mock", max_concurrent=max_concurrent) for n in names),
        models=tuple(ModelConfig("m", n, hedge_delay_ms=hedge_delay_ms) for n in names),
        routing=RoutingConfig(breaker=breaker or BreakerConfig(), **routing),
    )
    targets = [Target(m.provider, m.upstream, m.id, m) for m in config.models]
    return Failover(Deployments.from_config(config), rand=top), targets


def call_for(target: Target) -> ProviderCall:
    return ProviderCall(endpoint="chat", body={}, model=target.upstream_model, stream=True)


def answered_by(body: bytes) -> str:
    provider: str = json.loads(body)["provider"]
    return provider


@attrs.define(eq=False)
class Relay:
    """The client side of a stream: which target it committed to and what it received."""

    targets: list[str] = attrs.Factory(list)
    payloads: list[bytes] = attrs.Factory(list)

    async def __call__(self, target: Target, stream: Any, first: list[bytes] | None) -> None:
        self.targets.append(target.provider)
        payloads = first
        while payloads is not None:
            self.payloads.extend(payloads)
            payloads = await stream.next()


async def relay_stream(
    failover: Failover, targets: list[Target], call_for: Any, providers: Any, relay: Relay
) -> None:
    """The handler's side of ``Failover.open_stream``: read the committed stream to its end."""
    async with failover.open_stream(targets, call_for, providers) as stream:
        await relay(stream.target, stream, stream.first)


@pytest.fixture
def events() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


# --- whole answers --------------------------------------------------------------------------


async def test_retryable_failure_moves_to_the_next_candidate_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("abc")
    stub = StubProviders({"a": [fail(server_error)], "b": [fail(refused)], "c": [OK]})
    with trio.fail_after(LIMIT_S):
        target, body = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert (target.provider, answered_by(body)) == ("c", "c")
    assert stub.called() == ["a", "b", "c"]
    assert stub.times() == [0.0, 0.0, 0.0]  # moving on to a fresh candidate never waits
    assert failover.deployments.by_name["a"].breaker.consecutive_failures == 1


async def test_non_retryable_error_is_returned_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab")
    stub = StubProviders({"a": [fail(bad_request)], "b": [OK]})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError) as info:
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert info.value.http_status == 400
    assert stub.called() == ["a"]
    # A client's own mistake says nothing about the provider's health.
    assert failover.deployments.by_name["a"].breaker.consecutive_failures == 0


async def test_max_attempts_is_respected(autojump_clock: trio.testing.MockClock) -> None:
    failover, targets = make("abc", max_attempts=2)
    stub = StubProviders({n: [fail(server_error)] for n in "abc"})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError):
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert stub.called() == ["a", "b"]


async def test_backoff_only_when_coming_back_to_a_tried_deployment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", max_attempts=4)
    stub = StubProviders({"a": [fail(server_error), fail(server_error), OK], "b": [fail(refused)]})
    with trio.fail_after(LIMIT_S):
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert target.provider == "a"
    # a, then b at once (b is fresh); then back to a, the first in order, after backoff(1)
    # = 0.2 s, and again after backoff(2) = 0.4 s, when it answers.
    assert stub.calls == [
        ("a", 0.0),
        ("b", 0.0),
        ("a", pytest.approx(0.2)),
        ("a", pytest.approx(0.6)),
    ]


async def test_backoff_grows_exponentially_on_a_single_deployment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("a", max_attempts=4)
    stub = StubProviders({"a": [fail(server_error)] * 3 + [OK]})
    with trio.fail_after(LIMIT_S):
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    # Full jitter at its top (the test's rng): 0.1, 0.2, 0.4 s between the attempts.
    assert stub.times() == pytest.approx([0.0, 0.1, 0.3, 0.7])


async def test_backoff_when_the_only_fresh_candidate_is_unavailable(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Going back to a tried deployment waits even when an untried one exists but cannot
    take the request now (paused by a 429): otherwise a flapping provider is hammered."""
    failover, targets = make("ab")
    failover.deployments.by_name["b"].paused_until = 100.0
    stub = StubProviders({"a": [fail(server_error), OK], "b": [OK]})
    with trio.fail_after(LIMIT_S):
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert target.provider == "a"
    assert stub.calls == [("a", 0.0), ("a", pytest.approx(0.1))]


async def test_no_backoff_after_the_last_attempt(autojump_clock: trio.testing.MockClock) -> None:
    failover, targets = make("a", max_attempts=2)
    stub = StubProviders({"a": [fail(server_error)]})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError):
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert stub.times() == pytest.approx([0.0, 0.1])
    assert trio.current_time() == pytest.approx(0.1)  # the error goes back at once


async def test_429_retry_after_pauses_that_deployment(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", max_attempts=2)
    stub = StubProviders({"a": [fail(rate_limited(5.0)), OK], "b": [OK]})
    with trio.fail_after(LIMIT_S):
        first, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        assert first.provider == "b"
        assert failover.deployments.snapshot()["a"]["paused_for_s"] == 5.0
        # A 429 is the provider protecting itself, not a failure: the breaker is untouched.
        assert failover.deployments.by_name["a"].breaker.consecutive_failures == 0
        await trio.sleep(1.0)
        second, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        assert second.provider == "b"  # a is still paused: not even tried
        await trio.sleep(4.0)
        third, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        assert third.provider == "a"
    assert stub.calls == [("a", 0.0), ("b", 0.0), ("b", 1.0), ("a", 5.0)]


async def test_429_on_the_only_deployment_waits_out_its_retry_after(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("a")
    stub = StubProviders({"a": [fail(rate_limited(3.0)), OK]})
    with trio.fail_after(LIMIT_S):
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert target.provider == "a"
    assert stub.times() == pytest.approx([0.0, 3.0])


# --- breakers -------------------------------------------------------------------------------


async def test_breaker_opens_after_n_failures_and_closes_after_a_probe(
    autojump_clock: trio.testing.MockClock, events: telemetry.Recorder
) -> None:
    failover, targets = make("ab", breaker=BreakerConfig(failure_threshold=3, cooldown_s=10.0))
    stub = StubProviders({"a": [fail(server_error)] * 3 + [OK], "b": [OK]})
    a = failover.deployments.by_name["a"]
    with trio.fail_after(LIMIT_S):
        for _ in range(3):
            target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
            assert target.provider == "b"
        assert a.breaker.state is State.OPEN
        assert failover.deployments.snapshot()["a"]["state"] == "open"
        assert [e["provider"] for e in events.named("circuit.open")] == ["a"]
        # Open: skipped without a call.
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        assert target.provider == "b"
        assert stub.called().count("a") == 3
        await trio.sleep(10.0)
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert target.provider == "a"  # the half-open probe, which succeeds
    assert a.breaker.state is State.CLOSED
    assert [name for name, _ in events.events if name.startswith("circuit.")] == [
        "circuit.open",
        "circuit.half_open",
        "circuit.close",
    ]


async def test_all_open_waits_for_the_earliest_half_open_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", breaker=BreakerConfig(failure_threshold=1, cooldown_s=10.0))
    deps = failover.deployments
    await trio.sleep(2.0)
    deps.record(deps.by_name["b"], False, None)  # b opens at 2: half-open at 12
    await trio.sleep(1.0)
    deps.record(deps.by_name["a"], False, None)  # a opens at 3: half-open at 13
    stub = StubProviders({"a": [OK], "b": [OK]})
    with trio.fail_after(LIMIT_S):
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert target.provider == "b"
    assert stub.calls == [("b", 12.0)]
    assert deps.by_name["b"].breaker.state is State.CLOSED
    assert deps.by_name["a"].breaker.state is State.OPEN


async def test_all_open_past_the_deadline_fails_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make(
        "ab", deadline_s=5.0, breaker=BreakerConfig(failure_threshold=1, cooldown_s=10.0)
    )
    for d in failover.deployments.by_name.values():
        failover.deployments.record(d, False, None)
    stub = StubProviders({"a": [OK], "b": [OK]})
    with trio.fail_after(LIMIT_S), pytest.raises(ServiceUnavailable) as info:
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert trio.current_time() == 0.0
    assert info.value.http_status == 503
    assert "a (open), b (open)" in info.value.message
    assert stub.calls == []


async def test_when_the_breaker_opens_on_the_way_the_last_error_is_returned(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make(
        "a", deadline_s=5.0, breaker=BreakerConfig(failure_threshold=1, cooldown_s=10.0)
    )
    stub = StubProviders({"a": [fail(server_error)]})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError) as info:
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    assert info.value.http_status == 500
    assert stub.calls == [("a", 0.0)]
    assert trio.current_time() < 5.0


async def test_half_open_admits_one_probe_and_the_others_wait_for_its_verdict(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("a", breaker=BreakerConfig(failure_threshold=1, cooldown_s=10.0))
    failover.deployments.record(failover.deployments.by_name["a"], False, None)
    stub = StubProviders({"a": [Step(delay_s=1.0)]})
    results: list[str] = []

    async def one() -> None:
        target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        results.append(target.provider)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(3):
                nursery.start_soon(one)
    assert results == ["a", "a", "a"]
    # One probe at 10; the others wait for its verdict (closed at 11), not a whole cooldown.
    assert stub.times() == [10.0, 11.0, 11.0]


async def test_a_cancelled_attempt_frees_only_its_own_probe(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("a", breaker=BreakerConfig(failure_threshold=1, cooldown_s=2.0))
    a = failover.deployments.by_name["a"]
    stub = StubProviders({"a": [Step(delay_s=10.0)]})
    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            early = trio.CancelScope()

            async def started_while_closed() -> None:
                with early:
                    await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]

            nursery.start_soon(started_while_closed)
            await trio.sleep(1.0)
            failover.deployments.record(a, False, None)  # opens; half-open from 3
            await trio.sleep(2.0)
            nursery.start_soon(failover.complete, targets, call_for, stub)  # the probe
            await trio.sleep(1.0)
            assert (a.breaker.state, a.breaker.probes_in_flight) == (State.HALF_OPEN, 1)
            early.cancel()  # the request from before the breaker opened goes away
            await trio.testing.wait_all_tasks_blocked()
            assert a.breaker.probes_in_flight == 1  # the probe still holds its place
    assert stub.times() == [0.0, 3.0]
    assert stub.cancelled == ["a"]


# --- concurrency caps -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("streamed", "hedged"),
    [(False, False), (True, False), (True, True)],
    ids=["complete", "stream", "hedged-stream"],
)
async def test_max_concurrent_is_never_exceeded_under_a_burst(
    autojump_clock: trio.testing.MockClock, streamed: bool, hedged: bool
) -> None:
    failover, targets = make(
        "ab", max_concurrent=2, hedge_delay_ms=300.0 if hedged else None, max_attempts=3
    )
    stub = StubProviders({"a": [Step(delay_s=1.0)], "b": [Step(delay_s=1.5)]})
    done: list[str] = []

    async def one() -> None:
        if streamed:
            relay = Relay()
            await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
            done.append(relay.targets[0])
        else:
            target, _ = await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
            done.append(target.provider)

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
    assert len(done) == 20
    assert stub.peak["a"] <= 2
    assert stub.peak["b"] <= 2
    assert {d.in_flight for d in failover.deployments.by_name.values()} == {0}


async def test_a_capped_request_takes_whichever_slot_frees_first(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", max_concurrent=1)
    stub = StubProviders({"a": [Step(delay_s=10.0)], "b": [Step(delay_s=2.0)]})
    finished: dict[str, float] = {}

    async def one(name: str) -> None:
        await failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
        finished[name] = trio.current_time()

    with trio.fail_after(LIMIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(one, "first")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "second")
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(one, "third")  # both capped: b frees at 2, a at 10
    assert stub.calls == [("a", 0.0), ("b", 0.0), ("b", 2.0)]
    assert finished["third"] == 4.0


# --- deadlines ------------------------------------------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "stream"])
async def test_no_attempt_starts_after_the_deadline(
    autojump_clock: trio.testing.MockClock, streamed: bool
) -> None:
    failover, targets = make("ab", deadline_s=5.0)
    stub = StubProviders({"a": [STALL], "b": [OK]})
    run = (
        relay_stream(failover, targets, call_for, stub, Relay())  # type: ignore[arg-type]
        if streamed
        else failover.complete(targets, call_for, stub)  # type: ignore[arg-type]
    )
    with trio.fail_after(LIMIT_S), pytest.raises(UpstreamTimeout):
        await run
    assert trio.current_time() == 5.0
    assert stub.called() == ["a"]
    # b never had a chance: its health is untouched.
    assert failover.deployments.by_name["b"].breaker.consecutive_failures == 0


# --- streams --------------------------------------------------------------------------------


async def test_a_stream_fails_over_before_its_first_chunk(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("abc")
    stub = StubProviders({"a": [fail(refused)], "b": [fail(server_error, delay_s=0.5)], "c": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["c"]  # the client saw one stream, from c only
    assert relay.payloads == [b"c:1", b"c:2", b"c:3"]
    assert stub.called() == ["a", "b", "c"]


async def test_a_stream_that_dies_after_its_first_chunk_is_not_retried(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab")
    stub = StubProviders({"a": [Step(die_after=2)], "b": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S), pytest.raises(UpstreamProtocolError):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["a"]
    assert relay.payloads == [b"a:1", b"a:2"]
    assert stub.called() == ["a"]


async def test_a_stream_non_retryable_error_is_returned_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab")
    stub = StubProviders({"a": [fail(bad_request)], "b": [OK]})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError):
        await relay_stream(failover, targets, call_for, stub, Relay())  # type: ignore[arg-type]
    assert stub.called() == ["a"]


# --- hedging --------------------------------------------------------------------------------


async def test_hedge_starts_a_second_candidate_and_cancels_the_stalled_primary(
    autojump_clock: trio.testing.MockClock, events: telemetry.Recorder
) -> None:
    failover, targets = make("ab", hedge_delay_ms=500.0)
    stub = StubProviders({"a": [STALL], "b": [Step(delay_s=0.2)]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["b"]
    assert relay.payloads == [b"b:1", b"b:2", b"b:3"]
    assert stub.calls == [("a", 0.0), ("b", 0.5)]
    assert stub.cancelled == ["a"]  # the loser was cancelled (its upstream exchange closed)
    assert stub.in_flight == {"a": 0, "b": 0}
    (hedge,) = events.named("router.hedge")
    assert (hedge["primary"], hedge["secondary"], hedge["delay_ms"]) == ("a", "b", 500.0)
    cancelled = events.named("provider.request.cancelled")
    assert [(e["provider"], e["reason"]) for e in cancelled] == [("a", "hedge lost")]
    # The loser's cancelled attempt says nothing about its health either way.
    a = failover.deployments.by_name["a"]
    assert (a.breaker.consecutive_failures, a.breaker.probes_in_flight) == (0, 0)


async def test_a_hedge_winner_that_dies_mid_stream_raises_its_own_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", hedge_delay_ms=500.0)
    stub = StubProviders({"a": [STALL], "b": [Step(die_after=1)]})
    relay = Relay()
    with trio.fail_after(LIMIT_S), pytest.raises(UpstreamProtocolError):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.payloads == [b"b:1"]
    assert stub.cancelled == ["a"]
    assert stub.called() == ["a", "b"]  # committed: no failover after the first chunk


async def test_no_hedge_when_the_primary_answers_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", hedge_delay_ms=500.0)
    stub = StubProviders({"a": [Step(delay_s=0.4)], "b": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["a"]
    assert stub.called() == ["a"]


async def test_hedge_primary_wins_when_it_answers_first_after_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("ab", hedge_delay_ms=500.0)
    stub = StubProviders({"a": [Step(delay_s=0.7)], "b": [Step(delay_s=1.0)]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["a"]
    assert relay.payloads == [b"a:1", b"a:2", b"a:3"]
    assert stub.cancelled == ["b"]


async def test_hedge_is_skipped_when_no_second_candidate_is_available_now(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hedge is best effort: it must not wait for (or fail on) an unavailable second
    candidate while the primary is still working."""
    failover, targets = make(
        "ab", hedge_delay_ms=500.0, breaker=BreakerConfig(failure_threshold=1, cooldown_s=30.0)
    )
    failover.deployments.record(failover.deployments.by_name["b"], False, None)
    stub = StubProviders({"a": [Step(delay_s=2.0)], "b": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["a"]
    assert stub.called() == ["a"]
    assert trio.current_time() == 2.0


async def test_hedge_skipped_when_the_second_candidate_is_past_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make(
        "ab",
        hedge_delay_ms=500.0,
        deadline_s=10.0,
        breaker=BreakerConfig(failure_threshold=1, cooldown_s=30.0),
    )
    failover.deployments.record(failover.deployments.by_name["b"], False, None)
    stub = StubProviders({"a": [Step(delay_s=2.0)], "b": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["a"]


async def test_hedged_primary_failure_fails_over_without_waiting_for_the_delay(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("abc", hedge_delay_ms=500.0)
    stub = StubProviders({"a": [fail(server_error, delay_s=0.1)], "b": [OK], "c": [OK]})
    relay = Relay()
    with trio.fail_after(LIMIT_S):
        await relay_stream(failover, targets, call_for, stub, relay)  # type: ignore[arg-type]
    assert relay.targets == ["b"]
    assert stub.calls == [("a", 0.0), ("b", 0.1)]


async def test_hedged_attempts_count_against_max_attempts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    failover, targets = make("abcd", hedge_delay_ms=500.0, max_attempts=3)
    stub = StubProviders({n: [fail(server_error, delay_s=1.0)] for n in "abcd"})
    with trio.fail_after(LIMIT_S), pytest.raises(ProviderError):
        await relay_stream(failover, targets, call_for, stub, Relay())  # type: ignore[arg-type]
    # a, hedged by b after 0.5 s (two attempts), both fail; one attempt left: c.
    assert stub.called() == ["a", "b", "c"]


async def test_hedge_delay_from_observed_p95(autojump_clock: trio.testing.MockClock) -> None:
    config = Config(
        providers=(ProviderConfig("a", "mock"), ProviderConfig("b", "mock")),
        models=(
            ModelConfig("m", "a", hedge_p95=True, hedge_delay_ms=900.0),
            ModelConfig("m", "b"),
        ),
    )
    failover = Failover(Deployments.from_config(config))
    targets = [Target(m.provider, m.upstream, m.id, m) for m in config.models]
    assert failover._hedge_delay(targets[0]) == 0.9  # too few samples: the fixed delay
    failover.deployments.by_name["a"].ttft_ms.extend([100.0] * 19 + [300.0] * 5)
    assert failover._hedge_delay(targets[0]) == 0.3
    assert failover._hedge_delay(targets[1]) is None


# --- streams as values (issue 11) ---------------------------------------------------------------


@pytest.mark.parametrize("hedged", [False, True], ids=["plain", "hedged"])
async def test_an_error_raised_in_the_readers_block_is_re_raised_never_failed_over(
    autojump_clock: trio.testing.MockClock, hedged: bool
) -> None:
    """After the commit the block belongs to the reader: a ``GatewayError`` it raises comes
    out as itself (no ExceptionGroup, even from the hedge's nursery) and starts no attempt."""
    failover, targets = make("ab", hedge_delay_ms=500.0 if hedged else None)
    stub = StubProviders({"a": [OK], "b": [OK]})

    async def read() -> None:
        async with failover.open_stream(targets, call_for, stub) as stream:  # type: ignore[arg-type]
            assert stream.first == [b"a:1"]
            raise UpstreamProtocolError("the reader's own")

    with trio.fail_after(LIMIT_S), pytest.raises(UpstreamProtocolError, match="reader"):
        await read()
    assert stub.called() == ["a"]


@pytest.mark.parametrize("hedged", [False, True], ids=["plain", "hedged"])
async def test_the_committed_stream_reports_how_it_ended(
    autojump_clock: trio.testing.MockClock, hedged: bool
) -> None:
    failover, targets = make("ab", hedge_delay_ms=500.0 if hedged else None)
    stub = StubProviders({"a": [Step(delay_s=1.0)], "b": [Step(delay_s=2.0, die_after=2)]})
    with trio.fail_after(LIMIT_S):
        async with failover.open_stream(targets, call_for, stub) as stream:  # type: ignore[arg-type]
            while await stream.next() is not None:
                pass
    assert stream.target.provider == "a"
    assert (stream.ended, stream.error, stream.chunks) == (True, None, 3)
