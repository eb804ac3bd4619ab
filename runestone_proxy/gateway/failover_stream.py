"""Streams through the failover executor, handed back as values.

``async with failover.open_stream(targets, call_for, providers) as stream:`` fails over
exactly as :meth:`Failover.complete` does until an attempt has its first payloads in hand
(the *commit*); only then does the block start, with ``stream.first`` already received, so
nothing has reached the client before a failover. After the commit, failures come out of
``stream.next()`` and end the stream in-band; they can no longer fail over.

How this works
--------------
A plain attempt runs inline in this generator: its deployment slot, its bound until the
first chunk (a cancel scope whose deadline is lifted at the commit) and its upstream context
are all held across the ``yield``, so the caller's block runs inside them, in the caller's
task, with no task or nursery of its own. A ``GatewayError`` thrown in at the ``yield``
(after the commit) is re-raised, never failed over.

A hedged attempt races in a nursery opened here: each contender runs :func:`_contender` in
its own task; the winner hands its stream to this frame and keeps its upstream context open
until the caller's block is done with it (``_Commit.released``), so the caller reads the
winner's stream from its own task. The loser is cancelled at the commit, exactly as before
(its upstream connection is closed, not returned to the pool). A client that goes away
cancels the caller's scope: the block exits, and so does every upstream context.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.errors import GatewayError, UpstreamTimeout
from runestone_proxy.gateway.deployments import Deployment, Slot
from runestone_proxy.gateway.pipeline import PayloadStream, Providers
from runestone_proxy.gateway.routing import Target
from runestone_proxy.providers.base import ProviderCall

if TYPE_CHECKING:
    from runestone_proxy.gateway.failover import Failover

CallFor = Callable[[Target], ProviderCall]


def counts_against_health(exc: GatewayError) -> bool:
    """Provider-side trouble trips breakers; a client's own 4xx or a 429 does not."""
    return exc.is_retryable and exc.http_status != 429


def emit_retry(target: Target, exc: GatewayError, attempt: int) -> None:
    telemetry.emit(
        "router.retry",
        provider=target.provider,
        model=target.model,
        attempt=attempt,
        status=exc.http_status,
        code=exc.code,
    )


@attrs.define(eq=False)
class CommittedStream:
    """The committed stream, as its reader sees it: ``target``, the ``first`` payloads
    (None for a stream that ended before any), ``next()`` for the rest, and what it
    reported (``usage``) and how it ended (``ended`` cleanly, or ``error``). A death after
    the first byte still counts against the deployment's breaker, though it can no longer
    fail over."""

    target: Target
    first: list[bytes] | None
    stream: PayloadStream
    failover: Failover
    deployment: Deployment
    #: Payloads read so far, the first ones included.
    chunks: int = 0
    #: ``next()`` returned None: the stream finished normally.
    ended: bool = False
    #: What ``next()`` raised, if it did.
    error: GatewayError | None = None

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.stream.usage

    async def next(self) -> list[bytes] | None:
        try:
            payloads = await self.stream.next()
        except GatewayError as exc:
            self.error = exc
            self.failover.deployments.record(self.deployment, not counts_against_health(exc), None)
            raise
        if payloads is None:
            self.ended = True
        else:
            self.chunks += len(payloads)
        return payloads


@attrs.define(eq=False)
class _Commit:
    """One round of attempts (one, or a primary and its hedge): who won, and the hand-over."""

    winner: Target | None = None
    winner_key: int | None = None
    scopes: dict[int, trio.CancelScope] = attrs.Factory(dict)
    first_or_done: trio.Event = attrs.Factory(trio.Event)
    #: Attempts spent beyond the first (a hedge).
    extra: int = 0
    #: The winner's stream, handed to the outer frame; the attempts still running.
    stream: CommittedStream | None = None
    running: int = 0
    decided: trio.Event = attrs.Factory(trio.Event)
    released: trio.Event = attrs.Factory(trio.Event)

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
class _Attempts:
    """One stream's attempts so far: the picking before each, the accounting after a failure
    (what :meth:`Failover.complete` does inline, shared here by the plain and hedged ways)."""

    failover: Failover
    targets: list[Target]
    deadline: float
    max_attempts: int
    tried: set[str] = attrs.Factory(set)
    last: GatewayError | None = None
    made: int = 0

    async def pick(self) -> tuple[Target, Slot]:
        """The next candidate with its slot (after a backoff when coming back to a tried
        one); raises the last error once the attempts are spent."""
        failover, targets, tried = self.failover, self.targets, self.tried
        if self.made >= self.max_attempts:
            assert self.last is not None
            raise self.last
        if self.made:
            await failover._backoff(self.made, targets, tried, self.deadline)
        now = trio.current_time()
        picked = failover._take_now(targets, tried, now) if now < self.deadline else None
        if picked is None:
            picked = await failover._wait_for_candidate(targets, tried, self.deadline, self.last)
        self.made += 1
        return picked

    def failed(self, target: Target, exc: GatewayError, extra: int) -> None:
        """Before any commit: fail over (return) or raise ``exc`` for the client."""
        if not exc.is_retryable:
            raise exc
        self.last = exc
        self.made += extra
        self.tried.add(target.provider)
        if self.made < self.max_attempts:
            emit_retry(target, exc, self.made - 1)


@asynccontextmanager
async def open_stream(
    failover: Failover, targets: list[Target], call_for: CallFor, providers: Providers
) -> AsyncIterator[CommittedStream]:
    """See the module docstring; :meth:`Failover.open_stream` is the way in."""
    routing = failover.deployments.routing
    deadline = trio.current_time() + routing.deadline_s
    attempts = _Attempts(failover, targets, deadline, routing.max_attempts)
    while True:
        target, slot = await attempts.pick()
        hedge = failover._hedge_delay(target)
        if hedge is not None and attempts.made < attempts.max_attempts and len(targets) > 1:
            commit = _Commit()
            race = _Race(failover, target, attempts.tried, deadline, call_for, providers)
            try:
                async with _hedged(race, slot, targets, hedge, commit) as stream:
                    yield stream
                return
            except GatewayError as exc:
                if commit.winner is not None:
                    raise  # after the commit: the stream ends in-band, never fails over
                attempts.failed(target, exc, commit.extra)
            continue
        # The only contender, inline: its slot, its bound until the first chunk and its
        # upstream context are held across the yield, in the caller's task.
        d = slot.deployment
        started = trio.current_time()
        limit = min(deadline, started + routing.attempt_timeout_s)
        handed = False
        try:
            with slot, trio.CancelScope(deadline=limit) as bounded:
                async with providers.open_stream(target, call_for(target)) as upstream:
                    first = await upstream.next()
                    bounded.deadline = math.inf
                    handed = True
                    yield _commit(failover, target, d, started, first, upstream)
                    return
            raise _no_first_chunk(target, limit, deadline)  # the bound was hit
        except GatewayError as exc:
            if handed:
                raise  # after the commit: the stream ends in-band, never fails over
            failover._failed(d, exc, started)
            attempts.failed(target, exc, 0)
        except BaseException:
            if not handed:
                _abandoned(slot, target, None)
            raise


def _commit(
    failover: Failover,
    target: Target,
    d: Deployment,
    started: float,
    first: list[bytes] | None,
    upstream: PayloadStream,
) -> CommittedStream:
    """The commit: the time to first token counts, and the stream goes to its reader."""
    ttft_ms = (trio.current_time() - started) * 1000
    d.ttft_ms.append(ttft_ms)
    failover.deployments.record(d, True, ttft_ms)
    chunks = 0 if first is None else len(first)
    return CommittedStream(target, first, upstream, failover, d, chunks)


def _no_first_chunk(target: Target, limit: float, deadline: float) -> UpstreamTimeout:
    return UpstreamTimeout(
        f"{target.provider} produced no first chunk within "
        f"{'the routing deadline' if limit == deadline else 'the attempt timeout'}."
    )


def _abandoned(slot: Slot, target: Target, commit: _Commit | None) -> None:
    """An attempt left before its commit (cancelled, or a hedge that lost): free its probe."""
    slot.release_probe()
    telemetry.emit(
        "provider.request.cancelled",
        provider=target.provider,
        reason="hedge lost" if commit is not None and commit.winner else "cancelled",
    )


@asynccontextmanager
async def _contender(
    failover: Failover,
    target: Target,
    slot: Slot,
    key: int,
    deadline: float,
    call_for: CallFor,
    providers: Providers,
    commit: _Commit,
) -> AsyncIterator[CommittedStream | None]:
    """One hedged attempt: connect, wait for the first payloads, then claim the commit and
    yield the stream (None if the other attempt won by a hair)."""
    d = slot.deployment
    started = trio.current_time()
    committed = False
    limit = min(deadline, started + failover.deployments.routing.attempt_timeout_s)
    try:
        # Until the commit, the whole attempt (connect, head, first chunk) is bounded.
        with slot, trio.CancelScope(deadline=limit) as bounded:
            async with providers.open_stream(target, call_for(target)) as upstream:
                first = await upstream.next()
                bounded.deadline = math.inf
                if not commit.claim(target, key):
                    slot.release_probe()
                    yield None  # another hedged attempt won
                    return
                committed = True
                yield _commit(failover, target, d, started, first, upstream)
                return
        raise _no_first_chunk(target, limit, deadline)  # the bound was hit
    except GatewayError as exc:
        if committed:
            raise
        failover._failed(d, exc, started)
        raise
    except BaseException:
        if not committed:
            _abandoned(slot, target, commit)
        raise


@attrs.frozen
class _Race:
    """What the hedged contenders share besides the commit."""

    failover: Failover
    primary: Target
    tried: set[str]
    deadline: float
    call_for: CallFor
    providers: Providers
    errors: list[GatewayError] = attrs.Factory(list)
    after_commit: list[GatewayError] = attrs.Factory(list)

    async def run(self, commit: _Commit, target: Target, slot: Slot, key: int) -> None:
        """One contender: hand a winning stream to the outer frame, hold it open until the
        reader is done, and record a failure for the outer frame to raise."""
        with trio.CancelScope() as scope:
            commit.scopes[key] = scope
            if commit.winner is not None:
                scope.cancel()  # the other attempt won before this one started
            try:
                async with _contender(
                    self.failover,
                    target,
                    slot,
                    key,
                    self.deadline,
                    self.call_for,
                    self.providers,
                    commit,
                ) as stream:
                    if stream is not None:
                        commit.stream = stream
                        commit.decided.set()
                        await commit.released.wait()  # the reader is done with the stream
            except GatewayError as exc:
                if commit.winner_key == key:
                    self.after_commit.append(exc)  # raised by the outer frame
                    return
                self.errors.append(exc)
                if target is not self.primary:
                    self.tried.add(target.provider)
            finally:
                if key == 0:
                    commit.first_or_done.set()
                commit.running -= 1
                if not commit.running:
                    commit.decided.set()


@asynccontextmanager
async def _hedged(
    race: _Race, slot: Slot, targets: list[Target], delay: float, commit: _Commit
) -> AsyncIterator[CommittedStream]:
    """Race ``race.primary`` against a second candidate started after ``delay``.

    Raises the primary's error when no attempt committed (the caller then fails over as
    usual), or the winner's error after it committed. ``commit.extra`` counts the hedge;
    every other deployment that failed here is added to ``tried``."""
    thrown: GatewayError | None = None
    # The slots are taken: each task enters its slot before its first checkpoint.
    async with trio.open_nursery() as nursery:
        commit.running = 1
        nursery.start_soon(race.run, commit, race.primary, slot, 0)
        with trio.move_on_after(delay):
            await commit.first_or_done.wait()
        if commit.winner is None and not race.errors:
            picked = race.failover._hedge_now(race.primary, targets, race.tried, delay)
            if picked is not None:
                commit.extra = 1
                commit.running += 1
                nursery.start_soon(race.run, commit, *picked, 1)
        await commit.decided.wait()
        if commit.stream is not None:
            try:
                yield commit.stream
            except GatewayError as exc:
                thrown = exc  # the reader's: re-raised outside the nursery, as itself
            finally:
                commit.released.set()
    if thrown is not None:
        raise thrown
    if race.after_commit:
        raise race.after_commit[0]
    if commit.winner is None:
        errors = race.errors
        raise errors[0] if errors else UpstreamTimeout("No hedged attempt produced a chunk.")
