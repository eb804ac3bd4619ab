"""The frozen configuration tree and its strict loader.

One ``config.toml`` becomes one :class:`Config`. Loading is strict on purpose: an unknown key,
a wrong type or an impossible value is an error that names the key (``$.server.port``) and the
file, and the process exits 2 before it listens (see ``__main__``). Every field has a default,
so an empty file (or none at all) runs the gateway on its embedded defaults.

Order of precedence, lowest first: field defaults, the TOML file, environment overrides
(``PORT``, ``HEALTH_PORT``, ...; see :data:`ENV_OVERRIDES`). Overrides are applied to the raw
dict before validation, so a bad ``PORT=abc`` is reported like a bad ``server.port``. An
override wins for the value it names wherever the file sets it (:data:`ENV_ALSO_PINS`).
A provider's ``base_url`` is read in the form its own SDK documents for
``<PROVIDER>_BASE_URL``, with or without the version segment (``providers/base_url.py``).
Units live in names: ``_s`` seconds, ``_ms`` milliseconds, ``_bytes`` bytes.
"""

from __future__ import annotations

import difflib
import os
import tomllib
import typing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import attrs
import cattrs

from runestone_proxy.providers.base_url import api_root as _api_root

DEFAULT_CONFIG_PATHS = ("config.toml",)


class ConfigError(Exception):
    """The configuration is invalid; ``messages`` name each bad key."""

    def __init__(self, source: str, messages: list[str]) -> None:
        super().__init__(f"{source}: " + "; ".join(messages))
        self.source = source
        self.messages = messages


class FieldError(ValueError):
    """A validator's complaint about one field; the loader appends the field to the path."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _port(_inst: object, attribute: attrs.Attribute[Any], value: int | None) -> None:
    if value is not None and not 0 <= value <= 65535:
        raise FieldError(attribute.name, f"must be between 0 and 65535, got {value}")


def _positive(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value <= 0:
        raise FieldError(attribute.name, f"must be > 0, got {value}")


def _non_negative(_inst: object, attribute: attrs.Attribute[Any], value: float) -> None:
    if value < 0:
        raise FieldError(attribute.name, f"must be >= 0, got {value}")


def _existing_file(_inst: object, attribute: attrs.Attribute[Any], value: str | None) -> None:
    if value is not None and not Path(value).is_file():
        raise FieldError(attribute.name, f"no such file: {value}")


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

    def __attrs_post_init__(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise FieldError("tls_key", "tls_cert and tls_key must be set together")


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
    #: Static extra headers sent upstream (e.g. OpenRouter's HTTP-Referer / X-Title).
    headers: dict[str, str] = attrs.Factory(dict)
    enabled: bool = True
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
    def _dialect(self) -> str:
        return "anthropic" if self.kind == "anthropic" else self.resolved_flavor

    @property
    def api_root(self) -> str:
        """``base_url``, written as this provider's own SDK reads it (with or without the
        version segment), as the URL the translators' paths are appended to; see
        ``providers/base_url.py``. Computed when providers are built, not per request."""
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


@attrs.frozen
class TenancyConfig:
    #: Per-tenant default ($MAX_CONCURRENT_PER_TENANT).
    default_max_concurrent: int = attrs.field(default=10, validator=_positive)
    #: Gateway-wide in-flight cap shared fairly (by weight) among tenants.
    global_max_concurrent: int = attrs.field(default=1024, validator=_positive)


@attrs.frozen
class OverflowConfig:
    """The durable overflow queue (SQLite) and its drainer."""

    #: Relative paths live under $RUNESTONE_STATE_DIR (systemd StateDirectory) when set.
    database: str = "runestone.sqlite3"
    max_attempts: int = attrs.field(default=5, validator=_positive)
    #: Claims in a row with no outcome recorded (the outcome could not be stored, or the
    #: process died mid-run) after which a job is ``dead`` instead of claimed again.
    max_claims: int = attrs.field(default=3, validator=_positive)
    #: A claimed job's lease; an expired lease (crash) returns the job to the queue.
    lease_s: float = attrs.field(default=300.0, validator=_positive)
    backoff_base_s: float = attrs.field(default=1.0, validator=_positive)
    backoff_max_s: float = attrs.field(default=60.0, validator=_positive)
    #: Finished jobs' results are kept this long, then swept.
    retention_s: float = attrs.field(default=7 * 86400.0, validator=_positive)
    #: The same Idempotency-Key from the same tenant within this window returns the same job.
    idempotency_window_s: float = attrs.field(default=86400.0, validator=_positive)
    #: Environment variable holding the webhook HMAC-SHA256 secret.
    webhook_secret_env: str = "RUNESTONE_WEBHOOK_SECRET"
    webhook_timeout_s: float = attrs.field(default=10.0, validator=_positive)
    webhook_max_attempts: int = attrs.field(default=8, validator=_positive)
    #: Most enqueues committed in one transaction (group commit).
    group_commit_max_batch: int = attrs.field(default=256, validator=_positive)


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
    upstream: UpstreamConfig = attrs.Factory(UpstreamConfig)
    routing: RoutingConfig = attrs.Factory(RoutingConfig)
    providers: tuple[ProviderConfig, ...] = attrs.Factory(_default_providers)
    models: tuple[ModelConfig, ...] = attrs.Factory(_default_models)
    #: alias -> "provider:model" or a model id.
    aliases: dict[str, str] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        names = [p.name for p in self.providers]
        for name in names:
            if names.count(name) > 1:
                raise FieldError("providers", f"provider name {name!r} is used twice")
        from runestone_proxy.gateway.aliases import AliasError, validate

        try:
            validate(self.aliases, names, [m.id for m in self.models])
        except AliasError as exc:
            raise FieldError("aliases", str(exc)) from None
        for model in self.models:
            if model.provider not in names:
                raise FieldError(
                    "models", f"model {model.id!r} names unknown provider {model.provider!r}"
                )


# --- loading -------------------------------------------------------------------------------

_converter = cattrs.Converter(forbid_extra_keys=True)


def _strict(type_: type[Any], *accepted: type[Any]) -> None:
    """Structure ``type_`` only from ``accepted`` TOML types: cattrs would call ``int("80")``
    and ``bool("false")`` (True), so a quoted number or boolean would pass silently."""
    name = {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[type_]

    def hook(value: object, _type: object) -> object:
        if isinstance(value, bool) is not (type_ is bool) or not isinstance(value, accepted):
            raise ValueError(f"expected {name}, got {type(value).__name__} {value!r}")
        return type_(value)

    _converter.register_structure_hook(type_, hook)


_strict(bool, bool)
_strict(int, int)
_strict(float, int, float)
_strict(str, str)


def _set(raw: dict[str, Any], dotted: str, value: object) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            return  # the file has a non-table here; validation will name it
        node = child
    node[leaf] = value


def _replace(raw: dict[str, Any], dotted: str, value: object) -> None:
    """Like :func:`_set`, but only where the file already sets the key."""
    node: object = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.get(part) if isinstance(node, dict) else None
    if isinstance(node, dict) and leaf in node:
        node[leaf] = value


def _as_int(text: str) -> object:
    try:
        return int(text)
    except ValueError:
        return text  # left as a string: validation reports the key with its bad value


#: Environment variable -> (dotted key, parser). Applied on top of the file.
ENV_OVERRIDES: dict[str, tuple[str, Callable[[str], object]]] = {
    "PORT": ("server.port", _as_int),
    "HEALTH_PORT": ("server.health_port", _as_int),
    "RUNESTONE_HOST": ("server.host", str),
    "RUNESTONE_LOG_LEVEL": ("logging.level", str.lower),
    "RUNESTONE_LOG_FORMAT": ("logging.format", str.lower),
}


def _as_bool(text: str) -> object:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return text


ENV_OVERRIDES["RUNESTONE_ROUTER_POLICY"] = ("routing.policy", str.lower)
ENV_OVERRIDES["RUNESTONE_AUTH_ENABLED"] = ("auth.enabled", _as_bool)
ENV_OVERRIDES["MAX_CONCURRENT_PER_TENANT"] = ("tenancy.default_max_concurrent", _as_int)

#: Overrides that name a value the file may also pin in a second, more specific place: the
#: variable wins there too. The shipped file restates ``[tenants.default] max_concurrent``,
#: which would otherwise hide ``MAX_CONCURRENT_PER_TENANT`` for the only tenant most
#: deployments have. Other tenants' explicit ``max_concurrent`` stays: an operator who wrote
#: a number for one named tenant meant that tenant, and the variable names the default.
#: (A value that failed to parse is left to the first key's error, not repeated here.)
ENV_ALSO_PINS: dict[str, tuple[str, ...]] = {
    "MAX_CONCURRENT_PER_TENANT": ("tenants.default.max_concurrent",),
}

#: ``<NAME>_BASE_URL`` overrides the base_url of the provider with that name, in the form
#: that provider's official SDK reads it (``ANTHROPIC_BASE_URL`` without ``/v1``,
#: ``GROQ_BASE_URL`` the bare origin); ``ProviderConfig.api_root`` normalises either form.
BASE_URL_PROVIDERS = ("openai", "anthropic", "groq", "openrouter")


def apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> dict[str, Any]:
    for name, (dotted, parse) in ENV_OVERRIDES.items():
        text = env.get(name)
        if text is not None and text != "":
            value = parse(text)
            _set(raw, dotted, value)
            if not isinstance(value, str):  # a value that failed to parse is reported once
                for pinned in ENV_ALSO_PINS.get(name, ()):
                    _replace(raw, pinned, value)
    providers = raw.get("providers")
    if isinstance(providers, list):
        for provider in providers:
            if isinstance(provider, dict) and provider.get("name") in BASE_URL_PROVIDERS:
                url = env.get(f"{str(provider['name']).upper()}_BASE_URL")
                if url:
                    provider["base_url"] = url
    return raw


def find_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    """The config file to read: ``--config``, else ``RUNESTONE_CONFIG``, else ./config.toml."""
    if explicit:
        return Path(explicit)
    if env.get("RUNESTONE_CONFIG"):
        return Path(env["RUNESTONE_CONFIG"])
    for candidate in DEFAULT_CONFIG_PATHS:
        if Path(candidate).is_file():
            return Path(candidate)
    return None


def _unknown_keys(exc: cattrs.ForbiddenExtraKeysError) -> str:
    """One ``\1key\1message`` per unknown key, so each is named by its own path."""
    known = [field.name for field in attrs.fields(exc.cl)] if attrs.has(exc.cl) else []
    out = []
    for key in sorted(exc.extra_fields):
        close = difflib.get_close_matches(key, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        out.append(f"\1{key}\1unknown key{hint}")
    return "".join(out)


def _format(exc: BaseException, type_: type[Any] | None) -> str:
    if isinstance(exc, FieldError):
        return f"\0{exc.field}\0{exc}"
    if isinstance(exc, cattrs.ForbiddenExtraKeysError):
        return _unknown_keys(exc)
    if typing.get_origin(type_) is Literal:
        return f"invalid value (must be one of {', '.join(map(repr, typing.get_args(type_)))})"
    if isinstance(exc, ValueError) and type(exc) is ValueError:
        return f"invalid value ({exc})"
    return cattrs.v.format_exception(exc, type_)


def _messages(exc: cattrs.BaseValidationError) -> list[str]:
    """cattrs' messages, with validator complaints and unknown keys pinned to their path."""
    out = []
    for line in cattrs.transform_error(exc, path="$", format_exception=_format):
        if line.startswith("\0"):
            _, field, rest = line.split("\0", 2)
            message, _, path = rest.rpartition(" @ ")
            line = f"invalid value ({message}) @ {path}.{field}"
        elif line.startswith("\1"):
            found, _, path = line.rpartition(" @ ")
            parts = found.split("\1")[1:]
            for key, message in zip(parts[::2], parts[1::2], strict=True):
                out.append(f"{message} @ {path}.{key}")
            continue
        out.append(line)
    return out


def structure(raw: dict[str, Any], source: str) -> Config:
    try:
        return _converter.structure(raw, Config)
    except cattrs.BaseValidationError as exc:
        raise ConfigError(source, _messages(exc)) from None
    except FieldError as exc:
        raise ConfigError(source, [f"invalid value ({exc}) @ $.{exc.field}"]) from None


def load(path: Path | None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate; raise :class:`ConfigError` naming every bad key."""
    env = os.environ if env is None else env
    source = str(path) if path is not None else "<embedded defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as fh:
                raw = tomllib.load(fh)
        except OSError as exc:
            raise ConfigError(source, [f"cannot read: {exc.strerror}"]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(source, [f"not valid TOML: {exc}"]) from None
    return structure(apply_env(raw, env), source)
