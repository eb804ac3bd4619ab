"""The ``openai`` provider kind: OpenAI and OpenAI-compatible APIs (Groq, OpenRouter, any
server that speaks ``/v1/chat/completions``). No I/O.

Owns the translation for upstreams that already speak our wire format, which is mostly
*not* translating: request bytes are forwarded untouched when the client's body needs no
rewrite, and 2xx bodies and stream chunks are forwarded untouched unless a cheap byte
check finds one of the known quirks:

* OpenRouter answers some failures with HTTP 200 and an ``{"error": {...}}`` body, and
  reports failures after a stream started as a ``data:`` event with a top-level ``error``
  (https://openrouter.ai/docs/api-reference/errors, "Error Handling During Streaming").
  Both become :class:`ProviderError`. Its ``: OPENROUTER PROCESSING`` keep-alives are SSE
  comments, which the SSE parser already drops.
* Groq reports stream usage in ``x_groq.usage`` on the last content chunk
  (https://console.groq.com/docs/api-reference#chat-create). It is moved to the standard
  ``usage`` field, and for ``stream_options.include_usage`` clients into a final
  ``choices: []`` usage chunk, as OpenAI sends it
  (https://platform.openai.com/docs/api-reference/chat/streaming).

The ``responses`` endpoint (a ``/v1/responses`` call on a provider that serves OpenAI's
Responses API, https://platform.openai.com/docs/api-reference/responses/create) goes to
``POST /responses`` the same way: the client's bytes unless the model, a Runestone field or
the ``stream`` flag needs a rewrite; a whole answer comes back as it is (an error envelope in
a 200 aside), a stream through :class:`.responses_native.ResponsesPassthrough`.

Usage chunks and stream endings: :mod:`.openai_stream`. Error shapes (OpenAI's envelope and
what compatible servers send instead): :mod:`.openai_errors`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import attrs

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.providers.base import (
    RUNESTONE_FIELDS,
    HeaderPairs,
    ProviderCall,
    UpstreamRequest,
)
from runestone_proxy.providers.json_codec import dumps, loads_object
from runestone_proxy.providers.openai_errors import (
    error_from_payload,
    error_from_response,
    is_error,
)
from runestone_proxy.providers.openai_stream import OpenAIStream, groq_usage
from runestone_proxy.providers.responses_native import ResponsesPassthrough

__all__ = [
    "Flavor",
    "OpenAITranslator",
]

Flavor = Literal["openai", "groq", "openrouter", "generic"]

_PATHS = {
    "chat": "/chat/completions",
    "completions": "/completions",
    "embeddings": "/embeddings",
    "responses": "/responses",
}


@attrs.frozen
class OpenAITranslator:
    """:class:`~runestone_proxy.providers.base.Translator` for the ``openai`` kind.

    ``flavor`` names the upstream for error messages and future per-service needs; the known
    quirks are recognised from the bytes themselves (cheaply), so a ``generic`` base_url
    that fronts Groq or OpenRouter is handled too.
    """

    name: str
    flavor: Flavor = "openai"

    def build_request(self, call: ProviderCall, api_key: str | None) -> UpstreamRequest:
        headers: list[tuple[bytes, bytes]] = []
        if api_key is not None:
            headers.append((b"authorization", b"Bearer " + api_key.encode("latin-1")))
        headers.append((b"content-type", b"application/json"))
        if call.stream and call.endpoint != "embeddings":
            headers.append((b"accept", b"text/event-stream"))
        else:
            headers.append((b"accept", b"application/json"))
        raw = call.raw
        if raw is not None and not _needs_rewrite(call):
            body = raw  # the client's own bytes: no decode/encode round trip
        elif raw is not None and _only_usage_missing(call) and raw[:1] == b"{":
            # Runestone asks for the stream's usage (its ledger): one member spliced in
            # front of the client's bytes, no decode/encode ("stream_options" is absent, so
            # no key is duplicated).
            body = _ASK_USAGE + raw[1:]
        else:
            body = dumps(_rewrite(call))
        return UpstreamRequest(
            method="POST", path=_PATHS[call.endpoint], headers=tuple(headers), body=body
        )

    def parse_response(self, call: ProviderCall, body: bytes) -> bytes:
        if not body.lstrip()[:1] == b"{":
            raise UpstreamProtocolError(f"{self.name}: 2xx response body is not a JSON object")
        if call.endpoint == "responses" and (
            b'"object":"response"' in body or b'"object": "response"' in body
        ):
            # A Response object (its own ``error`` member is null, or a failed Response's
            # {"code", "message"}: the answer, not an envelope). Inside a string the quotes
            # would be escaped, so the check cannot be fooled by content.
            return body
        obj: dict[str, Any] | None = None
        if b'"error"' in body:
            obj = loads_object(body, f"{self.name} response")
            # OpenRouter: "the returned HTTP response status will be 200 and any error ...
            # will be emitted in the response body".
            if is_error(obj) and not _is_answer(obj):
                raise error_from_payload(obj)
        if call.endpoint == "responses":
            return body
        if b'"x_groq"' in body:
            obj = obj if obj is not None else loads_object(body, f"{self.name} response")
            usage = groq_usage(obj)
            if usage is not None and obj.get("usage") is None:
                obj["usage"] = usage
                return dumps(obj)
        return body

    def stream(self, call: ProviderCall) -> OpenAIStream | ResponsesPassthrough:
        if call.endpoint == "responses":
            return ResponsesPassthrough(self.name)
        n = call.body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) else 1
        return OpenAIStream(name=self.name, include_usage=call.include_usage, n=n)

    def parse_error(self, status: int, headers: HeaderPairs, body: bytes) -> ProviderError:
        return error_from_response(status, headers, body)


def _is_answer(obj: Mapping[str, Any]) -> bool:
    return "choices" in obj or "data" in obj or obj.get("object") == "response"


def _needs_rewrite(call: ProviderCall) -> bool:
    body = call.body
    if body.get("model") != call.model or not RUNESTONE_FIELDS.isdisjoint(body):
        return True
    if call.endpoint == "embeddings":
        return False
    if bool(body.get("stream", False)) != call.stream:
        return True
    if call.endpoint == "responses":
        return False  # usage is always in response.completed: nothing to ask for
    wants_usage = call.include_usage or call.account_usage
    return call.stream and wants_usage and not _asks_usage(body)


_ASK_USAGE = b'{"stream_options":{"include_usage":true},'


def _only_usage_missing(call: ProviderCall) -> bool:
    """The body would be forwarded as sent but for the usage Runestone asks of a stream."""
    body = call.body
    return (
        call.stream
        and call.endpoint in ("chat", "completions")
        and "stream_options" not in body
        and body.get("model") == call.model
        and body.get("stream") is True
        and RUNESTONE_FIELDS.isdisjoint(body)
    )


def _asks_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, Mapping) and opts.get("include_usage") is True


def _rewrite(call: ProviderCall) -> dict[str, Any]:
    out = {k: v for k, v in call.body.items() if k not in RUNESTONE_FIELDS}
    out["model"] = call.model
    if call.endpoint == "embeddings":
        return out
    if call.endpoint == "responses":
        out.pop("stream", None)
        if call.stream:
            out["stream"] = True
        else:
            # "stream_options: ... Only set this when you set stream: true."
            out.pop("stream_options", None)
        return out
    if call.stream:
        out["stream"] = True
        if call.include_usage or call.account_usage:
            opts = out.get("stream_options")
            out["stream_options"] = {**(opts if isinstance(opts, Mapping) else {})}
            out["stream_options"]["include_usage"] = True
    else:
        # OpenAI rejects stream_options unless stream is true.
        out.pop("stream", None)
        out.pop("stream_options", None)
    return out
