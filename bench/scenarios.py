"""The scenario registry: what to measure, against which target, at which concurrencies.

A :class:`Scenario` names a target (:mod:`bench.targets`), a protocol, the one request it
repeats and the concurrency levels to sweep. ``baseline`` names the scenario whose req/s
at the same concurrency is the denominator of this one's ratio column. ``groups`` let
``--scenarios health`` pick several scenarios at once; a selected scenario's baseline is
always measured too, in the same run.

To add one, call :func:`register` at import time (here, or in a module imported below)::

    register(Scenario(
        name="chat_h1",
        description="POST /v1/chat/completions (non-stream) through the gateway",
        target="gateway_upstream",
        protocol="h1",
        request=Request("POST", "/v1/chat/completions", JSON, CHAT_BODY),
        groups=("chat",),
    ))
"""

from __future__ import annotations

from collections.abc import Iterable

import attrs

from bench.load import Protocol, Request, Tool
from bench.targets import BENCH_MODEL, CLAUDE_MODEL, LIMITED_KEY, PACED_CHUNKS, PLAIN_KEY, TARGETS

DEFAULT_CONCURRENCY = (1, 16, 64)


@attrs.frozen
class Scenario:
    name: str
    description: str
    target: str
    protocol: Protocol
    request: Request
    concurrency: tuple[int, ...] = DEFAULT_CONCURRENCY
    groups: tuple[str, ...] = ()
    baseline: str | None = None
    #: A load tool this scenario needs whatever ``--tool`` says (``streamgen``).
    tool: Tool | None = None
    #: SSE chunk events per response: the report divides CPU per request by it.
    chunks: int = 0
    #: A non-stream scenario on the same kind of target: the report subtracts its CPU per
    #: request to give the net cost per chunk (the per-request work counted once).
    net_of: str | None = None


SCENARIOS: dict[str, Scenario] = {}


def register(scenario: Scenario) -> Scenario:
    if scenario.name in SCENARIOS:
        raise ValueError(f"scenario {scenario.name!r} is already registered")
    if scenario.target not in TARGETS:
        raise ValueError(f"scenario {scenario.name!r}: unknown target {scenario.target!r}")
    for other in (scenario.baseline, scenario.net_of):
        if other is not None and other not in SCENARIOS:
            raise ValueError(f"scenario {scenario.name!r}: register {other!r} first")
    SCENARIOS[scenario.name] = scenario
    return scenario


def select(names: Iterable[str]) -> list[Scenario]:
    """Scenarios named, or in a group named, plus their baselines; in registry order.
    No names: every scenario."""
    wanted = set(names)
    if not wanted:
        return list(SCENARIOS.values())
    known = set(SCENARIOS) | {g for s in SCENARIOS.values() for g in s.groups}
    if unknown := wanted - known:
        raise KeyError(f"unknown scenario or group: {', '.join(sorted(unknown))}")
    chosen = {s.name for s in SCENARIOS.values() if s.name in wanted or wanted & set(s.groups)}
    chosen |= {b for name in chosen if (b := SCENARIOS[name].baseline) is not None}
    chosen |= {n for name in chosen if (n := SCENARIOS[name].net_of) is not None}
    return [s for s in SCENARIOS.values() if s.name in chosen]


# --- built-in scenarios -------------------------------------------------------------------

HEALTH = Request("GET", "/health/live")

register(
    Scenario(
        name="baseline_h1",
        description="GET /health/live on the bare trio+h11 server: the listener's ceiling",
        target="baseline",
        protocol="h1",
        request=HEALTH,
        groups=("health", "baseline"),
    )
)
register(
    Scenario(
        name="health_h1",
        description="GET /health/live through the gateway over HTTP/1.1 keep-alive",
        target="gateway",
        protocol="h1",
        request=HEALTH,
        groups=("health",),
        baseline="baseline_h1",
    )
)
register(
    Scenario(
        name="health_h2",
        description="GET /health/live through the gateway over h2c (prior knowledge)",
        target="gateway",
        protocol="h2",
        request=HEALTH,
        groups=("health",),
        baseline="baseline_h1",
    )
)


# --- the proxy path: chat through the gateway vs straight to the fake upstream ----------------

JSON = (("content-type", "application/json"),)
CHAT_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the bench."}]}'
)
STREAM_BODY = (
    b'{"model":"bench-model","messages":[{"role":"user","content":"Say hello to the bench."}],'
    b'"stream":true}'
)
CHAT = Request("POST", "/v1/chat/completions", JSON, CHAT_BODY)
STREAM = Request("POST", "/v1/chat/completions", JSON, STREAM_BODY)
#: Chunk events per stream from ``upstream`` (bench/upstream.py's default; [DONE] not counted).
STREAM_CHUNKS = 20

register(
    Scenario(
        name="direct_h1",
        description="POST /v1/chat/completions (non-stream) straight to the fake upstream",
        target="upstream",
        protocol="h1",
        request=CHAT,
        groups=("chat", "messages", "responses"),
    )
)
register(
    Scenario(
        name="bare_proxy_h1",
        description="POST /v1/chat/completions (non-stream) through a bare trio+h11 proxy "
        "(bench/bare_proxy.py) to the upstream: what any Trio proxy on h11 spends",
        target="bare_proxy",
        protocol="h1",
        request=CHAT,
        groups=("chat",),
        baseline="direct_h1",
    )
)
register(
    Scenario(
        name="chat_h1",
        description="POST /v1/chat/completions (non-stream) through the gateway to the upstream",
        target="gateway_upstream",
        protocol="h1",
        request=CHAT,
        groups=("chat", "messages", "responses"),
        baseline="direct_h1",
    )
)
register(
    Scenario(
        name="chat_h2",
        description="chat_h1 over h2c (prior knowledge): HTTP/2 clients vs HTTP/1.1, same "
        "gateway process (target: at least 0.7x of chat_h1's req/s)",
        target="gateway_upstream",
        protocol="h2",
        request=CHAT,
        groups=("chat", "h2"),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="direct_stream_h1",
        description=f"streamed chat ({STREAM_CHUNKS} unpaced chunks) straight to the upstream",
        target="upstream",
        protocol="h1",
        request=STREAM,
        groups=("stream", "messages", "responses"),
        chunks=STREAM_CHUNKS,
    )
)
register(
    Scenario(
        name="stream_h1",
        description=f"streamed chat ({STREAM_CHUNKS} unpaced chunks) through the gateway",
        target="gateway_upstream",
        protocol="h1",
        request=STREAM,
        groups=("stream", "messages", "responses"),
        baseline="direct_stream_h1",
        chunks=STREAM_CHUNKS,
        net_of="chat_h1",
    )
)

# --- the Anthropic Messages dialect: native (anthropic-kind provider) and translated -----------

#: What an Anthropic client sends: the key (ignored with auth off; never forwarded) and the
#: API version, which the gateway forwards to a native provider.
MESSAGES_HEADERS = (
    *JSON,
    ("x-api-key", "sk-ant-client-bench"),
    ("anthropic-version", "2023-06-01"),
)


def messages_body(model: str, stream: bool = False) -> bytes:
    """The Messages twin of ``CHAT_BODY`` (``max_tokens`` is required there)."""
    tail = b',"stream":true}' if stream else b"}"
    return (
        b'{"model":"' + model.encode() + b'","max_tokens":256,'
        b'"messages":[{"role":"user","content":"Say hello to the bench."}]' + tail
    )


def _messages(model: str, stream: bool = False) -> Request:
    return Request("POST", "/v1/messages", MESSAGES_HEADERS, messages_body(model, stream))


#: Native: model ``claude-bench`` on the anthropic-kind provider (bytes forwarded as sent).
MESSAGES_NATIVE = _messages(CLAUDE_MODEL)
MESSAGES_NATIVE_STREAM = _messages(CLAUDE_MODEL, stream=True)
#: Translated: model ``bench-model`` on the openai-kind provider (Messages <-> chat).
MESSAGES_TRANSLATED = _messages(BENCH_MODEL)
MESSAGES_TRANSLATED_STREAM = _messages(BENCH_MODEL, stream=True)

register(
    Scenario(
        name="direct_messages_h1",
        description="POST /v1/messages (non-stream) straight to the fake upstream",
        target="upstream",
        protocol="h1",
        request=MESSAGES_NATIVE,
        groups=("messages",),
        baseline="direct_h1",
    )
)
register(
    Scenario(
        name="messages_native_h1",
        description="POST /v1/messages (non-stream) through the gateway to an anthropic-kind "
        "provider (the upstream's /v1/messages): the native path, vs chat_h1",
        target="gateway_upstream",
        protocol="h1",
        request=MESSAGES_NATIVE,
        groups=("messages",),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="messages_translated_h1",
        description="POST /v1/messages (non-stream) through the gateway to an openai-kind "
        "provider (Messages -> chat -> Message): the translated path, vs chat_h1",
        target="gateway_upstream",
        protocol="h1",
        request=MESSAGES_TRANSLATED,
        groups=("messages",),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="direct_messages_stream_h1",
        description=f"streamed Messages ({STREAM_CHUNKS} unpaced text deltas) straight to the "
        "upstream",
        target="upstream",
        protocol="h1",
        request=MESSAGES_NATIVE_STREAM,
        groups=("messages",),
        baseline="direct_stream_h1",
        chunks=STREAM_CHUNKS,
    )
)
register(
    Scenario(
        name="messages_native_stream_h1",
        description=f"streamed Messages ({STREAM_CHUNKS} unpaced text deltas) through the "
        "gateway to the anthropic-kind provider, events re-framed one by one; vs stream_h1",
        target="gateway_upstream",
        protocol="h1",
        request=MESSAGES_NATIVE_STREAM,
        groups=("messages",),
        baseline="stream_h1",
        chunks=STREAM_CHUNKS,
        net_of="messages_native_h1",
    )
)
register(
    Scenario(
        name="messages_translated_stream_h1",
        description=f"streamed Messages through the gateway to the openai-kind provider: "
        f"{STREAM_CHUNKS} chat chunks re-encoded as Anthropic events; vs stream_h1",
        target="gateway_upstream",
        protocol="h1",
        request=MESSAGES_TRANSLATED_STREAM,
        groups=("messages",),
        baseline="stream_h1",
        chunks=STREAM_CHUNKS,
        net_of="messages_translated_h1",
    )
)

# --- auth and per-key limits: chat_h1 with a key --------------------------------------------

register(
    Scenario(
        name="chat_h1_b",
        description="chat_h1 on a second, identical gateway process: the A/A control (how "
        "far two processes differ with nothing changed)",
        target="gateway_upstream_b",
        protocol="h1",
        request=CHAT,
        groups=("auth",),
        baseline="chat_h1",
    )
)

register(
    Scenario(
        name="auth_h1",
        description="chat_h1 with auth on: a RUNESTONE_API_KEYS key (no rate limits)",
        target="gateway_auth",
        protocol="h1",
        request=Request(
            "POST",
            "/v1/chat/completions",
            (*JSON, ("authorization", f"Bearer {PLAIN_KEY}")),
            CHAT_BODY,
        ),
        groups=("auth",),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="auth_limits_h1",
        description="chat_h1 with auth on: an [[auth.keys]] key with rpm/rph/tpm never reached",
        target="gateway_auth",
        protocol="h1",
        request=Request(
            "POST",
            "/v1/chat/completions",
            (*JSON, ("authorization", f"Bearer {LIMITED_KEY}")),
            CHAT_BODY,
        ),
        groups=("auth",),
        baseline="chat_h1",
    )
)

# --- many slow streams at once ----------------------------------------------------------------

PACED_STREAMS = (1000,)

register(
    Scenario(
        name="direct_paced_streams",
        description=(
            f"concurrent streams of {PACED_CHUNKS} chunks 20 ms apart straight to the paced "
            "upstream (bench.streamgen): the generator's and upstream's own ceiling"
        ),
        target="upstream_paced",
        protocol="h1",
        request=STREAM,
        concurrency=PACED_STREAMS,
        groups=("paced",),
        tool="streamgen",
        chunks=PACED_CHUNKS,
    )
)
register(
    Scenario(
        name="paced_streams",
        description=(
            f"concurrent streams of {PACED_CHUNKS} chunks 20 ms apart through the gateway "
            "(bench.streamgen: TTFC, gaps, stalls, RSS per stream)"
        ),
        target="gateway_paced",
        protocol="h1",
        request=STREAM,
        concurrency=PACED_STREAMS,
        groups=("paced",),
        baseline="direct_paced_streams",
        tool="streamgen",
        chunks=PACED_CHUNKS,
    )
)

# --- the OpenAI Responses dialect: its own module (registered last, after its baselines) ------

from bench import scenarios_responses  # noqa: E402, F401  (registers the responses group)
