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

What a request needs and the order its targets are tried in (constraints, cost, smooth
weighted round-robin, the ``router.decide`` event) are ``routing_policy``'s; its names are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from runestone_proxy.config import Config, ModelConfig
from runestone_proxy.config.aliases import MAX_CHAIN as _MAX_ALIAS_DEPTH
from runestone_proxy.config.aliases import is_pattern, matches
from runestone_proxy.errors import InvalidParam, ModelNotFound
from runestone_proxy.gateway.routing_policy import (
    Constraints,
    constraints_for,
    emit_decision,
    estimated_cost,
    filter_and_order,
    smooth_wrr,
)

__all__ = [
    "AUTO_MODEL",
    "Constraints",
    "Resolution",
    "RoutingTable",
    "Target",
    "constraints_for",
    "emit_decision",
    "estimated_cost",
    "filter_and_order",
    "smooth_wrr",
]

#: A request for this model lets the router choose among every routable model.
AUTO_MODEL = "auto"


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
