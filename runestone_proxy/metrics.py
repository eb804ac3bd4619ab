"""The metrics registry and ``/metrics`` in Prometheus text format (exposition format 0.0.4).

Counters are fed by the telemetry spine (:func:`on_event` is a telemetry handler) and by the
access path (:func:`count_request`); gauges are read from live objects when scraped, through
callbacks registered by the app. Nothing here does I/O or allocates per SSE chunk: a counter
increment is one dict update (the usage counters: an attribute update, :class:`UsageCounters`).

``render(tenant=...)`` is what a tenant's API key sees on the main port: every series whose
``tenant`` label names another tenant is left out (series without the label stay).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import attrs

Labels = tuple[tuple[str, str], ...]


GaugeSource = Callable[[], Iterable[tuple[Labels, float]]]


@attrs.define
class Counter:
    name: str
    help: str
    values: dict[Labels, float] = attrs.Factory(dict)
    #: Series kept elsewhere (counted in place on the hot path: :class:`UsageCounters`),
    #: read at each scrape and added to ``values``'.
    cells: GaugeSource | None = None

    def inc(self, labels: Labels = (), amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def samples(self) -> dict[Labels, float]:
        if self.cells is None:
            return self.values
        samples = dict(self.values)
        for labels, value in self.cells():
            samples[labels] = samples.get(labels, 0.0) + value
        return samples


@attrs.define
class Registry:
    counters: dict[str, Counter] = attrs.Factory(dict)
    gauges: dict[str, tuple[str, GaugeSource]] = attrs.Factory(dict)

    def counter(self, name: str, help_text: str) -> Counter:
        if name not in self.counters:
            self.counters[name] = Counter(name, help_text)
        return self.counters[name]

    def gauge(self, name: str, help_text: str, source: GaugeSource) -> None:
        self.gauges[name] = (help_text, source)

    def render(self, tenant: str | None = None) -> bytes:
        """The exposition text: everything, or (``tenant`` set) no other tenant's series."""
        lines: list[str] = []
        for counter in self.counters.values():
            lines.append(f"# HELP {counter.name} {counter.help}")
            lines.append(f"# TYPE {counter.name} counter")
            for labels, value in sorted(counter.samples().items()):
                if tenant is None or _visible(labels, tenant):
                    lines.append(f"{counter.name}{_labels(labels)} {_num(value)}")
        for name, (help_text, source) in self.gauges.items():
            lines.append(f"# HELP {name} {help_text}")
            lines.append(f"# TYPE {name} gauge")
            try:
                samples = list(source())
            except Exception:  # a broken source must not break the scrape
                samples = []
            for labels, value in samples:
                if tenant is None or _visible(labels, tenant):
                    lines.append(f"{name}{_labels(labels)} {_num(value)}")
        return ("\n".join(lines) + "\n").encode()


def _visible(labels: Labels, tenant: str) -> bool:
    """A series ``tenant`` may see: it names no tenant, or names ``tenant``."""
    return all(value == tenant for key, value in labels if key == "tenant")


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


REGISTRY = Registry()

_http = REGISTRY.counter("runestone_http_requests_total", "HTTP requests answered, by status.")
_events = {
    "provider.request.stop": REGISTRY.counter(
        "runestone_provider_requests_total", "Provider calls that completed, by provider."
    ),
    "provider.request.error": REGISTRY.counter(
        "runestone_provider_errors_total", "Provider calls that failed, by provider and status."
    ),
    "router.retry": REGISTRY.counter(
        "runestone_router_retries_total", "Attempts retried or failed over, by provider."
    ),
    "router.hedge": REGISTRY.counter(
        "runestone_router_hedges_total", "Hedged second attempts started, by primary."
    ),
    "stream.complete": REGISTRY.counter(
        "runestone_streams_completed_total", "SSE streams relayed to the end, by provider."
    ),
    "stream.error": REGISTRY.counter(
        "runestone_streams_failed_total", "SSE streams ended by an error event, by provider."
    ),
    "auth.failure": REGISTRY.counter("runestone_auth_failures_total", "Rejected API keys."),
    "ratelimit.block": REGISTRY.counter(
        "runestone_ratelimit_blocks_total", "Requests refused by a rate or capacity limit."
    ),
    "overflow.enqueue": REGISTRY.counter(
        "runestone_overflow_enqueued_total", "Requests parked in the durable queue."
    ),
    "budget.block": REGISTRY.counter(
        "runestone_budget_blocks_total", "Requests refused by a key's or tenant's budget."
    ),
}
_circuit = REGISTRY.counter(
    "runestone_circuit_transitions_total", "Circuit breaker transitions, by provider and state."
)
_LABEL_FIELDS = ("provider", "tenant", "status", "primary")


@attrs.define(slots=True, eq=False)
class UsageCell:
    """One (tenant, model)'s token and cost counters, added to in place."""

    prompt: float = 0.0
    completion: float = 0.0
    cached: float = 0.0
    cost: float = 0.0


@attrs.define(eq=False)
class UsageCounters:
    """``runestone_tokens_total{tenant,model,kind}`` and ``runestone_cost_usd_total{tenant,
    model}``, counted once per ledger record (keys are not a label: bounded cardinality).

    Each (tenant, model) has a :class:`UsageCell` whose attributes a record adds to: one
    dict lookup by a pair of strings (their hashes cached) per record, where keeping the
    series in the counters' ``values`` hashed a nested label tuple per series touched (four
    per record). The label tuples are built only when scraped. A ``cached`` series appears
    once a record had cached tokens, as before."""

    tokens: Counter
    cost: Counter
    cells: dict[tuple[str, str], UsageCell] = attrs.Factory(dict)

    def __attrs_post_init__(self) -> None:
        self.tokens.cells = self._token_samples
        self.cost.cells = self._cost_samples

    def count(
        self, tenant: str, model: str, prompt: int, completion: int, cached: int, cost: float
    ) -> None:
        """One ledger record's tokens and cost."""
        cell = self.cells.get((tenant, model))
        if cell is None:
            cell = self.cells[tenant, model] = UsageCell()
        cell.prompt += prompt
        cell.completion += completion
        cell.cached += cached
        cell.cost += cost

    def _token_samples(self) -> list[tuple[Labels, float]]:
        samples: list[tuple[Labels, float]] = []
        for (tenant, model), cell in list(self.cells.items()):
            base = (("model", model), ("tenant", tenant))
            samples.append(((("kind", "prompt"), *base), cell.prompt))
            samples.append(((("kind", "completion"), *base), cell.completion))
            if cell.cached:  # token counts are never negative: nonzero once any were cached
                samples.append(((("kind", "cached"), *base), cell.cached))
        return samples

    def _cost_samples(self) -> list[tuple[Labels, float]]:
        return [
            ((("model", model), ("tenant", tenant)), cell.cost)
            for (tenant, model), cell in list(self.cells.items())
        ]


_usage = UsageCounters(
    REGISTRY.counter(
        "runestone_tokens_total",
        "Tokens the providers reported, by tenant, model and kind (prompt, completion, cached).",
    ),
    REGISTRY.counter(
        "runestone_cost_usd_total",
        "Cost in USD at the model table's prices, by tenant and model.",
    ),
)
#: One ledger record's tokens and cost (:meth:`UsageCounters.count`).
count_usage = _usage.count


def budget_gauge(source: Callable[[], Iterable[tuple[str, str, float]]]) -> None:
    """``runestone_budget_remaining_usd{tenant,period}``: what each tenant's USD budget has
    left this period (limit minus spend minus what requests in flight hold), from
    ``source``'s ``(tenant, period, usd)`` (tenants seen this period; keys are not a label)."""
    REGISTRY.gauge(
        "runestone_budget_remaining_usd",
        "USD left in each tenant's budget this period (day: UTC day; month: calendar month).",
        lambda: [((("period", p), ("tenant", t)), left) for t, p, left in source()],
    )


def count_request(status: int) -> None:
    _http.inc((("status", str(status)),))


def on_event(event: str, fields: dict[str, Any]) -> None:
    """Telemetry handler: count the events operators chart."""
    if event.startswith("circuit."):
        _circuit.inc((("provider", str(fields.get("provider"))), ("state", event[8:])))
        return
    counter = _events.get(event)
    if counter is not None:
        labels = tuple((k, str(fields[k])) for k in _LABEL_FIELDS if k in fields)
        counter.inc(labels)


# --- several workers, one gateway -----------------------------------------------------------

#: Gauges whose merged value is the largest, not the sum (a state, not a count).
MERGE_BY_MAX = frozenset({"runestone_circuit_state"})


def merge(texts: Iterable[bytes]) -> bytes:
    """Several renderings of this registry (one per worker process) as one: each series'
    values summed (counters, and gauges that count things), or the largest for the gauges
    in :data:`MERGE_BY_MAX`. Families keep the order they were first seen in and their
    samples stay together under their ``# HELP``/``# TYPE`` lines, as the format requires.
    A series is matched by its exact text (name and labels), which every worker renders
    the same way."""
    families: dict[str, tuple[list[str], dict[str, float]]] = {}
    for text in texts:
        family: tuple[list[str], dict[str, float]] | None = None
        name = ""
        for line in text.decode("utf-8", "replace").splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, ([], {}))
                if line not in family[0]:
                    family[0].append(line)
                continue
            key, _, raw = line.rpartition(" ")
            if not key or family is None:
                continue
            try:
                value = float(raw)
            except ValueError:
                continue
            samples = family[1]
            if key not in samples:
                samples[key] = value
            elif name in MERGE_BY_MAX:
                samples[key] = max(samples[key], value)
            else:
                samples[key] += value
    lines: list[str] = []
    for comments, samples in families.values():
        lines += comments
        lines += [f"{key} {_num(value)}" for key, value in samples.items()]
    return ("\n".join(lines) + "\n").encode()
