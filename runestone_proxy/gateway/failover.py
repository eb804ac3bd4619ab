"""Failover, retries and time-to-first-token hedging over an ordered list of candidates.

How this works
--------------
A request comes with its candidates already filtered and ordered by policy
(``routing.filter_and_order`` + ``Deployments.order_groups``). Each attempt picks the first
candidate that can take a request now (breaker closed or a half-open probe slot free, not
paused by a provider ``retry-after``, under its ``max_concurrent`` cap), preferring ones not
tried yet, and takes its slot in the same step (no checkpoint between the decision and the
count, so a burst cannot overshoot a cap). A retryable failure (connect error, timeout, 429,
5xx, Anthropic overload) moves on to a fresh candidate at once; coming back to a deployment
already tried (because no fresh one can take the request now) waits an exponential backoff
with full jitter. When no candidate can take a request now, the attempt waits for the
earliest one to become ready (a half-open probe, the end of a pause) or for a slot or a
breaker verdict to change things, as long as that is before the request's deadline. No
attempt starts after the deadline, and none backs off after the last attempt.
Non-retryable errors (400, 401, 404, content policy) go straight back to the client.

Streams fail over the same way until their first payload is in hand; only then is the
stream handed to its reader (the *commit*: :meth:`Failover.open_stream`, in
:mod:`.failover_stream`), after which failures end the stream in-band.
With hedging on for the model, a second candidate is started when the first has produced
nothing after the hedge delay, if one can take a request right then (a hedge never waits);
the first to produce a payload commits and the other is cancelled at once (its upstream
connection is closed, not returned to the pool).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, ServiceUnavailable, UpstreamTimeout
from runestone_proxy.gateway import failover_stream
from runestone_proxy.gateway.backoff import backoff_s
from runestone_proxy.gateway.breaker import HALF_OPEN
from runestone_proxy.gateway.deployments import (
    Deployment,
    Deployments,
    Slot,
    emit_transition,
)
from runestone_proxy.gateway.failover_stream import (
    CallFor,
    CommittedStream,
    counts_against_health,
    emit_retry,
)
from runestone_proxy.gateway.pipeline import Providers
from runestone_proxy.gateway.routing import Target


@attrs.define(eq=False)
class Failover:
    deployments: Deployments
    #: The backoff's jitter source, [0, 1): a constant or a seeded generator in tests.
    rand: Callable[[], float] = random.random

    # --- picking -------------------------------------------------------------------------------

    def _take_now(
        self, targets: list[Target], tried: set[str], now: float
    ) -> tuple[Target, Slot] | None:
        """The first candidate that can take a request now, fresh ones first, with its slot
        taken (nothing awaits between the checks and the count). The common case: callers
        try it before :meth:`_wait_for_candidate`, which costs a coroutine even when it
        would not wait."""
        ordered = (
            [
                *(t for t in targets if t.provider not in tried),
                *(t for t in targets if t.provider in tried),
            ]
            if tried
            else targets
        )
        by_name = self.deployments.by_name
        for target in ordered:
            d = by_name[target.provider]
            if d.paused_until > now or d.at_cap():
                continue
            allowed, moved = d.breaker.allow(now)
            if moved is not None:
                emit_transition(d.name, moved)
            if allowed:
                return target, self.deployments.take(d, d.breaker.state is HALF_OPEN)
        return None

    async def _wait_for_candidate(
        self, targets: list[Target], tried: set[str], deadline: float, last: GatewayError | None
    ) -> tuple[Target, Slot]:
        """Wait for a candidate that can take the request (``_take_now`` found none)."""
        deps = [self.deployments.by_name[t.provider] for t in targets]
        while True:
            now = trio.current_time()
            if now >= deadline:
                break
            picked = self._take_now(targets, tried, now)
            if picked is not None:
                return picked
            capped = any(d.at_cap() for d in deps)
            wake = min((d.ready_at(now) for d in deps if not d.at_cap()), default=math.inf)
            if wake > deadline and not capped:
                break
            # Until the earliest deployment is ready, or a slot or a verdict changes things.
            with trio.move_on_at(min(wake, deadline)):
                await self.deployments.wait_changed()
        if last is not None:
            raise last
        raise ServiceUnavailable(
            "No provider can take this request before its deadline: "
            + ", ".join(f"{d.name} ({d.breaker.state.value})" for d in deps)
            + ".",
            code="no_provider_available",
        )

    def _ready_now(self, d: Deployment, now: float) -> bool:
        return not d.at_cap() and d.ready_at(now) <= now

    async def _backoff(
        self, failed: int, targets: list[Target], tried: set[str], deadline: float
    ) -> None:
        """After ``failed`` attempts, back off only when the next pick can only be a
        deployment already tried (moving on to a fresh one that can take the request now is
        immediate)."""
        now = trio.current_time()
        by_name = self.deployments.by_name
        if any(
            t.provider not in tried and self._ready_now(by_name[t.provider], now) for t in targets
        ):
            return
        routing = self.deployments.routing
        delay = backoff_s(
            failed, routing.retry_base_ms / 1000, routing.retry_max_ms / 1000, self.rand
        )
        if delay and now + delay < deadline:
            await trio.sleep(delay)

    def _failed(self, d: Deployment, exc: GatewayError, started: float) -> None:
        """Record a failed attempt; a 429 with ``retry-after`` pauses that deployment."""
        now = trio.current_time()
        retry_after = getattr(exc, "retry_after_s", None)
        if exc.http_status == 429 and retry_after:
            d.paused_until = max(d.paused_until, now + float(retry_after))
        self.deployments.record(d, not counts_against_health(exc), (now - started) * 1000, now)

    # --- whole answers -------------------------------------------------------------------------

    async def complete(
        self, targets: list[Target], call_for: CallFor, providers: Providers
    ) -> tuple[Target, bytes]:
        routing = self.deployments.routing
        started = trio.current_time()
        deadline = started + routing.deadline_s
        tried: set[str] = set()
        last: GatewayError | None = None
        for attempt in range(routing.max_attempts):
            if attempt:
                await self._backoff(attempt, targets, tried, deadline)
                started = trio.current_time()
            picked = self._take_now(targets, tried, started) if started < deadline else None
            if picked is None:
                picked = await self._wait_for_candidate(targets, tried, deadline, last)
                started = trio.current_time()
            target, slot = picked
            d = slot.deployment
            bound = min(deadline, started + routing.attempt_timeout_s)
            exc: GatewayError
            try:
                # The call enforces ``bound`` itself (the upstream pool bounds each of its
                # waits by it): no cancel scope per attempt on the hot path.
                with slot:
                    body = await providers.complete(target, call_for(target), bound)
            except UpstreamTimeout as error:
                exc = error
                if trio.current_time() >= bound:
                    exc = UpstreamTimeout(
                        f"{target.provider} did not answer within "
                        f"{'the routing deadline' if bound == deadline else 'the attempt timeout'}."
                    )
                self._failed(d, exc, started)
            except GatewayError as error:
                exc = error
                self._failed(d, exc, started)
            except BaseException:
                slot.release_probe()
                raise
            else:
                now = trio.current_time()
                self.deployments.record(d, True, (now - started) * 1000, now)
                return target, body
            if not exc.is_retryable:
                raise exc
            last = exc
            tried.add(target.provider)
            if attempt + 1 < routing.max_attempts:
                emit_retry(target, exc, attempt)
        assert last is not None
        raise last

    # --- streams -------------------------------------------------------------------------------

    def open_stream(
        self, targets: list[Target], call_for: CallFor, providers: Providers
    ) -> AbstractAsyncContextManager[CommittedStream]:
        """``async with failover.open_stream(...) as stream:`` the first attempt to produce
        payloads, with them in ``stream.first`` (see :mod:`.failover_stream`)."""
        return failover_stream.open_stream(self, targets, call_for, providers)

    def _hedge_delay(self, target: Target) -> float | None:
        entry = target.entry
        if entry is None:
            return None
        if entry.hedge_p95:
            observed = self.deployments.by_name[target.provider].p95_ttft_s()
            if observed is not None:
                return observed
        return None if entry.hedge_delay_ms is None else entry.hedge_delay_ms / 1000

    def _hedge_now(
        self, primary: Target, targets: list[Target], tried: set[str], delay: float
    ) -> tuple[Target, Slot] | None:
        """A second candidate, with its slot, if one can take the request right now: a hedge
        never waits for a candidate."""
        rest = [t for t in targets if t.provider not in tried and t.provider != primary.provider]
        picked = self._take_now(rest, set(), trio.current_time())
        if picked is not None:
            telemetry.emit(
                "router.hedge",
                primary=primary.provider,
                secondary=picked[0].provider,
                delay_ms=round(delay * 1000, 1),
            )
        return picked
