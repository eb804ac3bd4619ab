"""Failover, retries and time-to-first-token hedging over an ordered list of candidates.

How this works
--------------
A request comes with its candidates already filtered and ordered by policy
(``routing.filter_and_order`` + ``Deployments.order_groups``). Each attempt picks the first
candidate that can take a request now (breaker closed or a half-open probe slot free, not
paused by a provider ``retry-after``, under its ``max_concurrent`` cap), preferring ones not
tried yet. A retryable failure (connect error, timeout, 429, 5xx, Anthropic overload) moves
on to the next candidate at once; coming back to a deployment already tried waits an
exponential backoff with full jitter. When no candidate can take a request now, the attempt
waits for the earliest one to become ready (a half-open probe, the end of a pause, a freed
cap slot), as long as that is before the request's deadline. Non-retryable errors (400, 401,
404, content policy) go straight back to the client.

Streams fail over the same way until their first payload is in hand; only then is the
client's response started (the *commit*), after which failures end the stream in-band.
With hedging on for the model, a second candidate is started when the first has produced
nothing after the hedge delay; the first to produce a payload commits and the other is
cancelled at once (its upstream connection is closed, not returned to the pool).
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, ServiceUnavailable, UpstreamTimeout
from runestone_proxy.gateway.deployments import Deployment, Deployments, emit_transition
from runestone_proxy.gateway.pipeline import PayloadStream, Providers
from runestone_proxy.gateway.routing import Target
from runestone_proxy.providers.base import ProviderCall

CallFor = Callable[[Target], ProviderCall]
Relay = Callable[[Target, PayloadStream, list[bytes] | None], Awaitable[None]]


def backoff_s(attempt: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2**attempt)]."""
    return rng.uniform(0.0, min(max_s, base_s * (2**attempt)))


def _counts_against_health(exc: GatewayError) -> bool:
    """Provider-side trouble trips breakers; a client's own 4xx or a 429 does not."""
    return exc.is_retryable and exc.http_status != 429


@attrs.define(eq=False)
class _Commit:
    winner: Target | None = None
    scopes: dict[int, trio.CancelScope] = attrs.Factory(dict)
    first_or_done: trio.Event = attrs.Factory(trio.Event)

    def claim(self, target: Target, key: int) -> bool:
        if self.winner is not None:
            return False
        self.winner = target
        for other, scope in self.scopes.items():
            if other != key:
                scope.cancel()
        self.first_or_done.set()
        return True


@attrs.define(eq=False)
class Failover:
    deployments: Deployments
    rng: random.Random = attrs.Factory(lambda: random.Random())

    # --- picking -------------------------------------------------------------------------------

    async def _pick(
        self, targets: list[Target], tried: set[str], deadline: float, last: GatewayError | None
    ) -> Target:
        while True:
            now = trio.current_time()
            ordered = [t for t in targets if t.provider not in tried] + [
                t for t in targets if t.provider in tried
            ]
            for target in ordered:
                d = self.deployments.by_name[target.provider]
                if d.paused_until > now or d.at_cap():
                    continue
                allowed, moved = d.breaker.allow(now)
                if moved is not None:
                    emit_transition(d.name, moved)
                if allowed:
                    return target
            deps = [self.deployments.by_name[t.provider] for t in targets]
            ready = [d.ready_at(now) for d in deps if not d.at_cap()]
            if ready and min(ready) <= deadline:
                await trio.sleep_until(min(ready))
                continue
            capped = [d for d in deps if d.at_cap()]
            if capped:
                with trio.move_on_at(deadline):
                    await capped[0].cap_freed.wait()
                    continue
            if last is not None:
                raise last
            raise ServiceUnavailable(
                "No provider can take this request before its deadline: "
                + ", ".join(f"{d.name} ({d.breaker.state.value})" for d in deps)
                + ".",
                code="no_provider_available",
            )

    async def _between_attempts(
        self,
        attempt: int,
        target: Target,
        targets: list[Target],
        tried: set[str],
        exc: GatewayError,
        deadline: float,
    ) -> None:
        """Pause a deployment that said 429 + retry-after; back off only when the next pick
        can only be a deployment already tried (moving on to a fresh one is immediate)."""
        d = self.deployments.by_name[target.provider]
        retry_after = getattr(exc, "retry_after_s", None)
        if exc.http_status == 429 and retry_after:
            d.paused_until = max(d.paused_until, trio.current_time() + float(retry_after))
        if all(t.provider in tried for t in targets):
            routing = self.deployments.routing
            delay = backoff_s(
                attempt, routing.retry_base_ms / 1000, routing.retry_max_ms / 1000, self.rng
            )
            if delay and trio.current_time() + delay < deadline:
                await trio.sleep(delay)

    def _failed(self, d: Deployment, exc: GatewayError, started: float) -> None:
        latency = (trio.current_time() - started) * 1000
        self.deployments.record(d, not _counts_against_health(exc), latency)

    # --- whole answers -------------------------------------------------------------------------

    async def complete(
        self, targets: list[Target], call_for: CallFor, providers: Providers
    ) -> tuple[Target, bytes]:
        routing = self.deployments.routing
        deadline = trio.current_time() + routing.deadline_s
        tried: set[str] = set()
        last: GatewayError | None = None
        for attempt in range(routing.max_attempts):
            target = await self._pick(targets, tried, deadline, last)
            d = self.deployments.by_name[target.provider]
            started = trio.current_time()
            try:
                with self.deployments.using(d), trio.fail_after(max(0.0, deadline - started)):
                    body = await providers.complete(target, call_for(target))
            except trio.TooSlowError:
                exc: GatewayError = UpstreamTimeout(
                    f"{target.provider} did not answer within the routing deadline."
                )
                self._failed(d, exc, started)
            except GatewayError as error:
                exc = error
                self._failed(d, exc, started)
            except BaseException:
                d.breaker.release_probe()
                raise
            else:
                self.deployments.record(d, True, (trio.current_time() - started) * 1000)
                return target, body
            if not exc.is_retryable:
                raise exc
            last = exc
            _emit_retry(target, exc, attempt)
            tried.add(target.provider)
            await self._between_attempts(attempt, target, targets, tried, exc, deadline)
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
            target = await self._pick(targets, tried, deadline, last)
            attempt += 1
            commit = _Commit()
            hedge = self._hedge_delay(target)
            try:
                if hedge is not None and attempt < routing.max_attempts and len(targets) > 1:
                    attempt += await self._hedged(
                        target, targets, tried, hedge, deadline, call_for, providers, relay, commit
                    )
                else:
                    await self._attempt(target, 0, deadline, call_for, providers, relay, commit)
                return
            except GatewayError as exc:
                if commit.winner is not None or not exc.is_retryable:
                    raise
                last = exc
                _emit_retry(target, exc, attempt - 1)
                tried.add(target.provider)
                await self._between_attempts(attempt, target, targets, tried, exc, deadline)
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
        key: int,
        deadline: float,
        call_for: CallFor,
        providers: Providers,
        relay: Relay,
        commit: _Commit,
    ) -> None:
        """One upstream stream: connect, wait for the first payloads, then commit and relay."""
        d = self.deployments.by_name[target.provider]
        started = trio.current_time()
        committed = False
        try:
            with self.deployments.using(d):
                async with providers.open_stream(target, call_for(target)) as stream:
                    with trio.move_on_at(deadline) as waited:
                        first = await stream.next()
                    if waited.cancelled_caught:
                        raise UpstreamTimeout(
                            f"{target.provider} produced no first chunk within the deadline."
                        )
                    ttft_ms = (trio.current_time() - started) * 1000
                    if not commit.claim(target, key):
                        d.breaker.release_probe()
                        return  # another hedged attempt won
                    committed = True
                    d.ttft_ms.append(ttft_ms)
                    self.deployments.record(d, True, ttft_ms)
                    await relay(target, stream, first)
        except GatewayError as exc:
            if committed:
                raise
            self._failed(d, exc, started)
            raise
        except BaseException:
            if not committed:
                d.breaker.release_probe()
                telemetry.emit(
                    "provider.request.cancelled",
                    provider=target.provider,
                    reason="hedge lost" if commit.winner else "cancelled",
                )
            raise

    async def _hedged(
        self,
        primary: Target,
        targets: list[Target],
        tried: set[str],
        delay: float,
        deadline: float,
        call_for: CallFor,
        providers: Providers,
        relay: Relay,
        commit: _Commit,
    ) -> int:
        """Race ``primary`` against a second candidate started after ``delay``.

        Returns how many extra attempts were spent; raises the primary's error when no
        attempt committed (the caller then fails over as usual). Every deployment that
        failed here is added to ``tried``."""
        errors: list[GatewayError] = []
        extra = 0

        async def run(target: Target, key: int) -> None:
            with trio.CancelScope() as scope:
                commit.scopes[key] = scope
                try:
                    await self._attempt(target, key, deadline, call_for, providers, relay, commit)
                except GatewayError as exc:
                    if commit.winner is not None and commit.winner == target:
                        raise
                    errors.append(exc)
                    if target is not primary:
                        tried.add(target.provider)
                finally:
                    if key == 0:
                        commit.first_or_done.set()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(run, primary, 0)
            with trio.move_on_after(delay):
                await commit.first_or_done.wait()
            if commit.winner is None and not errors:
                rest = [t for t in targets if t.provider not in tried and t != primary]
                if rest:
                    second = await self._pick(rest, set(), deadline, None)
                    extra = 1
                    telemetry.emit(
                        "router.hedge",
                        primary=primary.provider,
                        secondary=second.provider,
                        delay_ms=round(delay * 1000, 1),
                    )
                    nursery.start_soon(run, second, 1)
        if commit.winner is None:
            raise errors[0] if errors else UpstreamTimeout("No hedged attempt produced a chunk.")
        return extra


def _emit_retry(target: Target, exc: GatewayError, attempt: int) -> None:
    telemetry.emit(
        "router.retry",
        provider=target.provider,
        model=target.model,
        attempt=attempt,
        status=exc.http_status,
        code=exc.code,
    )
