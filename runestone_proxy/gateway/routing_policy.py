"""Routing policies: what a request needs, which targets fit it, in which order. Pure.

Owns the per-request half of routing ("decide, then do": plain sync functions, no I/O beyond
the ``router.decide`` event), after ``routing.py`` has resolved the requested model to its
targets:

- :func:`constraints_for`: a body -> :class:`Constraints` (the capabilities its endpoint and
  fields imply, plus explicit ``capabilities``, ``model_family``, ``max_cost_per_token``)
  and a token estimate for pricing; the rarely sent fields are looked at only when present;
- :func:`filter_and_order`: the targets that satisfy them (:func:`_fits`; when none does,
  :func:`_exclusion` words why in the 400) in the policy's order: ``default`` keeps the
  configured order, ``cost`` sorts by :func:`estimated_cost`;
- :func:`smooth_wrr`: nginx's smooth weighted round-robin, to pick within a group;
- :func:`emit_decision`: the ``router.decide`` event.

Every request runs through here: keep the common case free of allocations (shared constant
sets, one subset test per target). ``routing.py`` re-exports these names.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from runestone_proxy import telemetry
from runestone_proxy.config import ModelConfig
from runestone_proxy.errors import InvalidParam, NoCandidate

if TYPE_CHECKING:  # annotations only: routing.py imports this module
    from runestone_proxy.gateway.routing import Resolution, Target

__all__ = [
    "Constraints",
    "constraints_for",
    "emit_decision",
    "estimated_cost",
    "filter_and_order",
    "smooth_wrr",
]


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
    """An image part in a message: OpenAI's ``image_url``, or an Anthropic Messages
    ``image`` block (the Messages dialect routes on the same capabilities)."""
    if not isinstance(messages, list):
        return False
    for message in messages:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and part.get("type") in _IMAGE_PARTS:
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
_IMAGE_PARTS = frozenset({"image_url", "image"})


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
