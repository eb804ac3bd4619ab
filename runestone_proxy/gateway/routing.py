"""Model resolution: which provider deployments may serve a request, in order. Pure.

A request names a model (and may name a ``provider``). Resolution tries, in this order:

1. the ``provider`` field of the body: that provider, the model as given (or its table entry);
2. ``provider:model`` syntax, when the prefix is a configured provider name (model ids
   such as OpenRouter's ``meta-llama/llama-3-8b:free`` keep their colons otherwise);
3. an exact alias from ``[aliases]``, whose target is resolved by these same rules;
4. the ``[[models]]`` table: every deployment serving that id, in config order (a group);
5. an alias pattern (a key with ``*``/``?``; the aliases file's first, then config.toml's,
   each in file order): the first that matches, its target resolved as in 2-4;
6. a provider's ``model_patterns``: the first available provider (config order) claiming
   the name serves it as given (Claude Code's dated ids: ``claude-*``);
7. otherwise 404 ``model_not_found``, in OpenAI's words.

Exact names always beat patterns. Providers that are disabled, or whose ``api_key_env`` is
unset, are not routable; a model that only they serve (or claim) is reported as not found
with the reason, so an operator can tell "unknown" from "not configured".
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import attrs

from runestone_proxy import telemetry
from runestone_proxy.config import Config, ModelConfig
from runestone_proxy.config.aliases import MAX_CHAIN as _MAX_ALIAS_DEPTH
from runestone_proxy.config.aliases import is_pattern, matches
from runestone_proxy.errors import InvalidParam, ModelNotFound, NoCandidate


@attrs.frozen
class Target:
    """One deployment that can serve the request."""

    provider: str
    #: The model id sent upstream.
    upstream_model: str
    #: The id clients see (the table's id, or what they asked for).
    model: str
    entry: ModelConfig | None = None
    #: ``provider:model``, as ``router.decide`` and error messages name it. Derived once
    #: here because targets live in cached resolutions and are named on every request.
    label: str = attrs.field(init=False, eq=False, repr=False)
    #: The entry's capabilities as a set (None outside the table: never excluded), so that
    #: the per-request filter is one subset test.
    capabilities: frozenset[str] | None = attrs.field(init=False, eq=False, repr=False)

    @label.default
    def _label(self) -> str:
        return f"{self.provider}:{self.model}"

    @capabilities.default
    def _capabilities(self) -> frozenset[str] | None:
        return None if self.entry is None else frozenset(self.entry.capabilities)


@attrs.frozen
class Resolution:
    requested: str
    targets: tuple[Target, ...]
    #: How it was resolved: provider | prefix | alias | model | pattern | auto.
    via: str
    alias: str | None = None


#: Resolutions a routing table keeps (see ``RoutingTable._resolved``).
_RESOLVED_MAX = 1024


@attrs.frozen
class RoutingTable:
    """The resolution inputs, built once per config (and swapped whole on reload)."""

    available: frozenset[str]
    unavailable: Mapping[str, str]  # provider -> why it is not routable
    models: Mapping[str, tuple[ModelConfig, ...]]
    #: Exact aliases; the pattern keys are in ``alias_patterns``, in the order tried.
    aliases: Mapping[str, str]
    providers: frozenset[str]
    alias_patterns: tuple[tuple[str, str], ...] = ()
    #: (provider, its model_patterns) in config order, unavailable providers included.
    provider_patterns: tuple[tuple[str, tuple[str, ...]], ...] = ()
    #: Successful resolutions by requested model (``provider`` field unset). Resolution
    #: depends only on this table, which is immutable and replaced whole on reload, so the
    #: cache lives and dies with it and a reload can never serve a stale answer. Bounded,
    #: because ``provider:model`` accepts any model name a client sends.
    _resolved: dict[str, Resolution] = attrs.field(init=False, factory=dict, eq=False, repr=False)

    @classmethod
    def build(
        cls, config: Config, env: Mapping[str, str], extra_aliases: Mapping[str, str] | None = None
    ) -> RoutingTable:
        """``extra_aliases`` (from the aliases file) win over ``[aliases]``; its patterns are
        tried before config.toml's."""
        available: set[str] = set()
        unavailable: dict[str, str] = {}
        for provider in config.providers:
            if not provider.enabled:
                unavailable[provider.name] = "disabled in config"
            elif provider.api_key_env and not env.get(provider.api_key_env):
                unavailable[provider.name] = f"{provider.api_key_env} is not set"
            else:
                available.add(provider.name)
        models: dict[str, list[ModelConfig]] = {}
        for model in config.models:
            models.setdefault(model.id, []).append(model)
        extra = extra_aliases or {}
        merged = {**config.aliases, **extra}
        return cls(
            available=frozenset(available),
            unavailable=unavailable,
            models={k: tuple(v) for k, v in models.items()},
            aliases={k: v for k, v in merged.items() if not is_pattern(k)},
            providers=frozenset(p.name for p in config.providers),
            alias_patterns=tuple(
                (k, merged[k]) for k in dict.fromkeys([*extra, *config.aliases]) if is_pattern(k)
            ),
            provider_patterns=tuple(
                (p.name, p.model_patterns) for p in config.providers if p.model_patterns
            ),
        )

    def resolve(self, model: str, provider: str | None = None) -> Resolution:
        if not isinstance(model, str) or not model:
            raise InvalidParam("you must provide a model parameter", param="model")
        if provider is not None:
            return Resolution(model, (self._on_provider(provider, model, "provider"),), "provider")
        resolution = self._resolved.get(model)
        if resolution is None:
            resolution = self._resolve_model(model)
            if len(self._resolved) >= _RESOLVED_MAX:
                self._resolved.clear()
            self._resolved[model] = resolution
        return resolution

    def _resolve_model(self, model: str) -> Resolution:
        if model == AUTO_MODEL and AUTO_MODEL not in self.aliases and AUTO_MODEL not in self.models:
            every = tuple(
                Target(e.provider, e.upstream, e.id, e)
                for entries in self.models.values()
                for e in entries
                if e.provider in self.available
            )
            if not every:
                raise ModelNotFound("No routable model is configured.", param="model")
            return Resolution(model, every, "auto")
        return self._resolve(model, model, depth=0, alias=None)

    def _resolve(self, requested: str, name: str, depth: int, alias: str | None) -> Resolution:
        prefix, sep, rest = name.partition(":")
        if sep and prefix in self.providers:
            target = self._on_provider(prefix, rest, "model")
            return Resolution(requested, (target,), "alias" if alias else "prefix", alias)
        if name in self.aliases and depth < _MAX_ALIAS_DEPTH:
            return self._resolve(requested, self.aliases[name], depth + 1, alias or name)
        entries = self.models.get(name, ())
        targets = tuple(
            Target(e.provider, e.upstream, e.id, e) for e in entries if e.provider in self.available
        )
        if targets:
            return Resolution(requested, targets, "alias" if alias else "model", alias)
        if entries:
            reasons = "; ".join(
                f"{e.provider}: {self.unavailable.get(e.provider, 'unavailable')}" for e in entries
            )
            raise ModelNotFound(
                f"The model `{requested}` is configured but no provider serving it is "
                f"available ({reasons}).",
                param="model",
            )
        if alias is None:  # patterns match what the client sent, never an alias's target
            found = self._by_pattern(requested, depth)
            if found is not None:
                return found
        raise ModelNotFound(
            f"The model `{requested}` does not exist or you do not have access to it.",
            param="model",
        )

    def _by_pattern(self, name: str, depth: int) -> Resolution | None:
        """Steps 5 and 6: the first matching alias pattern, else the first available
        provider claiming ``name``; None when no pattern matches at all."""
        for pattern, target in self.alias_patterns:
            if matches(pattern, name):
                return self._resolve(name, target, depth + 1, pattern)
        claimants = [
            provider
            for provider, patterns in self.provider_patterns
            if any(matches(pattern, name) for pattern in patterns)
        ]
        for provider in claimants:
            if provider in self.available:
                return Resolution(name, (Target(provider, name, name),), "pattern")
        if not claimants:
            return None
        reasons = "; ".join(f"{p}: {self.unavailable.get(p, 'unavailable')}" for p in claimants)
        raise ModelNotFound(
            f"The model `{name}` matches the model_patterns of a provider, but no provider "
            f"claiming it is available ({reasons}).",
            param="model",
        )

    def _on_provider(self, provider: str, model: str, param: str) -> Target:
        if provider not in self.providers:
            raise InvalidParam(f"Unknown provider `{provider}`.", param="provider")
        if provider not in self.available:
            raise InvalidParam(
                f"Provider `{provider}` is not available: {self.unavailable[provider]}.",
                param="provider",
            )
        if not model:
            raise InvalidParam("you must provide a model parameter", param=param)
        for entry in self.models.get(model, ()):
            if entry.provider == provider:
                return Target(provider, entry.upstream, entry.id, entry)
        return Target(provider, model, model)

    def listed_models(self) -> list[tuple[str, str, str | None]]:
        """(id, owner, alias target) for /v1/models: routable models, then exact aliases.
        Patterns name no model, so they are not listed."""
        out: list[tuple[str, str, str | None]] = []
        for model_id, entries in self.models.items():
            owners = [e.provider for e in entries if e.provider in self.available]
            if owners:
                out.append((model_id, owners[0], None))
        for alias, target in self.aliases.items():
            out.append((alias, "runestone", target))
        return out


# --- policies: constraints, cost, order ---------------------------------------------------

#: A request for this model lets the router choose among every routable model.
AUTO_MODEL = "auto"


@attrs.frozen(slots=False)
class Constraints:
    """What a request needs from a model, derived from its body (pure).

    Built for every request: without slots, attrs' frozen ``__init__`` fills the instance
    dict directly, which costs half of what one ``object.__setattr__`` per field does."""

    capabilities: frozenset[str]
    family: str | None = None
    max_cost_per_token: float | None = None
    est_input_tokens: int = 0
    est_output_tokens: int = 0


def _content_has_image(messages: object) -> bool:
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") == "image_url":
                    return True
    return False


#: What each endpoint needs before the body adds anything; with the sets below, these are
#: shared constants so that a plain request builds no set at all.
_ENDPOINT_NEEDS = {
    "chat": frozenset({"chat"}),
    "completions": frozenset({"completions"}),
    "embeddings": frozenset({"embeddings"}),
}
_STREAMING = frozenset({"streaming"})
_TOOLS = frozenset({"tools"})
_JSON_MODE = frozenset({"json_mode"})
_VISION = frozenset({"vision"})


#: Body fields that add constraints but few requests carry: a body with none of them
#: (one set test) skips their look-ups.
_RARE_FIELDS = frozenset(
    {"tools", "functions", "response_format", "capabilities", "model_family", "max_cost_per_token"}
)


def constraints_for(
    endpoint: str,
    body: Mapping[str, object],
    default_output_tokens: int,
    input_bytes: int | None = None,
) -> Constraints:
    """Capabilities the request needs (explicit ``capabilities`` plus what its fields imply),
    its ``model_family`` and ``max_cost_per_token``, and a token estimate for pricing.

    ``input_bytes`` (the raw body's length) gives the input estimate at no cost; without it
    the prompt is rendered to text, which grows with the prompt (fine off the hot path)."""
    get = body.get
    needed = _ENDPOINT_NEEDS.get(endpoint, _ENDPOINT_NEEDS["chat"])
    if get("stream") is True:
        needed = needed | _STREAMING
    if _content_has_image(get("messages")):
        needed = needed | _VISION
    family: str | None = None
    max_cost: float | None = None
    if not _RARE_FIELDS.isdisjoint(body):
        needed, family, max_cost = _rare_constraints(body, needed)
    if input_bytes is None:
        text = get("messages") or get("prompt") or get("input") or ""
        input_bytes = len(str(text))
    est_in = input_bytes // 4 or 1  # at least one token
    out = get("max_completion_tokens") or get("max_tokens")
    est_out = out if isinstance(out, int) and out > 0 else default_output_tokens
    if endpoint == "embeddings":
        est_out = 0
    return Constraints(needed, family, max_cost, est_in, est_out)


def _rare_constraints(
    body: Mapping[str, object], needed: frozenset[str]
) -> tuple[frozenset[str], str | None, float | None]:
    """What tools, ``response_format`` and the routing fields add, validated (400s)."""
    get = body.get
    if get("tools") or get("functions"):
        needed = needed | _TOOLS
    fmt = get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_object", "json_schema"):
        needed = needed | _JSON_MODE
    explicit = get("capabilities")
    if explicit is not None:
        if not isinstance(explicit, list) or not all(isinstance(c, str) for c in explicit):
            raise InvalidParam("'capabilities' must be an array of strings.", param="capabilities")
        needed = needed.union(explicit)
    family = get("model_family")
    if family is not None and not isinstance(family, str):
        raise InvalidParam("'model_family' must be a string.", param="model_family")
    max_cost = get("max_cost_per_token")
    if max_cost is not None and (
        isinstance(max_cost, bool) or not isinstance(max_cost, int | float) or max_cost < 0
    ):
        raise InvalidParam(
            "'max_cost_per_token' must be a non-negative number.", param="max_cost_per_token"
        )
    return needed, family, float(max_cost) if max_cost is not None else None


def estimated_cost(entry: ModelConfig, c: Constraints) -> float:
    return (
        c.est_input_tokens * entry.input_cost_per_1k
        + c.est_output_tokens * entry.output_cost_per_1k
    ) / 1000


def _price_per_token(entry: ModelConfig) -> float:
    return max(entry.input_cost_per_1k, entry.output_cost_per_1k) / 1000


def _fits(target: Target, c: Constraints) -> bool:
    """Whether ``target`` meets ``c``: the per-request check, with no allocation. Must agree
    with :func:`_exclusion`, which words the reason when nothing fits."""
    entry = target.entry
    if entry is None or target.capabilities is None:
        return True  # outside the table: never excluded
    if not c.capabilities <= target.capabilities:
        return False
    if c.family is not None and entry.family != c.family:
        return False
    return c.max_cost_per_token is None or not _price_per_token(entry) > c.max_cost_per_token


def _exclusion(entry: ModelConfig, c: Constraints) -> str | None:
    missing = sorted(c.capabilities - set(entry.capabilities))
    if missing:
        return f"lacks {', '.join(missing)}"
    if c.family is not None and entry.family != c.family:
        return f"family {entry.family!r} is not {c.family!r}"
    if c.max_cost_per_token is not None:
        price = _price_per_token(entry)
        if price > c.max_cost_per_token:
            return f"price {price:.3g}/token exceeds max_cost_per_token {c.max_cost_per_token:.3g}"
    return None


def filter_and_order(
    targets: tuple[Target, ...], c: Constraints, policy: str
) -> tuple[list[Target], str]:
    """The targets that satisfy ``c``, ordered by ``policy``; NoCandidate says why none.

    ``default`` keeps the configured order; ``cost`` orders by estimated request cost
    (cheapest first, ties in configured order). Returns (ordered targets, reason)."""
    needed = c.capabilities
    if c.family is None and c.max_cost_per_token is None:
        # Only capabilities to check (most requests): one subset test per target.
        kept = [t for t in targets if t.capabilities is None or needed <= t.capabilities]
    else:
        kept = [t for t in targets if _fits(t, c)]
    if not kept:
        excluded = [
            f"{target.label} ({_exclusion(target.entry, c)})"
            for target in targets
            if target.entry is not None
        ]
        raise NoCandidate(
            "No model can serve this request: " + "; ".join(excluded) + ".",
            param="model",
        )
    if policy == "cost":
        if len(kept) > 1:
            kept.sort(key=lambda t: estimated_cost(t.entry, c) if t.entry is not None else 0.0)
        return kept, "cheapest capable"
    return kept, "configured order"


def smooth_wrr(weights: Mapping[str, float], current: dict[str, float]) -> str:
    """Smooth weighted round-robin (nginx's): pick one name and update ``current`` in place.

    Each pick adds every weight to its running total, takes the largest, and subtracts the
    sum of weights from the winner, which spreads picks evenly in proportion to weight."""
    total = 0.0
    best = ""
    best_value = -math.inf
    for name, weight in weights.items():
        value = current.get(name, 0.0) + weight
        current[name] = value
        total += weight
        if value > best_value:
            best, best_value = name, value
    current[best] -= total
    return best


def emit_decision(
    policy: str, resolution: Resolution, targets: list[Target], reason: str, request_id: str
) -> None:
    """The ``router.decide`` event: policy, candidates in order, the choice and why."""
    telemetry.emit(
        "router.decide",
        policy=policy,
        requested=resolution.requested,
        via=resolution.via,
        candidates=[t.label for t in targets],
        choice=targets[0].label,
        reason=reason,
        request_id=request_id,
    )
