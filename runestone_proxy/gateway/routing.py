"""Model resolution: which provider deployments may serve a request, in order. Pure.

A request names a model (and may name a ``provider``). Resolution tries, in this order:

1. the ``provider`` field of the body: that provider, the model as given (or its table entry);
2. ``provider:model`` syntax, when the prefix is a configured provider name (model ids
   such as OpenRouter's ``meta-llama/llama-3-8b:free`` keep their colons otherwise);
3. an alias from ``[aliases]``, whose target is resolved by these same rules;
4. the ``[[models]]`` table: every deployment serving that id, in config order (a group);
5. otherwise 404 ``model_not_found``, in OpenAI's words.

Providers that are disabled, or whose ``api_key_env`` is unset, are not routable; a model
that only they serve is reported as not found with the reason, so an operator can tell
"unknown" from "not configured".
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

from runestone_proxy.config import Config, ModelConfig
from runestone_proxy.errors import InvalidParam, ModelNotFound

_MAX_ALIAS_DEPTH = 8


@attrs.frozen
class Target:
    """One deployment that can serve the request."""

    provider: str
    #: The model id sent upstream.
    upstream_model: str
    #: The id clients see (the table's id, or what they asked for).
    model: str
    entry: ModelConfig | None = None


@attrs.frozen
class Resolution:
    requested: str
    targets: tuple[Target, ...]
    #: How it was resolved: provider | prefix | alias | model.
    via: str
    alias: str | None = None


@attrs.frozen
class RoutingTable:
    """The resolution inputs, built once per config (and swapped whole on reload)."""

    available: frozenset[str]
    unavailable: Mapping[str, str]  # provider -> why it is not routable
    models: Mapping[str, tuple[ModelConfig, ...]]
    aliases: Mapping[str, str]
    providers: frozenset[str]

    @classmethod
    def build(cls, config: Config, env: Mapping[str, str]) -> RoutingTable:
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
        return cls(
            available=frozenset(available),
            unavailable=unavailable,
            models={k: tuple(v) for k, v in models.items()},
            aliases=dict(config.aliases),
            providers=frozenset(p.name for p in config.providers),
        )

    def resolve(self, model: str, provider: str | None = None) -> Resolution:
        if not isinstance(model, str) or not model:
            raise InvalidParam("you must provide a model parameter", param="model")
        if provider is not None:
            return Resolution(model, (self._on_provider(provider, model, "provider"),), "provider")
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
        raise ModelNotFound(
            f"The model `{requested}` does not exist or you do not have access to it.",
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
        """(id, owner, alias target) for /v1/models: routable models, then aliases."""
        out: list[tuple[str, str, str | None]] = []
        for model_id, entries in self.models.items():
            owners = [e.provider for e in entries if e.provider in self.available]
            if owners:
                out.append((model_id, owners[0], None))
        for alias, target in self.aliases.items():
            out.append((alias, "runestone", target))
        return out
