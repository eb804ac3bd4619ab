"""The OpenAI-compatible API: ``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``, ``/v1/models``, ``/v1/models/{model}`` and the legacy ``/v1/chat/stream``.

Each generation request goes: authenticate -> parse the JSON body once -> validate -> resolve
the model to provider targets (both before a slot is taken or a 202 given, so the live and
the queued path refuse the same bodies at once) -> call the provider (whole, or streamed
through the SSE relay) -> answer in OpenAI's shapes with Runestone's metadata
(``x-runestone-provider``, ``x-runestone-routing-policy``; top-level ``provider``,
``routing_policy``, ``request_id`` in non-stream bodies).

The relay starts the client's response only once the provider produced its first payloads,
so an error before that is answered as an ordinary error envelope with its status; after
it, the stream ends with ``data: {"error": ...}`` and ``data: [DONE]`` (never a made-up
``finish_reason``). Every event is flushed as it is written; nothing buffers a whole stream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, ConfigError
from runestone_proxy.errors import (
    AuthenticationFailed,
    GatewayError,
    InvalidParam,
    ModelNotFound,
    RateLimited,
)
from runestone_proxy.gateway import ratelimit
from runestone_proxy.gateway.auth import KeyRejected, KeyStore, Principal
from runestone_proxy.gateway.capacity import Capacity
from runestone_proxy.gateway.deployments import Deployments
from runestone_proxy.gateway.failover import Failover
from runestone_proxy.gateway.limits import Enqueue
from runestone_proxy.gateway.overflow import Job, JobOutcome, check_webhook_url
from runestone_proxy.gateway.pipeline import PayloadStream, Providers
from runestone_proxy.gateway.queue import JobQueue
from runestone_proxy.gateway.ratelimit import RateLimiter
from runestone_proxy.gateway.routing import (
    Resolution,
    RoutingTable,
    Target,
    constraints_for,
    emit_decision,
    filter_and_order,
)
from runestone_proxy.protocol.sse import DONE, encode_data
from runestone_proxy.providers.base import RUNESTONE_FIELDS, Endpoint, ProviderCall
from runestone_proxy.server import aliases
from runestone_proxy.server.http import JSON_HEADERS, SSE_HEADERS, Request, Responder
from runestone_proxy.server.jobs_api import accept_async, replay_idempotent
from runestone_proxy.server.request_body import check_runestone_fields, parse_object
from runestone_proxy.server.router import Router
from runestone_proxy.server.upstream import UpstreamPool

log = structlog.get_logger("runestone.api")


_REQUIRED = {"chat": "messages", "completions": "prompt", "embeddings": "input"}


def validate(endpoint: Endpoint, body: Mapping[str, Any]) -> None:
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise InvalidParam("you must provide a model parameter", param="model")
    field = _REQUIRED[endpoint]
    value = body.get(field)
    if value is None:
        raise InvalidParam(
            f"Missing required parameter: '{field}'.",
            param=field,
            code="missing_required_parameter",
        )
    if endpoint == "chat":
        if not isinstance(value, list) or not value:
            raise InvalidParam("'messages' must be a non-empty array.", param="messages")
        for index, message in enumerate(value):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise InvalidParam(
                    f"Invalid message at index {index}: each message needs a 'role'.",
                    param=f"messages[{index}]",
                )
    for flag in ("stream",):
        if flag in body and not isinstance(body[flag], bool):
            raise InvalidParam(f"'{flag}' must be a boolean.", param=flag)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidParam("'stream_options' must be an object.", param="stream_options")


@attrs.frozen
class Route:
    """A validated body's routing decision, before any live state: the resolution and its
    capable candidates in policy order (``Api._route``; ``Api._plan`` carries it out)."""

    resolution: Resolution
    ordered: list[Target]
    reason: str
    policy: str
    #: The table it was resolved in: a reload while the request waited for a slot re-routes.
    table: RoutingTable


def splice_metadata(body: bytes, fields: bytes) -> bytes:
    """Add top-level fields to a JSON object without re-encoding it: ``{...}`` -> ``{...,f}``."""
    end = body.rstrip()
    if not end.endswith(b"}"):
        return body
    inner = end[:-1].rstrip()
    sep = b"" if inner.endswith(b"{") else b","
    return inner + sep + fields + b"}"


@attrs.define(eq=False)
class Api:
    """The API's current view of the config; ``reload`` swaps it whole (in-flight requests
    keep the objects they already hold)."""

    keys: KeyStore
    routing: RoutingTable
    providers: Providers
    policy: str
    env: Mapping[str, str]
    deployments: Deployments
    failover: Failover
    default_output_tokens: int
    config: Config
    #: RUNESTONE_ALIASES_PATH, when set; its aliases win over config.toml's.
    aliases_path: Path | None = None
    #: The aliases the file gave at its last valid read.
    file_aliases: dict[str, str] = attrs.field(kw_only=True, factory=dict)
    capacity: Capacity = attrs.field(kw_only=True)
    ratelimiter: RateLimiter = attrs.field(kw_only=True, factory=RateLimiter)
    #: Parks requests durably (202) when their tenant is full and they asked for async.
    store: JobQueue | None = attrs.field(kw_only=True, default=None)

    @classmethod
    def build(cls, config: Config, env: Mapping[str, str], pool: UpstreamPool) -> Api:
        """Raises :class:`~runestone_proxy.config.ConfigError` for a bad aliases file."""
        path = aliases.path_from_env(env)
        extra = None
        if path is not None:
            try:
                extra = _load_aliases(path, config)
            except aliases.AliasError as exc:
                raise ConfigError(str(path), [str(exc)]) from None
        deployments = Deployments.from_config(config)
        return cls(
            KeyStore.build(config, env),
            RoutingTable.build(config, env, extra),
            Providers.build(config, env, pool),
            config.routing.policy,
            env,
            deployments,
            Failover(deployments),
            config.routing.default_output_tokens,
            config,
            path,
            file_aliases=extra or {},
            capacity=Capacity.from_config(config),
        )

    def reload_aliases(self) -> bool:
        """Re-read the aliases file; install it only if valid. Returns whether it was."""
        if self.aliases_path is None:
            return False
        try:
            extra = _load_aliases(self.aliases_path, self.config)
        except aliases.AliasError as exc:
            log.error("aliases.reload.failed", path=str(self.aliases_path), error=str(exc))
            return False
        self.file_aliases = extra
        self.routing = RoutingTable.build(self.config, self.env, extra)
        log.info("aliases.reloaded", path=str(self.aliases_path), count=len(extra))
        return True

    def reload(self, config: Config) -> None:
        """Swap in a validated config. Each table is replaced whole, so a request in flight
        keeps the resolution, providers and keys it started with."""
        self.config = config
        self.keys = KeyStore.build(config, self.env)
        if not self.reload_aliases():
            # A bad file keeps the aliases it had, as long as they still fit the new config.
            try:
                aliases.validate(
                    {**config.aliases, **self.file_aliases},
                    [p.name for p in config.providers],
                    [m.id for m in config.models],
                )
            except aliases.AliasError as exc:
                log.error("aliases.dropped", error=str(exc))
                self.file_aliases = {}
            self.routing = RoutingTable.build(config, self.env, self.file_aliases)
        self.providers = Providers.build(config, self.env, self.providers.pool)
        self.policy = config.routing.policy
        self.default_output_tokens = config.routing.default_output_tokens
        self.deployments.reconfigure(config)
        self.capacity.reconfigure(config)

    def add_routes(self, router: Router) -> None:
        router.add("POST", "/v1/chat/completions", self.chat_completions)
        router.add("POST", "/v1/completions", self.completions)
        router.add("POST", "/v1/embeddings", self.embeddings)
        router.add("POST", "/v1/chat/stream", self.legacy_chat_stream)
        router.add("GET", "/v1/models", self.list_models)
        router.add("GET", "/v1/models/{model}", self.get_model)

    # --- handlers ------------------------------------------------------------------------------

    async def chat_completions(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "chat")

    async def completions(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "completions")

    async def embeddings(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "embeddings")

    async def legacy_chat_stream(self, request: Request, responder: Responder) -> None:
        await self._generate(request, responder, "chat", force_stream=True)

    def authenticate(self, request: Request) -> Principal:
        try:
            principal = self.keys.authenticate(
                request.header(b"authorization"), request.header(b"x-api-key")
            )
        except AuthenticationFailed as exc:
            rejected = exc if isinstance(exc, KeyRejected) else None
            telemetry.emit(
                "auth.failure",
                request_id=request.request_id,
                path=request.path,
                client=request.client,
                reason=exc.message,
                key_mask=rejected.key_mask if rejected else "-",
                tenant=rejected.tenant if rejected else None,
            )
            raise
        request.context["principal"] = principal
        return principal

    async def list_models(self, request: Request, responder: Responder) -> None:
        self.authenticate(request)
        data = [
            _model_object(mid, owner, alias) for mid, owner, alias in self.routing.listed_models()
        ]
        body = json.dumps({"object": "list", "data": data}, separators=(",", ":")).encode()
        await responder.respond(200, JSON_HEADERS, body)

    async def get_model(self, request: Request, responder: Responder) -> None:
        self.authenticate(request)
        wanted = request.path_params["model"]
        for mid, owner, alias in self.routing.listed_models():
            if mid == wanted:
                body = json.dumps(_model_object(mid, owner, alias), separators=(",", ":"))
                await responder.respond(200, JSON_HEADERS, body.encode())
                return
        raise ModelNotFound(
            f"The model `{wanted}` does not exist or you do not have access to it.", param="model"
        )

    # --- generation ----------------------------------------------------------------------------

    async def _generate(
        self, request: Request, responder: Responder, endpoint: Endpoint, force_stream: bool = False
    ) -> None:
        """Admit (rate limits, idempotency, capacity), then serve live or park as a job."""
        principal, body, raw, route = await self._accept(request, endpoint)
        webhook = check_webhook_url(body.get("webhook_url"))
        wants_async = force_stream or webhook is not None or _prefers_async(request)
        limits = principal.limits
        output_tokens = 0 if endpoint == "embeddings" else self.default_output_tokens
        reservation, rl_headers = self.ratelimiter.admit(
            principal, body, output_tokens, trio.current_time(), request.request_id
        )
        usage: list[int | None] = [None]
        admitted = False
        try:
            if self.store is not None and await replay_idempotent(
                self.store, request, responder, principal
            ):
                admitted = True  # answered from the stored job: it counts
                return
            async with self.capacity.slot(
                principal.tenant,
                wants_async=wants_async,
                key_mask=principal.key_mask,
                request_id=request.request_id,
            ) as decision:
                if type(decision) is Enqueue:  # no slot held: a job runs when one frees
                    if self.store is None:
                        raise _no_queue(principal.tenant)
                    admitted = True  # a durable job is served later: it counts now
                    await accept_async(
                        self.store, request, responder, principal, endpoint, raw, webhook
                    )
                    return
                admitted = True  # Admit, or a Wait that got its slot
                await self._serve(
                    request, responder, endpoint, route, body, raw, force_stream, rl_headers, usage
                )
        except GatewayError as exc:
            # Every answer carries the key's x-ratelimit-* headers. A request refused for
            # capacity was never served: its quota is given back, and its 429 says so.
            if not admitted:
                rl_headers = self.ratelimiter.cancel(reservation, limits, trio.current_time())
            exc.headers = (*exc.headers, *rl_headers)
            raise
        finally:
            if admitted:
                self.ratelimiter.reconcile(reservation, usage[0], trio.current_time())
            else:  # refused, or the client left while it waited for a slot
                self.ratelimiter.cancel(reservation, limits, trio.current_time())

    async def _accept(
        self, request: Request, endpoint: Endpoint
    ) -> tuple[Principal, dict[str, Any], bytes, Route]:
        """Authenticate, read and parse the body once, validate and route it: every 400/401/404
        before any answer, live or queued (a body the live path refuses is refused at once,
        never accepted with 202 to fail later)."""
        principal = self.authenticate(request)
        # bytes() is free for bytes; a body that arrived as one h11 chunk is a bytearray,
        # which the upstream pool would take for a streamed (async-iterable) body.
        raw = bytes(await request.body())
        body = parse_object(raw)
        route = self._route(endpoint, body, len(raw))
        if self.keys.open and isinstance(body.get("tenant_id"), str) and body["tenant_id"]:
            # With no keys configured, the legacy ``tenant_id`` field names the tenant.
            principal = attrs.evolve(principal, tenant=body["tenant_id"])
            request.context["principal"] = principal
        return principal, body, raw, route

    def _route(self, endpoint: Endpoint, body: Mapping[str, Any], raw_len: int) -> Route:
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

    def _plan(
        self,
        endpoint: Endpoint,
        route: Route,
        body: dict[str, Any],
        raw: bytes,
        stream: bool,
        request_id: str,
        account_usage: bool = False,
    ) -> tuple[list[Target], Callable[[Target], ProviderCall], str]:
        """Order the routed candidates (deployment groups: live state, so only now) and say
        how to call each. Pops Runestone's own fields from ``body``; ``raw`` is forwarded
        untouched where nothing needs a rewrite. ``account_usage``: ask a streaming provider
        for usage even if the client did not."""
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
            )

        emit_decision(policy, route.resolution, targets, route.reason, request_id)
        return targets, call_for, policy

    async def _complete(
        self, endpoint: Endpoint, route: Route, body: dict[str, Any], raw: bytes, request_id: str
    ) -> tuple[Target, str, bytes]:
        """A whole answer through failover, with Runestone's metadata spliced in."""
        targets, call_for, policy = self._plan(endpoint, route, body, raw, False, request_id)
        target, answer = await self.failover.complete(targets, call_for, self.providers)
        fields = _meta_prefix(target.provider, policy) + json.dumps(request_id).encode()
        return target, policy, splice_metadata(answer, fields)

    async def _serve(
        self,
        request: Request,
        responder: Responder,
        endpoint: Endpoint,
        route: Route,
        body: dict[str, Any],
        raw: bytes,
        force_stream: bool,
        extra_headers: tuple[tuple[bytes, bytes], ...],
        usage: list[int | None],
    ) -> None:
        """Route and call the provider with the tenant's slot held; ``usage[0]`` gets the
        tokens the answer reports (for the TPM reconcile)."""
        if route.table is not self.routing:  # reloaded while it waited: its providers may be gone
            route = self._route(endpoint, body, len(raw))
        stream = endpoint != "embeddings" and (force_stream or body.get("stream") is True)
        if stream:
            # A tokens-per-minute limit needs the real usage to reconcile its estimate: ask
            # the provider for it (the client sees it only if it asked too).
            principal = request.context["principal"]
            tpm = isinstance(principal, Principal) and principal.limits.tpm is not None
            targets, call_for, policy = self._plan(
                endpoint, route, body, raw, True, request.request_id, account_usage=tpm
            )
            await self._relay(request, responder, targets, call_for, policy, extra_headers, usage)
            return
        target, policy, answer = await self._complete(
            endpoint, route, body, raw, request.request_id
        )
        usage[0] = ratelimit.usage_tokens(answer)
        headers = (*JSON_HEADERS, *_meta(target, policy), *extra_headers)
        await responder.respond(200, headers, answer)

    async def run_job(self, job: Job) -> JobOutcome:
        """The overflow drainer's runner: the same pipeline as a live request, answered
        whole (a queued stream's result is stored as the non-stream completion). The drainer
        already holds the tenant's slot; failures raise and the drainer decides on retries."""
        if job.endpoint not in ("chat", "completions", "embeddings"):
            raise InvalidParam(f"Unknown job endpoint {job.endpoint!r}.")
        endpoint: Endpoint = job.endpoint  # type: ignore[assignment]  # checked above
        body = parse_object(job.body)
        route = self._route(endpoint, body, len(job.body))
        _, _, answer = await self._complete(endpoint, route, body, job.body, job.request_id)
        return JobOutcome(200, answer)

    async def _relay(
        self,
        request: Request,
        responder: Responder,
        targets: list[Target],
        call_for: Callable[[Target], ProviderCall],
        policy: str,
        extra_headers: tuple[tuple[bytes, bytes], ...],
        usage: list[int | None],
    ) -> None:
        """Stream through the failover executor; the response starts at the commit."""

        async def relay(
            target: Target, stream: PayloadStream, payloads: list[bytes] | None
        ) -> None:
            started = time.perf_counter()
            chunks = 0
            await responder.start(200, (*SSE_HEADERS, *_meta(target, policy), *extra_headers))
            try:
                while payloads is not None:
                    chunks += len(payloads)
                    if len(payloads) == 1:
                        await responder.send(encode_data(payloads[0]))
                    else:
                        await responder.send(b"".join(encode_data(p) for p in payloads))
                    payloads = await stream.next()
            except GatewayError as exc:
                await responder.send(encode_data(exc.body()) + DONE)
                telemetry.emit(
                    "stream.error",
                    provider=target.provider,
                    request_id=request.request_id,
                    code=exc.code,
                    chunks=chunks,
                )
                return
            await responder.send(DONE)
            # What the translator recorded, whether or not the client was sent it.
            usage[0] = _total_tokens(stream.usage)
            telemetry.emit(
                "stream.complete",
                provider=target.provider,
                request_id=request.request_id,
                chunks=chunks,
                duration_ms=round((time.perf_counter() - started) * 1000, 3),
            )

        await self.failover.stream(targets, call_for, self.providers, relay)


def _prefers_async(request: Request) -> bool:
    """``Prefer: respond-async`` (RFC 7240 §4.1): park the request if it cannot start now."""
    return b"respond-async" in (request.header(b"prefer") or b"").lower()


def _no_queue(tenant: str) -> RateLimited:
    return RateLimited(
        f"Tenant {tenant!r} is at capacity and no overflow queue is available.", retry_after_s=1
    )


def _total_tokens(usage: Mapping[str, Any] | None) -> int | None:
    total = usage.get("total_tokens") if usage is not None else None
    return total if isinstance(total, int) and not isinstance(total, bool) else None


def _load_aliases(path: Path, config: Config) -> dict[str, str]:
    raw = aliases.load_file(path)
    merged = {**config.aliases, **raw}
    table = aliases.validate(
        merged, [p.name for p in config.providers], [m.id for m in config.models]
    )
    return {name: table[name] for name in raw}


_META_PREFIXES: dict[tuple[str, str], bytes] = {}


def _meta_prefix(provider: str, policy: str) -> bytes:
    """``"provider":...,"routing_policy":...,"request_id":`` for a whole answer's metadata,
    encoded once per provider and policy (a dict encode per request cost about 3 us)."""
    prefix = _META_PREFIXES.get((provider, policy))
    if prefix is None:
        if len(_META_PREFIXES) >= 1024:  # reloads may rename providers: stay bounded
            _META_PREFIXES.clear()
        fields = {"provider": provider, "routing_policy": policy}
        encoded = json.dumps(fields, separators=(",", ":")).encode()[1:-1]
        prefix = _META_PREFIXES[(provider, policy)] = encoded + b',"request_id":'
    return prefix


def _meta(target: Target, policy: str) -> tuple[tuple[bytes, bytes], ...]:
    return (
        (b"x-runestone-provider", target.provider.encode()),
        (b"x-runestone-routing-policy", policy.encode()),
    )


def _model_object(model_id: str, owner: str, alias_for: str | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": model_id, "object": "model", "created": 0, "owned_by": owner}
    if alias_for is not None:
        obj["alias_for"] = alias_for
    return obj
