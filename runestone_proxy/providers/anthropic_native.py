"""The Messages dialect on an Anthropic provider: the client's call passed through. No I/O.

Owns the native half of :class:`~runestone_proxy.providers.anthropic.AnthropicTranslator`:
when an Anthropic Messages client (Claude Code, the ``anthropic`` SDKs) reaches a
``kind = "anthropic"`` provider, nothing is translated. This module builds the upstream
request (:func:`native_request`), checks a whole answer and hands it back byte for byte
(:func:`native_response`), and relays a stream event by event (:class:`AnthropicPassthrough`),
reading only what Runestone needs on the way: the usage, an in-band error, the end.

Request (https://docs.anthropic.com/en/api/messages, /en/api/messages-count-tokens):
``POST /messages`` or ``/messages/count_tokens`` with ``x-api-key``, ``anthropic-version`` (the
client's, else the provider's default) and every other header the API layer passed on
(``anthropic-beta`` turns on beta features, so it must reach the API as sent). The body is
the client's own bytes unless something needs a rewrite: another upstream ``model`` (an alias),
a Runestone field, a ``stream`` flag that is not the call's. count_tokens bodies carry no
``stream``.

Stream (https://docs.anthropic.com/en/api/messages-streaming): each event leaves as the frame
``event: <name>\\ndata: <data>\\n\\n``, pings and event types Runestone does not know included
("your code should handle unknown event types gracefully": that is the client's to do, so
they are passed on). JSON is parsed only for the events that carry usage or an error:

    message_start   message.usage: input_tokens, cache_read_input_tokens,
                    cache_creation_input_tokens (output_tokens so far)
    message_delta   usage (cumulative: "the token counts shown in the usage field of the
                    message_delta event are cumulative"); delta.stop_reason -> STOPPED
    error           raises the mapped ProviderError (its ``provider_type`` is Anthropic's type,
                    so the API layer's ``event: error`` frame says what Anthropic said)
    message_stop    DONE

Text, thinking and tool-input deltas (almost every event of a stream) pass with one string
comparison and no ``json.loads``. ``ENDINGS`` says what an upstream end without
``message_stop`` means: after a ``message_delta`` that carried a ``stop_reason`` nothing was lost,
and :meth:`AnthropicPassthrough.finish` sends the missing ``message_stop`` frame; earlier, or
with an event cut in half, it is an :class:`~runestone_proxy.errors.UpstreamProtocolError`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.anthropic_response import (
    JSON,
    detail_code,
    error_fields,
    usage_to_openai,
)
from runestone_proxy.providers.base import (
    RUNESTONE_FIELDS,
    Ending,
    Outcome,
    ProviderCall,
    UpstreamRequest,
)
from runestone_proxy.providers.json_codec import dumps, loads_object
from runestone_proxy.providers.messages_frames import frame
from runestone_proxy.providers.provider_errors import anthropic_error

__all__ = ["ENDINGS", "AnthropicPassthrough", "Phase", "native_request", "native_response"]

_PATHS: Final[Mapping[str, str]] = {
    "messages": "/messages",
    "count_tokens": "/messages/count_tokens",
}
#: Headers this module writes itself; a client's copy of one is never forwarded.
_OWN_HEADERS: Final = frozenset(
    {
        b"x-api-key",
        b"authorization",
        b"anthropic-version",
        b"content-type",
        b"content-length",
        b"accept",
        b"host",
    }
)


def native_request(call: ProviderCall, api_key: str | None, api_version: str) -> UpstreamRequest:
    """The upstream request for a ``messages`` or ``count_tokens`` call, headers as sent."""
    headers: list[tuple[bytes, bytes]] = []
    if api_key is not None:
        headers.append((b"x-api-key", api_key.encode()))
    version = api_version.encode()
    passed = []
    for name, value in call.headers:
        if name == b"anthropic-version":
            version = value
        elif name not in _OWN_HEADERS:
            passed.append((name, value))
    headers.append((b"anthropic-version", version))
    headers.extend(passed)
    headers.append((b"content-type", b"application/json"))
    streaming = call.stream and call.endpoint == "messages"
    if streaming:
        headers.append((b"accept", b"text/event-stream"))
    return UpstreamRequest(
        method="POST",
        path=_PATHS[call.endpoint],
        headers=tuple(headers),
        body=_body(call, streaming),
    )


def _body(call: ProviderCall, streaming: bool) -> bytes:
    """The client's bytes when they may go as they are, else the body re-encoded."""
    body = call.body
    if (
        call.raw is not None
        and body.get("model") == call.model
        and RUNESTONE_FIELDS.isdisjoint(body)
        and (
            body.get("stream", False) is streaming
            if call.endpoint == "messages"
            else "stream" not in body
        )
    ):
        return call.raw
    out = {k: v for k, v in body.items() if k not in RUNESTONE_FIELDS and k != "stream"}
    out["model"] = call.model
    if streaming:
        out["stream"] = True
    return dumps(out)


def native_response(provider: str, body: bytes) -> bytes:
    """A 2xx whole answer, returned unchanged once it is known to be a JSON object and not an
    in-band ``{"type": "error"}`` (which raises the mapped ProviderError)."""
    obj = loads_object(body, f"{provider}: response body")
    if obj.get("type") == "error":
        error_type, message = error_fields(obj)
        if error_type is not None:
            raise anthropic_error(
                error_type, message, http_status=200, detail_code=detail_code(obj)
            )
    return body


# --- the stream --------------------------------------------------------------------------------


class Phase(enum.Enum):
    START = "start"  # no message_start yet
    OPEN = "open"  # message_start seen; no stop_reason yet
    STOPPED = "stopped"  # a message_delta carried a stop_reason
    DONE = "done"  # message_stop seen


#: (phase, how the upstream ended without message_stop) -> outcome; read by
#: :meth:`AnthropicPassthrough.finish` and the tests. ``end`` in STOPPED sends the missing
#: ``message_stop`` frame; in DONE nothing is missing.
ENDINGS: Final[Mapping[tuple[Phase, Ending], Outcome]] = {
    (Phase.START, "eof"): "error",
    (Phase.START, "partial"): "error",
    (Phase.START, "broken"): "error",
    (Phase.OPEN, "eof"): "error",
    (Phase.OPEN, "partial"): "error",
    (Phase.OPEN, "broken"): "error",
    (Phase.STOPPED, "eof"): "end",
    (Phase.STOPPED, "partial"): "error",
    (Phase.STOPPED, "broken"): "end",
    (Phase.DONE, "eof"): "end",
    (Phase.DONE, "partial"): "end",
    (Phase.DONE, "broken"): "end",
}

#: Events whose JSON is read; every other event passes without being parsed.
_READ: Final = frozenset({"message_start", "message_delta", "error"})
_MESSAGE_STOP: Final = b'event: message_stop\ndata: {"type":"message_stop"}\n\n'


@attrs.define
class AnthropicPassthrough:
    """One Anthropic stream relayed as whole frames. Implements ``base.StreamTranslator``."""

    provider: str
    _phase: Phase = Phase.START
    _usage: dict[str, Any] = attrs.field(factory=dict, repr=False)

    @property
    def done(self) -> bool:
        return self._phase is Phase.DONE

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def usage(self) -> JSON | None:
        """The usage so far in OpenAI's shape (message_start's, then message_delta's)."""
        return usage_to_openai(self._usage) if self._usage else None

    def feed(self, event: SSEEvent) -> list[bytes]:
        name, data = event.event, event.data
        if name == "message":  # no ``event:`` line: the JSON's type names the event
            name = str(self._decode(name, data).get("type", name))
        if name in _READ:
            self._read(name, data)
        elif name == "message_stop":
            self._phase = Phase.DONE
        return [frame(name, data)]

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        phase = self._phase
        if phase is Phase.DONE:
            return []
        if ENDINGS[phase, ending] == "error":
            where = "inside an event" if ending == "partial" else f"in phase {phase.value}"
            raise UpstreamProtocolError(
                f"{self.provider}: stream ended before message_stop, {where}."
            )
        self._phase = Phase.DONE  # the stop_reason was said: end as message_stop would
        return [_MESSAGE_STOP]

    def _read(self, name: str, data: bytes) -> None:
        obj = self._decode(name, data)
        if name == "error":
            error_type, message = error_fields(obj)
            raise anthropic_error(
                error_type or "api_error",
                message or "error",
                http_status=200,
                detail_code=detail_code(obj),
            )
        if name == "message_start":
            started = obj.get("message")
            self._count(started.get("usage") if isinstance(started, dict) else None)
            if self._phase is Phase.START:
                self._phase = Phase.OPEN
            return
        self._count(obj.get("usage"))  # message_delta
        delta = obj.get("delta")
        stopped = isinstance(delta, dict) and isinstance(delta.get("stop_reason"), str)
        if stopped and self._phase is not Phase.DONE:
            self._phase = Phase.STOPPED

    def _count(self, usage: Any) -> None:
        # Counts are cumulative, so they replace ours; a null keeps the value we had.
        if isinstance(usage, dict):
            self._usage.update((k, v) for k, v in usage.items() if v is not None)

    def _decode(self, name: str, data: bytes) -> JSON:
        try:
            obj = json.loads(data)
        except ValueError:
            raise UpstreamProtocolError(
                f"{self.provider}: stream event {name!r} is not JSON."
            ) from None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError(f"{self.provider}: stream event {name!r} is not an object.")
        return obj
