"""Client dialects on providers that do not speak them: the translate-to-chat step and back.

A request arrives in one of three dialects: OpenAI chat completions (every provider speaks
it, through its translator), Anthropic Messages (``/v1/messages``) and OpenAI Responses
(``/v1/responses``). A provider that speaks the request's dialect gets it natively (bytes
passed through: Anthropic for Messages, OpenAI (``responses_api``) for Responses); for any
other, the call becomes a chat call here and the chat answer is encoded back:

    call (messages | responses)  -> to_chat(call, runtime, target) -> chat call
    chat answer (whole)           -> from_chat(original call, body)
    chat chunks (stream)          -> Encoded(inner stream, encoder_for(original call))

The translators are pure (``providers/messages_*``, ``providers/responses_*``); this module
only picks them per deployment, fits the chat body to the deployment (reasoning,
``max_completion_tokens``), and wraps the chunk stream. Each stream payload in the Messages
and Responses dialects is one whole SSE frame (``event:`` + ``data:``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from runestone_proxy.gateway.routing import Target
from runestone_proxy.providers.base import ProviderCall
from runestone_proxy.providers.messages_request import messages_to_chat
from runestone_proxy.providers.messages_response import chat_to_message
from runestone_proxy.providers.messages_stream import MessagesEncoder
from runestone_proxy.providers.responses_request import responses_to_chat
from runestone_proxy.providers.responses_response import chat_to_response
from runestone_proxy.providers.responses_stream import ResponsesEncoder

if TYPE_CHECKING:
    from runestone_proxy.gateway.pipeline import PayloadStream, ProviderRuntime

_random_bits = random.Random().getrandbits


class ChunkEncoder(Protocol):
    """Chat chunk payloads in, the client dialect's SSE frames out."""

    def feed(self, payload: bytes) -> list[bytes]: ...

    def finish(self) -> list[bytes]: ...

    @property
    def usage(self) -> Mapping[str, Any] | None: ...


def translated(call: ProviderCall, runtime: ProviderRuntime) -> bool:
    """The call's dialect is not this provider's own: it goes as chat."""
    endpoint = call.endpoint
    if endpoint == "messages":
        return not runtime.speaks_messages
    if endpoint == "responses":
        return not runtime.config.speaks_responses
    return False


def to_chat(call: ProviderCall, runtime: ProviderRuntime, target: Target) -> ProviderCall:
    """The chat call for a translated Messages or Responses call (usage asked for on a
    stream: both dialects report it at the end)."""
    if call.endpoint == "messages":
        body = messages_to_chat(call.body)
    else:
        body = responses_to_chat(call.body)
    return attrs.evolve(
        call,
        endpoint="chat",
        body=_fit_chat(body, runtime, target),
        raw=None,
        include_usage=call.stream,
        headers=(),
    )


def _fit_chat(body: dict[str, Any], runtime: ProviderRuntime, target: Target) -> dict[str, Any]:
    """A translated body, fitted to this deployment: ``reasoning_effort`` (from Anthropic's
    ``thinking`` / ``output_config.effort``, or Responses' ``reasoning.effort``) only for a
    model whose table entry lists the ``reasoning`` capability (OpenAI and most compatible
    servers refuse it on other models, and Claude Code asks for thinking on nearly every
    turn); OpenAI's own API takes ``max_completion_tokens`` (its reasoning models refuse
    ``max_tokens``)."""
    if "reasoning_effort" in body:
        entry = target.entry
        if entry is None or "reasoning" not in entry.capabilities:
            del body["reasoning_effort"]
    if runtime.config.resolved_flavor == "openai" and "max_tokens" in body:
        body["max_completion_tokens"] = body.pop("max_tokens")
    return body


def new_response_id() -> str:
    """``resp_`` and 96 random bits (ids are not secrets: no syscall per request)."""
    return f"resp_{_random_bits(96):024x}"


def from_chat(call: ProviderCall, body: bytes) -> bytes:
    """A whole chat answer in the original call's dialect."""
    if call.endpoint == "messages":
        return chat_to_message(body, model=call.model)
    return chat_to_response(
        body, request=call.body, response_id=new_response_id(), created=int(time.time())
    )


def encoder_for(call: ProviderCall) -> ChunkEncoder:
    """The chunk encoder for the original call's dialect."""
    if call.endpoint == "messages":
        return MessagesEncoder(call.model)
    return ResponsesEncoder(
        request=call.body, response_id=new_response_id(), created=int(time.time())
    )


@attrs.define(eq=False)
class Encoded:
    """A translated stream: the provider's chat chunks, re-encoded in the client's dialect.
    The inner stream decided how the upstream ended; a clean end closes the answer
    (Messages: ``message_delta`` and ``message_stop``; Responses: the ``.done`` events and
    ``response.completed``)."""

    inner: PayloadStream
    encoder: ChunkEncoder
    finished: bool = False

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.inner.usage or self.encoder.usage

    @property
    def final(self) -> bytes | None:
        """The whole answer object as the stream ended (Responses), else None."""
        final: bytes | None = getattr(self.encoder, "final", None)
        return final

    async def next(self) -> list[bytes] | None:
        encoder = self.encoder
        while not self.finished:
            payloads = await self.inner.next()
            if payloads is None:
                self.finished = True
                return encoder.finish() or None
            out: list[bytes] = []
            for payload in payloads:
                out.extend(encoder.feed(payload))
            if out:
                return out
        return None
