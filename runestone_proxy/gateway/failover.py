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
client's response started (the *commit*), after which failures end the stream in-band.
With hedging on for the model, a second candidate is started when the first has produced
nothing after the hedge delay, if one can take a request right then (a hedge never waits);
the first to produce a payload commits and the other is cancelled at once (its upstream
connection is closed, not returned to the pool).
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, ServiceUnavailable, UpstreamTimeout
from runestone_proxy.gateway.backoff import backoff_s
from runestone_proxy.gateway.breaker import HALF_OPEN
from runestone_proxy.gateway.deployments import (
    Deployment,
    Deployments,
    Slot,
    emit_transition,
)
from runestone_proxy.gateway.pipeline import PayloadStream, Providers
from runestone_proxy.gateway.routing import Target
from runestone_proxy.providers.base import ProviderCall

CallFor = Callable[[Target], ProviderCall]
Relay = Callable[[Target, PayloadStream, list[bytes] | None], Awaitable[None]]


def _counts_against_health(exc: GatewayError) -> bool:
    """Provider-side trouble trips breakers; a client's own 4xx or a 429 does not."""
    return exc.is_retryable and exc.http_status != 429


@attrs.define(eq=False)
class _Commit:
    winner: Target | None = None
    winner_key: int | None = None
    scopes: dict[int, trio.CancelScope] = attrs.Factory(dict)
    first_or_done: trio.Event = attrs.Factory(trio.Event)
    #: Attempts spent beyond the first (a hedge).
    extra: int = 0

    def claim(self, target: Target, key: int) -> bool:
        if self.winner is not None:
            return False
        self.winner = target
        self.winner_key = key
        for other, scope in self.scopes.items():
            if other != key:
                scope.cancel()
        self.first_or_done.set()
        return True


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
        self.deployments.record(d, not _counts_against_health(exc), (now - started) * 1000, now)

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
                _emit_retry(target, exc, attempt)
        assert last is not None
        raise last

    # --- streams -------------------------------------------------------------------------------

    async def stream(
        self, targets: list[Target], call_for: CallFor, providers: Providers, relay: Relay
    ) -> None:
        routing = self.deployments.routing
        deadline = trio.current_time() + routing.deadline_s
        tried: set[str] = set()
        last: GatewayError | None = None
        attempt = 0
        while attempt < routing.max_attempts:
            if attempt:
                await self._backoff(attempt, targets, tried, deadline)
            now = trio.current_time()
            picked = self._take_now(targets, tried, now) if now < deadline else None
            if picked is None:
                picked = await self._wait_for_candidate(targets, tried, deadline, last)
            target, slot = picked
            attempt += 1
            commit = _Commit()
            hedge = self._hedge_delay(target)
            try:
                if hedge is not None and attempt < routing.max_attempts and len(targets) > 1:
                    await self._hedged(
                        target,
                        slot,
                        targets,
                        tried,
                        hedge,
                        deadline,
                        call_for,
                        providers,
                        relay,
                        commit,
                    )
                else:
                    await self._attempt(
                        target, slot, 0, deadline, call_for, providers, relay, commit
                    )
                return
            except GatewayError as exc:
                if commit.winner is not None or not exc.is_retryable:
                    raise
                last = exc
                attempt += commit.extra
                tried.add(target.provider)
                if attempt < routing.max_attempts:
                    _emit_retry(target, exc, attempt - 1)
        assert last is not None
        raise last

    def _hedge_delay(self, target: Target) -> float | None:
        entry = target.entry
        if entry is None:
            return None
        if entry.hedge_p95:
            observed = self.deployments.by_name[target.provider].p95_ttft_s()
            if observed is not None:
                return observed
        return None if entry.hedge_delay_ms is None else entry.hedge_delay_ms / 1000

    async def _attempt(
        self,
        target: Target,
        slot: Slot,
        key: int,
        deadline: float,
        call_for: CallFor,
        providers: Providers,
        relay: Relay,
        commit: _Commit,
    ) -> None:
        """One upstream stream: connect, wait for the first payloads, then commit and relay."""
        d = slot.deployment
        started = trio.current_time()
        committed = False
        limit = min(deadline, started + self.deployments.routing.attempt_timeout_s)
        try:
            # Until the commit, the whole attempt (connect, head, first chunk) is bounded.
            with slot, trio.CancelScope(deadline=limit) as bounded:
                async with providers.open_stream(target, call_for(target)) as stream:
                    first = await stream.next()
                    bounded.deadline = math.inf
                    ttft_ms = (trio.current_time() - started) * 1000
                    if not commit.claim(target, key):
                        slot.release_probe()
                        return  # another hedged attempt won
                    committed = True
                    d.ttft_ms.append(ttft_ms)
                    self.deployments.record(d, True, ttft_ms)
                    await relay(target, _Recorded(stream, self, d), first)
            if bounded.cancelled_caught and not committed:
                raise UpstreamTimeout(
                    f"{target.provider} produced no first chunk within "
                    f"{'the routing deadline' if limit == deadline else 'the attempt timeout'}."
                )
        except GatewayError as exc:
            if committed:
                raise
            self._failed(d, exc, started)
            raise
        except BaseException:
            if not committed:
                slot.release_probe()
                telemetry.emit(
                    "provider.request.cancelled",
                    provider=target.provider,
                    reason="hedge lost" if commit.winner else "cancelled",
                )
            raise

    async def _hedged(
        self,
        primary: Target,
        slot: Slot,
        targets: list[Target],
        tried: set[str],
        delay: float,
        deadline: float,
        call_for: CallFor,
        providers: Providers,
        relay: Relay,
        commit: _Commit,
    ) -> None:
        """Race ``primary`` against a second candidate started after ``delay``.

        Raises the primary's error when no attempt committed (the caller then fails over as
        usual), or the winner's error after it committed. ``commit.extra`` counts the hedge;
        every other deployment that failed here is added to ``tried``."""
        errors: list[GatewayError] = []
        after_commit: list[GatewayError] = []

        async def run(target: Target, slot: Slot, key: int) -> None:
            with trio.CancelScope() as scope:
                commit.scopes[key] = scope
                if commit.winner is not None:
                    scope.cancel()  # the other attempt won before this one started
                try:
                    await self._attempt(
                        target, slot, key, deadline, call_for, providers, relay, commit
                    )
                except GatewayError as exc:
                    if commit.winner_key == key:
                        after_commit.append(exc)  # raised below, outside the nursery
                        return
                    errors.append(exc)
                    if target is not primary:
                        tried.add(target.provider)
                finally:
                    if key == 0:
                        commit.first_or_done.set()

        # The slots are taken: each task enters its slot before its first checkpoint.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, primary, slot, 0)
            with trio.move_on_after(delay):
                await commit.first_or_done.wait()
            if commit.winner is None and not errors:
                picked = self._hedge_now(primary, targets, tried, delay)
                if picked is not None:
                    commit.extra = 1
                    nursery.start_soon(run, *picked, 1)
        if after_commit:
            raise after_commit[0]
        if commit.winner is None:
            raise errors[0] if errors else UpstreamTimeout("No hedged attempt produced a chunk.")

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


@attrs.define(eq=False)
class _Recorded:
    """The committed stream, as the relay sees it: a death after the first byte still counts
    against the deployment's breaker, though it can no longer fail over."""

    stream: PayloadStream
    failover: Failover
    deployment: Deployment

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.stream.usage

    async def next(self) -> list[bytes] | None:
        try:
            return await self.stream.next()
        except GatewayError as exc:
            self.failover.deployments.record(self.deployment, not _counts_against_health(exc), None)
            raise


def _emit_retry(target: Target, exc: GatewayError, attempt: int) -> None:
    telemetry.emit(
        "router.retry",
        provider=target.provider,
        model=target.model,
        attempt=attempt,
        status=exc.http_status,
        code=exc.code,
    )
