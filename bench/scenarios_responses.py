"""The OpenAI Responses dialect's scenarios (group ``responses``), registered on import by
:mod:`bench.scenarios`.

``POST /v1/responses`` three ways, whole and streamed: straight to the fake upstream (the
direct baselines), through the gateway to ``resp-bench`` on the provider with
``responses_api = true`` (native: the body forwarded as sent, the events relayed one by
one), and through the gateway to ``bench-model`` on the chat-only provider (translated:
Responses -> chat -> Response, or chat chunks -> Responses events). The gateway rows'
baselines are ``chat_h1`` and ``stream_h1`` on the same process, so their ``cost`` column
is the dialect's CPU per request against chat passthrough.

Every request says ``"store": false``: a stored turn (the API's default) adds a durable
write per request that chat has no counterpart for, and would be measured here as the
dialect's cost.
"""

from __future__ import annotations

from bench.load import Request
from bench.scenarios import JSON, STREAM_CHUNKS, Scenario, register
from bench.targets import BENCH_MODEL, RESPONSES_MODEL

PROMPT = b"Say hello to the bench."


def responses_body(model: str, stream: bool = False) -> bytes:
    """The Responses twin of ``CHAT_BODY``: the same prompt as a plain ``input`` string."""
    tail = b',"stream":true}' if stream else b"}"
    return b'{"model":"' + model.encode() + b'","input":"' + PROMPT + b'","store":false' + tail


def _responses(model: str, stream: bool = False) -> Request:
    return Request("POST", "/v1/responses", JSON, responses_body(model, stream))


#: Native: ``resp-bench`` on the provider with ``responses_api = true``.
RESPONSES_NATIVE = _responses(RESPONSES_MODEL)
RESPONSES_NATIVE_STREAM = _responses(RESPONSES_MODEL, stream=True)
#: Translated: ``bench-model`` on the chat-only openai-kind provider.
RESPONSES_TRANSLATED = _responses(BENCH_MODEL)
RESPONSES_TRANSLATED_STREAM = _responses(BENCH_MODEL, stream=True)

register(
    Scenario(
        name="direct_responses_h1",
        description="POST /v1/responses (non-stream) straight to the fake upstream",
        target="upstream",
        protocol="h1",
        request=RESPONSES_NATIVE,
        groups=("responses",),
        baseline="direct_h1",
    )
)
register(
    Scenario(
        name="responses_native_h1",
        description="POST /v1/responses (non-stream) through the gateway to the provider with "
        "responses_api (the upstream's /v1/responses): the native path, vs chat_h1",
        target="gateway_upstream",
        protocol="h1",
        request=RESPONSES_NATIVE,
        groups=("responses",),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="responses_translated_h1",
        description="POST /v1/responses (non-stream) through the gateway to the chat-only "
        "provider (Responses -> chat -> Response): the translated path, vs chat_h1",
        target="gateway_upstream",
        protocol="h1",
        request=RESPONSES_TRANSLATED,
        groups=("responses",),
        baseline="chat_h1",
    )
)
register(
    Scenario(
        name="direct_responses_stream_h1",
        description=f"streamed Responses ({STREAM_CHUNKS} unpaced text deltas) straight to "
        "the upstream",
        target="upstream",
        protocol="h1",
        request=RESPONSES_NATIVE_STREAM,
        groups=("responses",),
        baseline="direct_stream_h1",
        chunks=STREAM_CHUNKS,
    )
)
register(
    Scenario(
        name="responses_native_stream_h1",
        description=f"streamed Responses ({STREAM_CHUNKS} unpaced text deltas) through the "
        "gateway to the responses_api provider, events re-framed one by one; vs stream_h1",
        target="gateway_upstream",
        protocol="h1",
        request=RESPONSES_NATIVE_STREAM,
        groups=("responses",),
        baseline="stream_h1",
        chunks=STREAM_CHUNKS,
        net_of="responses_native_h1",
    )
)
register(
    Scenario(
        name="responses_translated_stream_h1",
        description=f"streamed Responses through the gateway to the chat-only provider: "
        f"{STREAM_CHUNKS} chat chunks re-encoded as Responses events; vs stream_h1",
        target="gateway_upstream",
        protocol="h1",
        request=RESPONSES_TRANSLATED_STREAM,
        groups=("responses",),
        baseline="stream_h1",
        chunks=STREAM_CHUNKS,
        net_of="responses_translated_h1",
    )
)
