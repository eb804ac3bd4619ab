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
                      terminator seen (st.done), or the upstream ended without one:
                      st.finish(ending) -> [payload] (raises if something was lost)
                      st.usage -> the usage the stream reported (for accounting)

Stream payloads are the JSON text of ``chat.completion.chunk`` (or ``text_completion``)
objects, without SSE framing; the relay frames them as ``data: <payload>\\n\\n`` and adds
``data: [DONE]``. Payloads are bytes so that a pass-through provider can forward the
upstream's own bytes without a decode/encode round trip.

Stream endings ("honest, not pedantic"): a stream that ends without its terminator
(``[DONE]``, ``message_stop``) lost nothing if the provider had already said how it finished
(every choice's ``finish_reason``; Anthropic's ``message_delta`` with ``stop_reason``): it
ends normally. Anything cut before that, or cut inside an SSE event, ends with an error,
never a made-up ``finish_reason``. Each stream translator writes its rule as one table,
``ENDINGS: (its phase, Ending) -> Outcome``, which its ``finish`` and its tests both read.

Usage: the ``choices: []`` usage chunk reaches the client only if it asked
(``include_usage``); Runestone may ask the provider anyway (``account_usage``) and reads the
numbers from ``StreamTranslator.usage``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import attrs

from runestone_proxy.errors import ProviderError
from runestone_proxy.protocol.sse import SSEEvent

Endpoint = Literal["chat", "completions", "embeddings", "messages", "count_tokens", "responses"]
HeaderPairs = Sequence[tuple[bytes, bytes]]

#: How an upstream stream ended when its terminator had not arrived:
#: ``eof``: the body ended cleanly at an event boundary;
#: ``partial``: the body ended (or broke) with an incomplete SSE event pending;
#: ``broken``: a transport failure (reset, cut chunked framing, stall timeout) at an event
#: boundary. After the terminator every ending is irrelevant (the stream is complete).
Ending = Literal["eof", "partial", "broken"]
ENDING_KINDS: tuple[Ending, ...] = ("eof", "partial", "broken")
#: What an ending means: ``end`` normally (usage chunk if asked, then ``[DONE]``) or
#: ``error`` (an error event, then ``[DONE]``).
Outcome = Literal["end", "error"]


#: Request fields that are Runestone's own, not the client dialect's: read by the gateway
#: (routing, tenancy, overflow), never sent to a provider. The one list; the API layer pops
#: them before a call, and a translator that rewrites a body leaves them out.
RUNESTONE_FIELDS = frozenset(
    {"provider", "model_family", "capabilities", "max_cost_per_token", "tenant_id", "webhook_url"}
)


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
    #: Runestone wants the stream's usage for its own accounting (a tokens-per-minute limit):
    #: the provider is asked for it even if the client did not ask; the client never sees it.
    account_usage: bool = False
    #: The client's original bytes, when they may be forwarded untouched (no rewrite needed).
    raw: bytes | None = None
    request_id: str = ""
    #: Client request headers a native provider receives as sent (the API layer filtered
    #: them: ``anthropic-*``, ``x-app``, ``x-claude-code-session-id``; never auth).
    headers: tuple[tuple[bytes, bytes], ...] = ()


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

    @property
    def usage(self) -> Mapping[str, Any] | None:
        """The OpenAI-shaped usage the stream reported so far (None if none), whether or not
        the client sees it."""

    def feed(self, event: SSEEvent) -> list[bytes]:
        """Translate one event. Raises :class:`ProviderError` on an in-band error event."""

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        """Upstream ended (``ending`` is ignored once :attr:`done`). Trailing payloads (e.g.
        the usage chunk), or raise :class:`~runestone_proxy.errors.UpstreamProtocolError`
        where the translator's ``ENDINGS`` table says something was lost."""


class Translator(Protocol):
    def build_request(self, call: ProviderCall, api_key: str | None) -> UpstreamRequest: ...

    def parse_response(self, call: ProviderCall, body: bytes) -> bytes:
        """A 2xx whole body -> OpenAI JSON bytes (may raise ProviderError for in-band errors)."""

    def stream(self, call: ProviderCall) -> StreamTranslator: ...

    def parse_error(self, status: int, headers: HeaderPairs, body: bytes) -> ProviderError:
        """A non-2xx answer -> the error the client sees (status, type, code, retry-after)."""
