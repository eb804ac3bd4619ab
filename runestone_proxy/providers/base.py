"""What every provider translator offers the pipeline. No I/O lives under ``providers/``.

A translator turns one OpenAI-shaped call into the bytes of one upstream HTTP request, and
the provider's answer (whole, streamed as SSE events, or an error) back into OpenAI's shapes.
The pipeline (``gateway/pipeline.py``) does the I/O around it:

    call = ProviderCall(...)                        # parsed once by the API layer
    up = translator.build_request(call, api_key)    # -> UpstreamRequest
    ... send it with the upstream pool ...
    status != 2xx  -> raise translator.parse_error(status, headers, body)
    non-stream     -> translator.parse_response(call, body) -> OpenAI JSON bytes
    stream         -> st = translator.stream(call)
                      each SSE event: st.feed(event) -> [payload]
                      upstream EOF: st.finish() -> [payload] (raises if the stream was cut)

Stream payloads are the JSON text of ``chat.completion.chunk`` (or ``text_completion``)
objects, without SSE framing; the relay frames them as ``data: <payload>\\n\\n`` and adds
``data: [DONE]``. Payloads are bytes so that a pass-through provider can forward the
upstream's own bytes without a decode/encode round trip.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

from runestone_proxy.errors import ProviderError
from runestone_proxy.protocol.sse import SSEEvent

Endpoint = Literal["chat", "completions", "embeddings"]
HeaderPairs = Sequence[tuple[bytes, bytes]]


@attrs.frozen
class ProviderCall:
    """One call to one provider, as the router resolved it."""

    endpoint: Endpoint
    #: The parsed OpenAI request body, Runestone's own extras already removed.
    body: Mapping[str, Any]
    #: The model id to send upstream (after alias / ``provider:model`` resolution).
    model: str
    stream: bool = False
    #: ``stream_options.include_usage`` as the client asked for it.
    include_usage: bool = False
    #: The client's original bytes, when they may be forwarded untouched (no rewrite needed).
    raw: bytes | None = None
    request_id: str = ""


@attrs.frozen
class UpstreamRequest:
    method: str
    #: Appended to the provider's ``base_url`` path, e.g. ``/chat/completions``, ``/messages``.
    path: str
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes


class StreamTranslator(Protocol):
    """Per-stream state machine: provider SSE events in, OpenAI chunk payloads out."""

    @property
    def done(self) -> bool:
        """True once the provider's terminal event arrived (``[DONE]``, ``message_stop``)."""

    def feed(self, event: SSEEvent) -> list[bytes]:
        """Translate one event. Raises :class:`ProviderError` on an in-band error event."""

    def finish(self) -> list[bytes]:
        """Upstream ended. Trailing payloads (e.g. the usage chunk), or raise
        :class:`~runestone_proxy.errors.UpstreamProtocolError` if the stream was cut."""


class Translator(Protocol):
    def build_request(self, call: ProviderCall, api_key: str | None) -> UpstreamRequest: ...

    def parse_response(self, call: ProviderCall, body: bytes) -> bytes:
        """A 2xx whole body -> OpenAI JSON bytes (may raise ProviderError for in-band errors)."""

    def stream(self, call: ProviderCall) -> StreamTranslator: ...

    def parse_error(self, status: int, headers: HeaderPairs, body: bytes) -> ProviderError:
        """A non-2xx answer -> the error the client sees (status, type, code, retry-after)."""
