"""The Anthropic Messages API translator: OpenAI ``chat.completions`` <-> ``POST /v1/messages``.

Owns :class:`AnthropicTranslator`, the :class:`~runestone_proxy.providers.base.Translator` for
``kind = "anthropic"`` providers: the upstream request line and headers, and the wiring of the
modules that live next to it:

    anthropic_request.py   OpenAI request body -> Messages API body (system, tools,
                           sampling, extended thinking)
    anthropic_messages.py  OpenAI messages -> Messages API turns and content blocks (text,
                           images, thinking, tool use and results)
    anthropic_response.py  Message -> chat.completion; stop reasons, usage; error bodies
    anthropic_stream.py    the streaming state machine (Anthropic events -> chunks)
    anthropic_native.py    the Messages dialect passed through (``messages``,
                           ``count_tokens``): request, whole answer, stream frames

``chat`` is translated. ``completions`` calls arrive already converted to chat messages by the
gateway, and are translated like chat; Anthropic has no embeddings endpoint. A client that
speaks Anthropic's own dialect (``endpoint`` ``messages`` or ``count_tokens``) is served
natively: its bytes go upstream untouched where no rewrite is needed, and Anthropic's answer
comes back as Anthropic sent it.

API reference: https://docs.anthropic.com/en/api/messages ("x-api-key", "anthropic-version"
and "content-type: application/json" are required headers; the provider's API root ends in
``/v1`` whether its ``base_url`` was written with it or, as ``ANTHROPIC_BASE_URL`` is, without
(config/base_url.py), so the path is ``/messages``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from runestone_proxy.errors import InvalidParam, ProviderError, UpstreamProtocolError
from runestone_proxy.providers.anthropic_native import (
    AnthropicPassthrough,
    native_request,
    native_response,
)
from runestone_proxy.providers.anthropic_request import build_body
from runestone_proxy.providers.anthropic_response import (
    chat_completion,
    detail_code,
    dumps,
    error_fields,
    error_from_body,
)
from runestone_proxy.providers.anthropic_stream import AnthropicStream
from runestone_proxy.providers.base import HeaderPairs, ProviderCall, UpstreamRequest
from runestone_proxy.providers.provider_errors import anthropic_error

#: The endpoints Anthropic's own clients call: passed through, not translated.
_NATIVE = frozenset({"messages", "count_tokens"})


def _now() -> int:
    return int(time.time())


@attrs.frozen
class AnthropicTranslator:
    """OpenAI shapes in, Anthropic Messages API out, and back. Stateless; one per provider."""

    name: str
    #: ``max_tokens`` is required by Anthropic; sent when the client gave none.
    default_max_tokens: int = 4096
    api_version: str = "2023-06-01"
    #: The ``created`` timestamp source (epoch seconds); injected by tests.
    clock: Callable[[], int] = attrs.field(default=_now, kw_only=True, repr=False)

    def build_request(self, call: ProviderCall, api_key: str | None) -> UpstreamRequest:
        if call.endpoint in _NATIVE:
            return native_request(call, api_key, self.api_version)
        self._check_endpoint(call)
        body = build_body(
            call.body,
            model=call.model,
            stream=call.stream,
            default_max_tokens=self.default_max_tokens,
        )
        headers = [
            (b"anthropic-version", self.api_version.encode()),
            (b"content-type", b"application/json"),
        ]
        if api_key is not None:
            headers.insert(0, (b"x-api-key", api_key.encode()))
        if call.stream:
            headers.append((b"accept", b"text/event-stream"))
        return UpstreamRequest(
            method="POST", path="/messages", headers=tuple(headers), body=dumps(body)
        )

    def parse_response(self, call: ProviderCall, body: bytes) -> bytes:
        if call.endpoint in _NATIVE:
            return native_response(self.name, body)
        message = self._loads(body)
        error_type, error_message = error_fields(message)
        if message.get("type") == "error" and error_type is not None:
            raise anthropic_error(
                error_type, error_message, http_status=200, detail_code=detail_code(message)
            )
        if not isinstance(message.get("content"), list):
            raise UpstreamProtocolError(f"{self.name}: response has no content array.")
        return dumps(chat_completion(message, model=call.model, created=self.clock()))

    def stream(self, call: ProviderCall) -> AnthropicStream | AnthropicPassthrough:
        if call.endpoint == "messages":
            return AnthropicPassthrough(self.name)
        self._check_endpoint(call)
        return AnthropicStream(
            provider=self.name,
            model=call.model,
            created=self.clock(),
            include_usage=call.include_usage,
        )

    def parse_error(self, status: int, headers: HeaderPairs, body: bytes) -> ProviderError:
        return error_from_body(status, headers, body, now=self.clock())

    def _check_endpoint(self, call: ProviderCall) -> None:
        if call.endpoint == "count_tokens":
            raise InvalidParam("count_tokens answers whole; it cannot stream.", param="stream")
        if call.endpoint == "embeddings":
            raise InvalidParam(
                f"Anthropic has no embeddings endpoint; model {call.model!r} on provider "
                f"{self.name!r} cannot embed.",
                param="model",
            )

    def _loads(self, body: bytes) -> Mapping[str, Any]:
        try:
            obj = json.loads(body)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError(f"{self.name}: response body is not a JSON object.")
        return obj
