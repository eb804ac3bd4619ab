"""The stream half of the request service: the :class:`Stream` a handler relays, and
:class:`OpenStream`, what ``Service.open_stream`` returns: the admission around the
failover's stream, the stream's end settled on exit (the TPM reconcile, ``stream.complete``
/ ``stream.error``, and its ledger record).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from types import TracebackType
from typing import TYPE_CHECKING, Any

import attrs

from runestone_proxy import telemetry
from runestone_proxy.gateway.accounting import Attempts, account, failure, stream_counts
from runestone_proxy.gateway.admission import Admission, Parked
from runestone_proxy.gateway.failover_stream import CommittedStream
from runestone_proxy.gateway.ledger import Outcome
from runestone_proxy.gateway.rate_wire import Headers
from runestone_proxy.gateway.routing import Target

if TYPE_CHECKING:
    from runestone_proxy.gateway.service import Generation, Service

__all__ = ["OpenStream", "Stream"]


@attrs.define(eq=False, slots=True)
class Stream:
    """An open stream (``Service.open_stream``): ``first`` payloads already received,
    ``await next()`` for the following ones (None at the end; a ``GatewayError`` after the
    commit ends it in-band), ``usage`` as reported, and what the handler needs for headers."""

    target: Target
    policy: str
    #: The key's ``x-ratelimit-*`` headers.
    headers: Headers
    first: list[bytes] | None
    next: Callable[[], Awaitable[list[bytes] | None]]
    committed: CommittedStream

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.committed.usage

    @property
    def final(self) -> bytes | None:
        """The whole answer object the stream ended with (a Responses stream's last
        ``response``), else None."""
        return self.committed.stream.final


class OpenStream:
    """The async context manager :meth:`Service.open_stream` returns: the admission around
    the failover's stream. A class rather than a generator context manager: it wraps every
    stream, and a generator costs a few microseconds more per use."""

    __slots__ = (
        "admission",
        "attempts",
        "gen",
        "model",
        "opened",
        "service",
        "started",
        "stream",
        "upstream",
    )

    def __init__(self, service: Service, gen: Generation) -> None:
        self.service = service
        self.gen = gen
        self.admission = Admission(service, gen)
        self.upstream: AbstractAsyncContextManager[CommittedStream] | None = None
        self.stream: Stream
        self.started = 0.0
        self.opened = 0.0
        self.attempts: Attempts | None = None
        self.model = gen.body.get("model")

    async def __aenter__(self) -> Stream | Parked:
        service, gen, admission = self.service, self.gen, self.admission
        parked = await admission.__aenter__()
        if parked is not None:
            return parked
        try:
            # The ledger (and a tokens-per-minute limit) needs the real usage: the provider
            # is asked for it on every stream (the client sees it only if it asked too).
            targets, call_for, policy = service._plan(
                gen.endpoint,
                service._route(gen),
                gen.body,
                gen.raw,
                gen.request_id,
                True,
                True,
                headers=gen.headers,
            )
            attempts = self.attempts = Attempts(call_for)
            self.opened = time.perf_counter()
            upstream = service.failover.open_stream(targets, attempts, service.providers)
            up = await upstream.__aenter__()
        except BaseException as exc:
            if self.attempts is not None:
                self._account(None, *failure(exc))
            await admission.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        self.upstream = upstream
        self.started = time.perf_counter()
        stream = self.stream = Stream(
            up.target, policy, admission.rl_headers, up.first, up.next, up
        )
        return stream

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        upstream = self.upstream
        if upstream is not None:
            try:
                up = self.stream.committed
                if exc is None:
                    _stream_ended(self.gen, up, self.started)
                    if up.ended:  # what the translator recorded, whether the client saw it
                        self.admission.usage = _total_tokens(up.usage)
                if up.ended:
                    self._account(up, 200, "ok")
                elif up.error is not None:
                    self._account(up, 200, "error")  # ended in-band, after a 200 start
                else:  # the client went away (or the handler stopped reading)
                    self._account(up, 499, "cancelled")
                await upstream.__aexit__(exc_type, exc, tb)
            except BaseException as raised:
                await self.admission.__aexit__(type(raised), raised, raised.__traceback__)
                raise
        await self.admission.__aexit__(exc_type, exc, tb)

    def _account(self, up: CommittedStream | None, status: int, outcome: Outcome) -> None:
        """The stream's ledger record: its usage (or the estimate), once it is over."""
        gen = self.gen
        assert self.attempts is not None
        if up is None:
            counts, estimated = None, False
        else:
            counts, estimated = stream_counts(up.usage, gen.body, up.chunks)
        account(
            self.service.ledger,
            request_id=gen.request_id,
            tenant=gen.principal.tenant,
            key_id=gen.principal.key_id,
            endpoint=gen.endpoint,
            model=self.model,
            attempts=self.attempts,
            counts=counts,
            estimated=estimated,
            status=status,
            outcome=outcome,
            stream=True,
            started=self.opened,
            ttfb=self.started or None,
            hold=self.admission.budget,
        )


def _stream_ended(gen: Generation, up: CommittedStream, started: float) -> None:
    """``stream.error`` or ``stream.complete``, once the handler is done with the stream."""
    if up.error is not None:
        telemetry.emit(
            "stream.error",
            provider=up.target.provider,
            request_id=gen.request_id,
            code=up.error.code,
            chunks=up.chunks,
        )
    elif up.ended:
        telemetry.emit(
            "stream.complete",
            provider=up.target.provider,
            request_id=gen.request_id,
            chunks=up.chunks,
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )


def _total_tokens(usage: Mapping[str, Any] | None) -> int | None:
    total = usage.get("total_tokens") if usage is not None else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None
