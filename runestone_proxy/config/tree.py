"""The frozen configuration tree: one attrs class per table of ``config.toml``.

Every field has a default, so an empty file (or none at all) runs the gateway on its
embedded defaults. Validators raise :class:`FieldError` naming the field; the loader
(:mod:`.load`) turns it into a message with the key's whole path (``$.server.port``).
Cross-field rules live in ``__attrs_post_init__``: provider names are unique, every model
names a configured provider, and the aliases resolve (:mod:`.aliases`, which also owns the
``*``/``?`` model-name patterns of alias keys and ``model_patterns``). A provider's
``base_url`` is read in the form its own SDK documents for ``<PROVIDER>_BASE_URL``, with or
without the version segment (:mod:`.base_url`). Units live in names: ``_s`` seconds, ``_ms``
milliseconds, ``_bytes`` bytes.
"""

from __future__ import annotations

from typing import Literal

import attrs

from runestone_proxy.config.admin import AdminConfig
from runestone_proxy.config.aliases import AliasError, validate
from runestone_proxy.config.base_url import api_root as _api_root
from runestone_proxy.config.fields import (
    FieldError,
    _existing_file,
    _non_negative,
    _optional_positive,
    _patterns,
    _port,
    _positive,
)
from runestone_proxy.config.stores import LedgerConfig, OverflowConfig, StateConfig


@attrs.frozen
class LimitsConfig:
    """Per-connection limits, answered as nginx would (414, 431, 413, 408, 400)."""

    max_request_line_bytes: int = attrs.field(default=8192, validator=_positive)
    max_header_bytes: int = attrs.field(default=32768, validator=_positive)
    max_body_bytes: int = attrs.field(default=8 * 1024 * 1024, validator=_positive)
    header_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    #: Between two reads of a request body (nginx's client_body_timeout); and a whole body
    #: must keep up body_min_rate_bytes_per_s once body_grace_s has passed (mod_reqtimeout's
    #: body=20,MinRate=500): see protocol/slowclient.py. Either answers 408.
    body_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    body_grace_s: float = attrs.field(default=20.0, validator=_positive)
    body_min_rate_bytes_per_s: float = attrs.field(default=500.0, validator=_positive)
    keepalive_timeout_s: float = attrs.field(default=75.0, validator=_positive)
    send_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    max_connections: int = attrs.field(default=10_000, validator=_positive)
    max_pipelined_requests: int = attrs.field(default=32, validator=_positive)
    h2_max_concurrent_streams: int = attrs.field(default=128, validator=_positive)
    h2_max_header_list_bytes: int = attrs.field(default=65536, validator=_positive)
    h2_initial_window_bytes: int = attrs.field(default=65535, validator=_positive)
    #: Rapid reset (CVE-2023-44487): client resets tolerated per rolling second.
    h2_max_resets_per_s: int = attrs.field(default=100, validator=_positive)
    #: SETTINGS/PING/empty-frame floods: control frames tolerated per rolling second.
    h2_max_control_frames_per_s: int = attrs.field(default=200, validator=_positive)
    #: CONTINUATION flood: header-block fragments tolerated for one header block.
    h2_max_continuation_frames: int = attrs.field(default=32, validator=_positive)


@attrs.frozen
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = attrs.field(default=4003, validator=_port)
    #: A second listener for /health* and /metrics only; off when unset.
    health_port: int | None = attrs.field(default=None, validator=_port)
    tls_cert: str | None = attrs.field(default=None, validator=_existing_file)
    tls_key: str | None = attrs.field(default=None, validator=_existing_file)
    #: How long in-flight requests and streams may run after SIGTERM before cancellation.
    shutdown_grace_s: float = attrs.field(default=10.0, validator=_non_negative)
    backlog: int = attrs.field(default=1024, validator=_positive)
    #: Worker processes accepting on the same sockets under one supervisor: a number, or
    #: "auto" (one per CPU core). More than one needs ``[state] backend = "redis"`` so that
    #: per-tenant and per-key limits hold across workers.
    workers: int | Literal["auto"] = attrs.field(default=1)

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FieldError("tls_key", "tls_cert and tls_key must be set together")
        if self.workers != "auto" and (type(self.workers) is not int or self.workers < 1):
            raise FieldError("workers", f'must be a number >= 1 or "auto", got {self.workers!r}')


@attrs.frozen
class LoggingConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    #: auto: pretty on a TTY, JSON lines otherwise.
    format: Literal["auto", "json", "console"] = "auto"
    access_log: bool = True


@attrs.frozen
class UpstreamConfig:
    """The provider-facing HTTP client: pool size and the four timeouts (seconds)."""

    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    first_byte_timeout_s: float = attrs.field(default=120.0, validator=_positive)
    between_chunks_timeout_s: float = attrs.field(default=60.0, validator=_positive)
    total_timeout_s: float = attrs.field(default=900.0, validator=_positive)
    max_connections_per_origin: int = attrs.field(default=256, validator=_positive)
    idle_timeout_s: float = attrs.field(default=90.0, validator=_positive)
    #: Largest non-stream provider answer we buffer, and the largest single SSE event of a
    #: stream (streams are never buffered whole: the relay holds one event at a time).
    max_response_bytes: int = attrs.field(default=32 * 1024 * 1024, validator=_positive)
    #: A translated Anthropic Messages stream sends an ``event: ping`` after this long
    #: without an event (Anthropic's own streams carry pings; native ones pass them on).
    ping_interval_s: float = attrs.field(default=10.0, validator=_positive)


ProviderKind = Literal["openai", "anthropic", "mock"]
Flavor = Literal["auto", "openai", "groq", "openrouter", "generic"]


@attrs.frozen
class ProviderConfig:
    """One provider deployment. ``kind`` picks the wire format; ``name`` is how requests
    and models refer to it. Secrets come from the environment (``api_key_env``) only."""

    name: str
    kind: ProviderKind
    base_url: str | None = None
    api_key_env: str | None = None
    #: Quirk handling for the openai kind; auto: from the name (groq, openrouter, openai).
    flavor: Flavor = "auto"
    #: The openai kind: the upstream serves OpenAI's Responses API (``POST /responses``), so
    #: ``/v1/responses`` calls pass through natively; unset: true for flavor openai only.
    #: False (or another kind): the gateway translates them to chat completions.
    responses_api: bool | None = None
    #: Static extra headers sent upstream (e.g. OpenRouter's HTTP-Referer / X-Title).
    headers: dict[str, str] = attrs.Factory(dict)
    enabled: bool = True
    #: Model names this provider claims when nothing exact names them (Claude Code's dated
    #: ids, say): ``*`` any run, ``?`` one character, case-sensitive (config/aliases.py).
    #: The first available provider whose pattern matches serves the name as given.
    model_patterns: tuple[str, ...] = attrs.field(default=(), validator=_patterns)
    #: Most in-flight requests Runestone sends this deployment (protects provider limits).
    max_concurrent: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: Anthropic requires max_tokens; used when the OpenAI request omits it.
    default_max_tokens: int = attrs.field(default=4096, validator=_positive)
    # The mock kind's behaviour (ignored by other kinds).
    latency_ms: float = attrs.field(default=0.0, validator=_non_negative)
    chunk_count: int = attrs.field(default=8, validator=_positive)
    chunk_interval_ms: float = attrs.field(default=0.0, validator=_non_negative)
    embedding_dim: int = attrs.field(default=16, validator=_positive)

    def __attrs_post_init__(self) -> None:
        if self.responses_api and self.kind != "openai":
            raise FieldError(
                "responses_api",
                f'provider {self.name!r}: only kind "openai" speaks the Responses API',
            )
        if self.kind != "mock":
            if not self.base_url:
                raise FieldError("base_url", f"provider {self.name!r} needs a base_url")
            try:
                _api_root(self.base_url, self._dialect)
            except ValueError as exc:
                raise FieldError("base_url", str(exc)) from None

    @property
    def resolved_flavor(self) -> str:
        if self.flavor != "auto":
            return self.flavor
        return self.name if self.name in ("openai", "groq", "openrouter") else "generic"

    @property
    def speaks_responses(self) -> bool:
        """``/v1/responses`` calls go to this provider natively (else translated to chat)."""
        if self.kind != "openai":
            return False
        if self.responses_api is not None:
            return self.responses_api
        return self.resolved_flavor == "openai"

    @property
    def _dialect(self) -> str:
        return "anthropic" if self.kind == "anthropic" else self.resolved_flavor

    @property
    def api_root(self) -> str:
        """``base_url``, written as this provider's own SDK reads it (with or without the
        version segment), as the URL the translators' paths are appended to; see
        ``config/base_url.py``. Computed when providers are built, not per request."""
        return _api_root(self.base_url or "", self._dialect)


@attrs.frozen
class ModelConfig:
    """A model a provider serves, with what routing needs to know about it."""

    id: str
    provider: str
    #: The id sent upstream, when it differs from ``id``.
    upstream_id: str | None = None
    input_cost_per_1k: float = attrs.field(default=0.0, validator=_non_negative)
    output_cost_per_1k: float = attrs.field(default=0.0, validator=_non_negative)
    #: The price of a prompt token the provider served from its cache (the usage ledger);
    #: unset: the input price.
    cached_input_cost_per_1k: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_non_negative)
    )
    capabilities: tuple[str, ...] = ("chat", "streaming")
    family: str = "general"
    #: Share of traffic within a group of deployments of the same id (round_robin).
    weight: float = attrs.field(default=1.0, validator=_positive)
    #: Time-to-first-token hedging: start a second candidate when the first has produced
    #: nothing after this long. Off when unset; ``hedge_p95`` uses the observed p95 instead.
    hedge_delay_ms: float | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    hedge_p95: bool = False

    @property
    def upstream(self) -> str:
        return self.upstream_id or self.id


@attrs.frozen
class BreakerConfig:
    """Per-deployment circuit breaker (see gateway/breaker.py for the state table)."""

    #: Consecutive failures that open the breaker.
    failure_threshold: int = attrs.field(default=5, validator=_positive)
    #: ... or this error rate over ``window_s`` (with at least ``min_requests`` calls).
    error_rate_threshold: float = attrs.field(default=0.5, validator=_positive)
    window_s: float = attrs.field(default=30.0, validator=_positive)
    min_requests: int = attrs.field(default=20, validator=_positive)
    #: Open -> half-open after this long.
    cooldown_s: float = attrs.field(default=15.0, validator=_positive)
    #: Probes admitted at once while half-open.
    half_open_probes: int = attrs.field(default=1, validator=_positive)


@attrs.frozen
class RoutingConfig:
    policy: Literal["default", "cost"] = "default"
    #: Within a group of deployments serving one model id.
    group_strategy: Literal["round_robin", "least_in_flight"] = "round_robin"
    #: Attempts per request across candidates (1 = no retry).
    max_attempts: int = attrs.field(default=3, validator=_positive)
    retry_base_ms: float = attrs.field(default=100.0, validator=_non_negative)
    retry_max_ms: float = attrs.field(default=2000.0, validator=_non_negative)
    #: Budget for all attempts until an answer (or a stream's first byte) is in hand.
    deadline_s: float = attrs.field(default=60.0, validator=_positive)
    #: One attempt slower than this (to its whole answer, or a stream's first chunk) is
    #: abandoned for the next candidate while the deadline and attempts allow.
    attempt_timeout_s: float = attrs.field(default=30.0, validator=_positive)
    #: Output tokens assumed for cost estimates when the request sets no max_tokens.
    default_output_tokens: int = attrs.field(default=256, validator=_positive)
    breaker: BreakerConfig = attrs.Factory(BreakerConfig)


@attrs.frozen
class AuthKeyConfig:
    """One API key: from an environment variable, or by its SHA-256 (hex) only."""

    key_env: str | None = None
    key_sha256: str | None = None
    tenant: str = "default"
    active: bool = True
    #: Per-key rate limits; unset means unlimited.
    rpm: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    rph: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    tpm: int | None = attrs.field(default=None, validator=attrs.validators.optional(_positive))
    #: This key's own cap on concurrent requests (within its tenant's); unset: none.
    max_concurrent: int | None = attrs.field(default=None, validator=_optional_positive)
    #: Budgets (unset: none): USD per calendar day and month (UTC), tokens per day.
    budget_usd_day: float | None = attrs.field(default=None, validator=_optional_positive)
    budget_usd_month: float | None = attrs.field(default=None, validator=_optional_positive)
    budget_tokens_day: int | None = attrs.field(default=None, validator=_optional_positive)

    def __attrs_post_init__(self) -> None:
        if (self.key_env is None) == (self.key_sha256 is None):
            raise FieldError("key_env", "set exactly one of key_env or key_sha256")


@attrs.frozen
class AuthConfig:
    enabled: bool = True
    keys: tuple[AuthKeyConfig, ...] = ()


@attrs.frozen
class TenantConfig:
    """One tenant's share of capacity and what happens when it is used up."""

    #: Concurrent requests/streams; unset: ``tenancy.default_max_concurrent``.
    max_concurrent: int | None = attrs.field(
        default=None, validator=attrs.validators.optional(_positive)
    )
    #: wait: FIFO up to max_wait_ms, then 429; queue: 202 + durable job; reject: 429 at once.
    on_limit: Literal["wait", "queue", "reject"] = "wait"
    max_wait_ms: float = attrs.field(default=2000.0, validator=_non_negative)
    #: Share of the global capacity when tenants compete for it (weighted fairness).
    weight: float = attrs.field(default=1.0, validator=_positive)
    #: Cap on this tenant's queued (not yet finished) overflow jobs; past it, 429.
    max_queued_jobs: int = attrs.field(default=1000, validator=_positive)
    #: Budgets (unset: none): USD per calendar day and month (UTC), tokens per day.
    budget_usd_day: float | None = attrs.field(default=None, validator=_optional_positive)
    budget_usd_month: float | None = attrs.field(default=None, validator=_optional_positive)
    budget_tokens_day: int | None = attrs.field(default=None, validator=_optional_positive)


@attrs.frozen
class TenancyConfig:
    #: Per-tenant default ($MAX_CONCURRENT_PER_TENANT).
    default_max_concurrent: int = attrs.field(default=10, validator=_positive)
    #: Gateway-wide in-flight cap shared fairly (by weight) among tenants.
    global_max_concurrent: int = attrs.field(default=1024, validator=_positive)


def _default_providers() -> tuple[ProviderConfig, ...]:
    return (ProviderConfig(name="mock", kind="mock"),)


def _default_models() -> tuple[ModelConfig, ...]:
    everything = ("chat", "streaming", "tools", "json_mode", "completions")
    return (
        ModelConfig(id="mock-1", provider="mock", capabilities=everything),
        ModelConfig(id="mock-embed-1", provider="mock", capabilities=("embeddings",)),
    )


@attrs.frozen
class Config:
    server: ServerConfig = attrs.Factory(ServerConfig)
    limits: LimitsConfig = attrs.Factory(LimitsConfig)
    logging: LoggingConfig = attrs.Factory(LoggingConfig)
    auth: AuthConfig = attrs.Factory(AuthConfig)
    tenancy: TenancyConfig = attrs.Factory(TenancyConfig)
    tenants: dict[str, TenantConfig] = attrs.Factory(dict)
    overflow: OverflowConfig = attrs.Factory(OverflowConfig)
    ledger: LedgerConfig = attrs.Factory(LedgerConfig)
    state: StateConfig = attrs.Factory(StateConfig)
    admin: AdminConfig = attrs.Factory(AdminConfig)
    upstream: UpstreamConfig = attrs.Factory(UpstreamConfig)
    routing: RoutingConfig = attrs.Factory(RoutingConfig)
    providers: tuple[ProviderConfig, ...] = attrs.Factory(_default_providers)
    models: tuple[ModelConfig, ...] = attrs.Factory(_default_models)
    #: alias -> "provider:model", a model id or another alias; a key holding ``*`` or ``?``
    #: is a pattern, tried in file order after every exact name.
    aliases: dict[str, str] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        if self.server.workers != 1 and self.state.backend == "local":
            raise FieldError(
                "server",
                f"workers = {self.server.workers!r} needs shared limits: set [state] "
                'backend = "redis" and url = "redis://..." (with local state each worker '
                "would grant every tenant and key its whole limit again)",
            )
        if self.admin.listen == "health" and self.server.health_port is None:
            raise FieldError("admin", 'listen = "health" needs server.health_port')
        names = [p.name for p in self.providers]
        for name in names:
            if names.count(name) > 1:
                raise FieldError("providers", f"provider name {name!r} is used twice")
        try:
            validate(self.aliases, names, [m.id for m in self.models])
        except AliasError as exc:
            raise FieldError("aliases", str(exc)) from None
        for model in self.models:
            if model.provider not in names:
                raise FieldError(
                    "models", f"model {model.id!r} names unknown provider {model.provider!r}"
                )
