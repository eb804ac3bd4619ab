"""The Responses dialect on an OpenAI provider: the client's stream passed through. No I/O.

Owns the native stream half of the Responses dialect: when an OpenAI Responses client (the
``openai`` SDK's ``client.responses``, the Agents SDK) reaches a provider that serves
``POST /responses`` itself (``ProviderConfig.speaks_responses``), nothing is translated.
:class:`~runestone_proxy.providers.openai.OpenAITranslator` builds the request and checks a
whole answer; this module relays the stream event by event (:class:`ResponsesPassthrough`),
reading only what Runestone needs on the way, and reads a whole answer's usage
(:func:`usage_from_response`).

Stream (https://platform.openai.com/docs/api-reference/responses-streaming): every event is
``event: <type>\\ndata: <json>\\n\\n`` with a ``sequence_number``; there is no ``[DONE]``: the
stream ends with one terminal event that carries the whole Response object. Each event
leaves as the same frame, unknown event types included. JSON is parsed only for:

    response.completed    response.usage -> usage; response -> final; DONE
    response.incomplete   the same (``max_output_tokens`` or a content filter stopped it)
    response.failed       the same, then raises the ProviderError built from
                          ``response.error`` ({"code", "message"})
    error                 raises the ProviderError built from the event's code / message /
                          param (``{"type": "error", "code", "message", "param", ...}``)

Text, reasoning and function-call deltas (almost every event) pass with one set lookup and
no ``json.loads``. ``ENDINGS`` says what an upstream end without a terminal event means:
the Response object, its status and its usage are in the terminal event only, so an end
before it always lost something and is an
:class:`~runestone_proxy.errors.UpstreamProtocolError`; after it nothing is missing.

Usage leaves in OpenAI's chat shape (what the gateway accounts), from the Responses shape
(https://platform.openai.com/docs/api-reference/responses/object#responses/object-usage):

    input_tokens                          -> prompt_tokens
    output_tokens                         -> completion_tokens
    total_tokens                          -> total_tokens (their sum when absent)
    input_tokens_details.cached_tokens    -> prompt_tokens_details.cached_tokens
    output_tokens_details.reasoning_tokens -> completion_tokens_details.reasoning_tokens
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping
from typing import Any, Final

import attrs

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.base import Ending, Outcome
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_frames import frame
from runestone_proxy.providers.openai_errors import error_from_payload

__all__ = [
    "ENDINGS",
    "TERMINAL",
    "Phase",
    "ResponsesPassthrough",
    "usage_from_response",
    "usage_to_chat",
]

JSON = dict[str, Any]

#: The events that end a Responses stream; each carries the whole Response object.
TERMINAL: Final = frozenset({"response.completed", "response.incomplete", "response.failed"})
#: Events whose JSON is read; every other event passes without being parsed.
_READ: Final = TERMINAL | {"error"}


class Phase(enum.Enum):
    START = "start"  # no event yet
    OPEN = "open"  # events arrived; no terminal event yet
    DONE = "done"  # response.completed / .incomplete / .failed arrived


#: (phase, how the upstream ended without a terminal event) -> outcome; read by
#: :meth:`ResponsesPassthrough.finish` and the tests. Before the terminal event the client
#: has no Response object, no status and no usage: always an error. After it, whatever
#: follows (nothing is defined) is irrelevant.
ENDINGS: Final[Mapping[tuple[Phase, Ending], Outcome]] = {
    (Phase.START, "eof"): "error",
    (Phase.START, "partial"): "error",
    (Phase.START, "broken"): "error",
    (Phase.OPEN, "eof"): "error",
    (Phase.OPEN, "partial"): "error",
    (Phase.OPEN, "broken"): "error",
    (Phase.DONE, "eof"): "end",
    (Phase.DONE, "partial"): "end",
    (Phase.DONE, "broken"): "end",
}


@attrs.define
class ResponsesPassthrough:
    """One Responses stream relayed as whole frames. Implements ``base.StreamTranslator``,
    plus :attr:`final`: the terminal event's Response object (JSON bytes), which the
    gateway stores for ``previous_response_id`` and ``GET /v1/responses/{id}``."""

    provider: str
    _phase: Phase = Phase.START
    usage: JSON | None = attrs.field(default=None, init=False)
    final: bytes | None = attrs.field(default=None, init=False, repr=False)

    @property
    def done(self) -> bool:
        return self._phase is Phase.DONE

    @property
    def phase(self) -> Phase:
        return self._phase

    def feed(self, event: SSEEvent) -> list[bytes]:
        name, data = event.event, event.data
        if self._phase is Phase.DONE:
            return []  # nothing is defined after the terminal event
        if name == "message":  # no ``event:`` line: the JSON's type names the event
            if not data.strip():
                return []
            name = str(self._decode(name, data).get("type", name))
        self._phase = Phase.OPEN
        if name in _READ:
            self._read(name, data)
        return [frame(name, data)]

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        phase = self._phase
        if ENDINGS[phase, ending] == "error":
            where = "inside an event" if ending == "partial" else f"in phase {phase.value}"
            raise UpstreamProtocolError(
                f"{self.provider}: Responses stream ended before its terminal event "
                f"(response.completed), {where}."
            )
        return []

    def _read(self, name: str, data: bytes) -> None:
        obj = self._decode(name, data)
        if name == "error":
            # https://platform.openai.com/docs/api-reference/responses-streaming/error
            raise error_from_payload(
                {"error": {k: obj.get(k) for k in ("message", "code", "param")}}
            )
        response = obj.get("response")
        if not isinstance(response, dict):
            raise UpstreamProtocolError(f"{self.provider}: {name} event carries no response.")
        self._phase = Phase.DONE
        self.final = dumps(response)
        self.usage = usage_to_chat(response.get("usage"))
        if name == "response.failed":
            raise _failed(response.get("error"))

    def _decode(self, name: str, data: bytes) -> JSON:
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError):
            raise UpstreamProtocolError(
                f"{self.provider}: stream event {name!r} is not JSON."
            ) from None
        if not isinstance(obj, dict):
            raise UpstreamProtocolError(f"{self.provider}: stream event {name!r} is not an object.")
        return obj


def _failed(error: object) -> ProviderError:
    """``response.error`` of a failed Response ({"code", "message"}) -> ProviderError."""
    if isinstance(error, Mapping):
        return error_from_payload({"error": {k: error.get(k) for k in ("message", "code")}})
    return error_from_payload({"error": {"message": "the response failed"}})


def usage_to_chat(usage: object) -> JSON | None:
    """A Responses ``usage`` object -> OpenAI's chat shape (None if there is none)."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("input_tokens"))
    completion = _count(usage.get("output_tokens"))
    total = usage.get("total_tokens")
    out: JSON = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": _count(total) if isinstance(total, int) else prompt + completion,
    }
    cached = _detail(usage.get("input_tokens_details"), "cached_tokens")
    if cached is not None:
        out["prompt_tokens_details"] = {"cached_tokens": cached}
    reasoning = _detail(usage.get("output_tokens_details"), "reasoning_tokens")
    if reasoning is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return out


def usage_from_response(body: bytes) -> JSON | None:
    """A whole Response object's usage in chat shape, for accounting; None if the body has
    none (or is not a JSON object: it was checked before, so that is not this one's to say)."""
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return usage_to_chat(obj.get("usage")) if isinstance(obj, dict) else None


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _detail(details: object, key: str) -> int | None:
    if isinstance(details, Mapping) and key in details:
        return _count(details.get(key))
    return None
