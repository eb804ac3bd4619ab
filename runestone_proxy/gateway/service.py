"""The request service: the one flow every generation request and every queued job takes.

    accept   authenticate (the handler's call), parse the body once, validate, route:
             every 400/401/404 a body can earn, before any answer, live or queued
    admit    rate limits, idempotent replay, capacity (:mod:`.admission`): serve now,
             or park as a durable job (a :class:`~.admission.Parked` to answer 202 with)
    plan     deployment order (live state, so only now), and the forward-or-rewrite
             decision, made once per request (:meth:`Service._plan`)
    complete a whole answer through failover, metadata spliced in -> :class:`Answer`
      | stream  ``async with service.open_stream(gen) as stream:`` a :class:`Stream` whose
             first payloads are already in hand (failover and hedging before the first
             byte, :mod:`.failover_stream`); the handler relays it
    settle   TPM reconcile with the usage the answer reported, or the reservation given
             back; ``stream.complete`` / ``stream.error``

It knows nothing of HTTP: the API handler passes plain values (a :class:`Generation`) and
gets values back. It depends on gateway interfaces only (the upstream :class:`Transport`
behind :class:`~.pipeline.Providers`, the :class:`~.queue.JobQueue`), so a second transport
or another queue plugs in without touching it. ``run_job`` is the drainer's runner (the
same plan and failover, answered whole; a job is held to its tenant's budgets when it runs,
not when it is parked); ``reload`` swaps a validated config in.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from runestone_proxy import telemetry
from runestone_proxy.errors import AuthenticationFailed, InvalidParam
from runestone_proxy.gateway.accounting import (
    Attempts,
    account_whole,
    answer_counts,
    failure,
)
from runestone_proxy.gateway.admission import Admission, Parked
from runestone_proxy.gateway.auth import KeyRejected, Principal
from runestone_proxy.gateway.budget import NO_BUDGETS, estimate
from runestone_proxy.gateway.budget_hold import NO_HOLD, Hold
from runestone_proxy.gateway.metadata import splice_metadata
from runestone_proxy.gateway.overflow import Job, JobOutcome
from runestone_proxy.gateway.rate_wire import Headers
from runestone_proxy.gateway.request_body import check_runestone_fields, parse_object, validate
from runestone_proxy.gateway.routing import (
    Resolution,
    RoutingTable,
    Target,
    constraints_for,
    emit_decision,
    filter_and_order,
)
from runestone_proxy.gateway.service_state import ServiceState
from runestone_proxy.gateway.service_stream import OpenStream, Stream
from runestone_proxy.gateway.webhooks import check_webhook_url
from runestone_proxy.providers.base import RUNESTONE_FIELDS, Endpoint, ProviderCall
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_request import estimate_input_tokens

__all__ = ["Answer", "Generation", "OpenStream", "Parked", "Route", "Service", "Stream"]


@attrs.define(eq=False, slots=True)
class Route:
    """A validated body's routing decision, before any live state: the resolution and its
    capable candidates in policy order (``Service.route``; ``Service._plan`` carries it out).
    Not frozen, like the other per-request values here: a frozen attrs class pays an
    ``object.__setattr__`` per field on every request. Nothing changes it after ``route``."""

    resolution: Resolution
    ordered: list[Target]
    reason: str
    policy: str
    #: The table it was resolved in: a reload while the request waited for a slot re-routes.
    table: RoutingTable


@attrs.define(eq=False, slots=True)
class Generation:
    """One accepted generation request, as plain values (``Service.accept`` builds it)."""

    principal: Principal
    endpoint: Endpoint
    body: dict[str, Any]
    raw: bytes
    route: Route
    request_id: str
    #: Answered as a stream (SSE), else whole.
    stream: bool
    #: Park it as a job (202) rather than wait or refuse, if its tenant is full.
    wants_async: bool
    webhook_url: str | None
    #: The ``Idempotency-Key`` header as it came (checked at admission, where it is used).
    idempotency_key: bytes | None
    #: The completion tokens a TPM estimate assumes.
    output_tokens: int
    #: Client headers a native provider receives as sent (``ProviderCall.headers``).
    headers: tuple[tuple[bytes, bytes], ...] = ()


@attrs.define(eq=False, slots=True)
class Answer:
    """A whole answer: its body (Runestone's metadata spliced in), who gave it under which
    policy, and the key's ``x-ratelimit-*`` headers."""

    target: Target
    policy: str
    body: bytes
    headers: Headers


@attrs.define(eq=False)
class Service(ServiceState):
    """The flow; its state (the current view of the config, swapped whole on reload) is
    :class:`~.service_state.ServiceState`'s."""

    def authenticate(
        self,
        authorization: bytes | None,
        x_api_key: bytes | None,
        *,
        request_id: str,
        path: str,
        client: str | None,
    ) -> Principal:
        """The caller's principal, or 401 (``auth.failure`` names the key's mask)."""
        try:
            return self.keys.authenticate(authorization, x_api_key)
        except AuthenticationFailed as exc:
            rejected = exc if isinstance(exc, KeyRejected) else None
            telemetry.emit(
                "auth.failure",
                request_id=request_id,
                path=path,
                client=client,
                reason=exc.message,
                key_mask=rejected.key_mask if rejected else "-",
                tenant=rejected.tenant if rejected else None,
            )
            raise

    def accept(
        self,
        principal: Principal,
        endpoint: Endpoint,
        raw: bytes,
        request_id: str,
        *,
        force_stream: bool = False,
        prefers_async: bool = False,
        idempotency_key: bytes | None = None,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> Generation:
        """Parse the body once, validate and route it: every 400/404 before any answer, live
        or queued (a body the live path refuses is refused at once, never parked to fail
        later). ``force_stream``: the legacy ``/v1/chat/stream``, always SSE and async."""
        body = parse_object(raw)
        route = self.route(endpoint, body, len(raw))
        if self.keys.open and isinstance(body.get("tenant_id"), str) and body["tenant_id"]:
            # With no keys configured, the legacy ``tenant_id`` field names the tenant.
            principal = attrs.evolve(principal, tenant=body["tenant_id"])
        webhook = check_webhook_url(body.get("webhook_url"))
        embeddings = endpoint == "embeddings"
        return Generation(
            principal,
            endpoint,
            body,
            raw,
            route,
            request_id,
            not embeddings and (force_stream or body.get("stream") is True),
            force_stream or webhook is not None or prefers_async,
            webhook,
            idempotency_key,
            0 if embeddings else self.default_output_tokens,
            headers,
        )

    def route(self, endpoint: Endpoint, body: Mapping[str, Any], raw_len: int) -> Route:
        """Validate what Runestone reads and resolve the model to the capable candidates:
        every 400/404 a body can earn, with nothing changed. The live path calls it before
        it takes a slot or answers 202, the drainer before it runs a job."""
        validate(endpoint, body)
        check_runestone_fields(body)
        resolution = self.routing.resolve(body["model"], body.get("provider"))
        policy = self.policy
        constraints = constraints_for(endpoint, body, self.default_output_tokens, raw_len)
        ordered, reason = filter_and_order(resolution.targets, constraints, policy)
        return Route(resolution, ordered, reason, policy, self.routing)

    # --- serving -----------------------------------------------------------------------------

    async def complete(self, gen: Generation) -> Answer | Parked:
        """Admit, then answer whole (or park: a :class:`Parked` job)."""
        admission = Admission(self, gen)
        async with admission as parked:
            if parked is not None:
                return parked
            # _complete inline: one coroutine less per request (run_job shares _complete).
            request_id = gen.request_id
            route = gen.route
            if route.table is not self.routing:  # reloaded while it waited: see _route
                route = self._route(gen)
            model = gen.body.get("model")
            targets, call_for, policy = self._plan(
                gen.endpoint, route, gen.body, gen.raw, request_id, False, headers=gen.headers
            )
            attempts = Attempts(call_for)
            started = time.perf_counter()
            who = (self.ledger, request_id, gen.principal.tenant, gen.principal.key_id)
            hold = admission.budget
            try:
                target, answer = await self.failover.complete(targets, attempts, self.providers)
            except BaseException as exc:
                status, outcome = failure(exc)
                account_whole(
                    *who, gen.endpoint, model, attempts, started, None, status, outcome, hold=hold
                )
                raise
            counts = answer_counts(gen.endpoint, answer)
            admission.usage = None if counts is None else counts.total
            account_whole(*who, gen.endpoint, model, attempts, started, counts, hold=hold)
            answer = splice_metadata(answer, target.provider, policy, request_id)
            return Answer(target, policy, answer, admission.rl_headers)

    def open_stream(self, gen: Generation) -> OpenStream:
        """``async with service.open_stream(gen) as stream:`` admit, then open the stream
        through failover (``stream`` is a :class:`Stream`, or the :class:`Parked` job). The
        block relays it; the stream's end (clean or an in-band error) is settled on exit."""
        return OpenStream(self, gen)

    async def count_tokens(
        self, raw: bytes, request_id: str, headers: tuple[tuple[bytes, bytes], ...] = ()
    ) -> tuple[Target, bytes, bool]:
        """``POST /v1/messages/count_tokens``: ``(target, body, estimated)``. Native on the
        routed candidates that speak the Messages dialect (Anthropic counts, through the
        same failover); where none does, Runestone's documented estimate
        (:func:`~runestone_proxy.providers.messages_request.estimate_input_tokens`), with no
        provider call. Not a generation: no capacity slot, no rate-limit charge."""
        body = parse_object(raw)
        route = self.route("count_tokens", body, len(raw))
        native = [t for t in route.ordered if self.providers.runtime(t).speaks_messages]
        if not native:
            estimate = estimate_input_tokens(body)
            return route.ordered[0], dumps({"input_tokens": estimate}), True
        if len(native) != len(route.ordered):
            route = attrs.evolve(route, ordered=native)
        targets, call_for, _ = self._plan(
            "count_tokens", route, body, raw, request_id, False, headers=headers
        )
        target, answer = await self.failover.complete(targets, call_for, self.providers)
        return target, answer, False

    async def run_job(self, job: Job) -> JobOutcome:
        """The overflow drainer's runner: the same flow as a live request, answered whole (a
        queued stream's result is stored as the non-stream completion; a Messages job's as
        the whole Anthropic Message, native or translated). The client headers kept with the
        job reach a native provider as a live call's would. The drainer already holds the
        tenant's slot; failures raise and the drainer decides on retries."""
        if job.endpoint not in ("chat", "completions", "embeddings", "messages", "responses"):
            raise InvalidParam(f"Unknown job endpoint {job.endpoint!r}.")
        endpoint: Endpoint = job.endpoint  # type: ignore[assignment]  # checked above
        body = parse_object(job.body)
        route = self.route(endpoint, body, len(job.body))
        hold = NO_HOLD
        if self.budgets.applies(job.tenant, NO_BUDGETS):  # a job keeps no key: its tenant's
            output = 0 if endpoint == "embeddings" else self.default_output_tokens
            est = estimate(body, output, [t.entry for t in route.ordered])
            hold, _ = await self.budgets.reserve(
                job.tenant, "", "-", NO_BUDGETS, est, job.request_id
            )
        try:
            _, _, answer = await self._complete(
                endpoint,
                route,
                body,
                job.body,
                job.request_id,
                headers=job.headers,
                tenant=job.tenant,
                hold=hold,
            )
        finally:
            hold.release()  # unless its ledger record settled it
        return JobOutcome(200, answer)

    # --- the plan ------------------------------------------------------------------------------

    def _route(self, gen: Generation) -> Route:
        """The request's route, again if a reload swapped the table while it waited for a
        slot (its providers may be gone)."""
        route = gen.route
        if route.table is not self.routing:
            route = self.route(gen.endpoint, gen.body, len(gen.raw))
        return route

    def _plan(
        self,
        endpoint: Endpoint,
        route: Route,
        body: dict[str, Any],
        raw: bytes,
        request_id: str,
        stream: bool,
        account_usage: bool = False,
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
    ) -> tuple[list[Target], Callable[[Target], ProviderCall], str]:
        """Order the routed candidates (deployment groups: live state, so only now) and say
        how to call each: the forward-or-rewrite decision, made once. Pops Runestone's own
        fields from ``body``; ``raw`` is forwarded untouched where nothing needs a rewrite.
        ``account_usage``: ask a streaming provider for usage even if the client did not."""
        extras = RUNESTONE_FIELDS.intersection(body)
        policy = route.policy
        targets = self.deployments.order_groups(route.ordered)
        for name in extras:
            body.pop(name)
        stream_flag = body.get("stream") is True
        if stream and not stream_flag:
            body["stream"] = True
        elif not stream and "stream" in body:
            body.pop("stream")
            body.pop("stream_options", None)
        options = body.get("stream_options")
        include_usage = bool(stream and isinstance(options, dict) and options.get("include_usage"))
        may_forward = not extras and stream == stream_flag

        def call_for(target: Target) -> ProviderCall:
            forward = may_forward and target.upstream_model == body["model"]
            return ProviderCall(
                endpoint=endpoint,
                body=body,
                model=target.upstream_model,
                stream=stream,
                include_usage=include_usage,
                account_usage=account_usage,
                raw=raw if forward else None,
                request_id=request_id,
                headers=headers,
            )

        emit_decision(policy, route.resolution, targets, route.reason, request_id)
        return targets, call_for, policy

    async def _complete(
        self,
        endpoint: Endpoint,
        route: Route,
        body: dict[str, Any],
        raw: bytes,
        request_id: str,
        *,
        headers: tuple[tuple[bytes, bytes], ...] = (),
        tenant: str,
        hold: Hold = NO_HOLD,
    ) -> tuple[Target, str, bytes]:
        """A queued job's whole answer through failover, with Runestone's metadata spliced
        in, and its ledger record (a job keeps no key id: its key is ``""``)."""
        model = body.get("model")
        targets, call_for, policy = self._plan(
            endpoint, route, body, raw, request_id, False, headers=headers
        )
        attempts = Attempts(call_for)
        started = time.perf_counter()
        who = (self.ledger, request_id, tenant, "")
        try:
            target, answer = await self.failover.complete(targets, attempts, self.providers)
        except BaseException as exc:
            status, outcome = failure(exc)
            account_whole(
                *who, endpoint, model, attempts, started, None, status, outcome, hold=hold
            )
            raise
        counts = answer_counts(endpoint, answer)
        account_whole(*who, endpoint, model, attempts, started, counts, hold=hold)
        return target, policy, splice_metadata(answer, target.provider, policy, request_id)
