"""Stream state for the ``openai`` provider kind: one OpenAI-format SSE stream. No I/O.

Owns :class:`OpenAIStream`, which passes each chunk's bytes through unless a cheap byte
check finds something to act on, and the stream-ending rules (:data:`ENDINGS`):

* An error event (OpenRouter reports failures after a stream started as a ``data:`` event
  with a top-level ``error``; some servers send ``event: error``) becomes
  :class:`ProviderError`.
* Groq reports stream usage in ``x_groq.usage`` on the last content chunk
  (https://console.groq.com/docs/api-reference#chat-create). It is moved to the standard
  ``usage`` field, and for ``stream_options.include_usage`` clients into a final
  ``choices: []`` usage chunk, as OpenAI sends it
  (https://platform.openai.com/docs/api-reference/chat/streaming).
* Usage chunks (``choices: []``) reach the client only when it asked
  (``stream_options.include_usage``); when only Runestone asked (``account_usage``, for a
  tokens-per-minute limit) they are recorded and dropped.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, Final

import attrs

from runestone_proxy.errors import UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.base import Ending, Outcome
from runestone_proxy.providers.json_codec import dumps, loads_object
from runestone_proxy.providers.openai_errors import error_from_event, error_from_payload, is_error

__all__ = ["ENDINGS", "OpenAIStream", "Phase", "groq_usage"]


class Phase(enum.Enum):
    """How far an OpenAI-format stream got, as far as its ending is concerned."""

    OPEN = "open"  # some choice that appeared has no finish_reason yet (or none appeared)
    FINISHED = "finished"  # every choice that appeared has its finish_reason
    DONE = "done"  # [DONE] arrived


#: The ending rules, read by :meth:`OpenAIStream.finish` and by the tests: (phase, how the
#: upstream ended without ``[DONE]``) -> outcome. Once every choice has its finish_reason
#: nothing was lost by a missing ``[DONE]``, nor by a transport failure at an event boundary
#: (at worst the usage chunk, which is never made up). An event cut in half is a loss.
ENDINGS: Final[Mapping[tuple[Phase, Ending], Outcome]] = {
    (Phase.OPEN, "eof"): "error",
    (Phase.OPEN, "partial"): "error",
    (Phase.OPEN, "broken"): "error",
    (Phase.FINISHED, "eof"): "end",
    (Phase.FINISHED, "partial"): "error",
    (Phase.FINISHED, "broken"): "end",
    (Phase.DONE, "eof"): "end",
    (Phase.DONE, "partial"): "end",
    (Phase.DONE, "broken"): "end",
}

_FINISH_KEY = b'"finish_reason":'


@attrs.define
class OpenAIStream:
    """Stream state for one OpenAI-format SSE stream: payloads pass through as bytes.

    Per chunk, only byte checks run unless one finds something to read: an error, a usage
    object. With ``n`` = 1, one scan per chunk looks for a non-null ``finish_reason`` until
    it is found (no decode: choice 0 is the only one). With ``n`` > 1 every chunk is
    decoded, to know which choices appeared (rare).
    """

    name: str
    include_usage: bool = False
    #: The request's ``n``: how many choices may appear.
    n: int = 1
    done: bool = attrs.field(default=False, init=False)
    #: The latest ``usage`` object seen in the stream (for the gateway's accounting).
    usage: dict[str, Any] | None = attrs.field(default=None, init=False)
    #: A Groq ``x_groq.usage`` turned into OpenAI's final usage chunk, sent at ``[DONE]``.
    _pending_usage: bytes | None = attrs.field(default=None, init=False, repr=False)
    _usage_chunk_seen: bool = attrs.field(default=False, init=False, repr=False)
    _appeared: set[int] = attrs.field(factory=set, init=False, repr=False)
    _finished: set[int] = attrs.field(factory=set, init=False, repr=False)
    #: n = 1 and choice 0 has its finish_reason.
    _finished_one: bool = attrs.field(default=False, init=False, repr=False)

    @property
    def phase(self) -> Phase:
        if self.done:
            return Phase.DONE
        if self.n == 1:
            return Phase.FINISHED if self._finished_one else Phase.OPEN
        if self._finished and self._appeared <= self._finished:
            return Phase.FINISHED
        return Phase.OPEN

    def feed(self, event: SSEEvent) -> list[bytes]:
        data = event.data
        if self.done:
            return []  # nothing is defined after the terminator; ignore it
        if data[:1] != b"{":  # a chunk starts with its brace: the rest only when it does not
            if data == b"[DONE]" or data.strip() == b"[DONE]":
                self.done = True
                return self._trailer()
            if not data.strip():
                return []
            if event.event != "error" and data.lstrip()[:1] != b"{":
                raise UpstreamProtocolError(f"{self.name}: stream event is not a JSON object")
        if event.event == "error":  # some compatible servers name their error events
            raise error_from_event(data)
        obj: dict[str, Any] | None = None
        if b'"error"' in data:
            obj = self._load(data)
            if is_error(obj):  # OpenRouter / OpenAI / vLLM mid-stream error
                raise error_from_payload(obj)
        if self.n == 1:
            if not self._finished_one:
                # Inline (this runs per chunk): a non-null finish_reason after the key. A key
                # quoted inside a content string is escaped (\"finish_reason\":): no match.
                at = data.find(_FINISH_KEY)
                if at >= 0:
                    after = data[at + 16 : at + 17]
                    if after != b"n" and (
                        after != b" " or data[at + 16 : at + 24].lstrip()[:1] != b"n"
                    ):
                        self._finished_one = True
        else:
            obj = obj if obj is not None else self._load(data)
            self._track_choices(obj)
        # Per chunk, one scan clears what follows for most chunks: no "usage" key at all, or
        # OpenAI's `"usage":null` (every chunk of a stream that asked for usage) as the
        # only occurrence (a content string of exactly "usage" would be another).
        at = data.find(b'"usage"')
        if at < 0:
            return [data]
        if b'"x_groq"' in data:
            return self._groq(obj if obj is not None else self._load(data), data)
        if data[at + 7 : at + 12] == b":null" and data.find(b'"usage"', at + 7) < 0:
            return [data]
        if b'"usage":{' in data or b'"usage": {' in data:
            obj = obj if obj is not None else self._load(data)
            if isinstance(obj.get("usage"), dict):
                self.usage = obj["usage"]
                if obj.get("choices") == []:
                    self._usage_chunk_seen = True
                    if not self.include_usage:
                        return []  # Runestone asked for it (accounting); the client did not
        return [data]

    def finish(self, ending: Ending = "eof") -> list[bytes]:
        phase = self.phase
        if ENDINGS[phase, ending] == "error":
            if phase is Phase.OPEN:
                what = "before every choice had a finish_reason"
            else:
                what = "inside an event"
            raise UpstreamProtocolError(
                f"{self.name}: upstream stream ended {what}, without [DONE]"
            )
        if phase is Phase.DONE:
            return []
        self.done = True
        return self._trailer()

    def _trailer(self) -> list[bytes]:
        if self._pending_usage is not None and not self._usage_chunk_seen:
            return [self._pending_usage]
        return []

    def _track_choices(self, obj: Mapping[str, Any]) -> None:
        choices = obj.get("choices")
        if not isinstance(choices, list):
            return
        for choice in choices:
            if isinstance(choice, Mapping):
                index = choice.get("index", 0)
                index = index if isinstance(index, int) else 0
                self._appeared.add(index)
                if choice.get("finish_reason") is not None:
                    self._finished.add(index)

    def _load(self, data: bytes) -> dict[str, Any]:
        return loads_object(data, f"{self.name} stream event")

    def _groq(self, obj: dict[str, Any], data: bytes) -> list[bytes]:
        usage = groq_usage(obj)
        if usage is None:
            return [data]
        usage = obj.get("usage") if isinstance(obj.get("usage"), dict) else usage
        assert isinstance(usage, dict)
        self.usage = usage
        if obj.get("choices") == []:
            self._usage_chunk_seen = True
            return [data] if self.include_usage else []
        if not self.include_usage:
            return [data]  # recorded for accounting; the client gets Groq's bytes as they are
        # include_usage: OpenAI sends usage once, in a last chunk with no choices; counting
        # it on this chunk as well would make summing clients count it twice.
        keep = ("id", "object", "created", "model", "system_fingerprint")
        final: dict[str, Any] = {k: obj[k] for k in keep if k in obj}
        final["choices"] = []
        final["usage"] = usage
        self._pending_usage = dumps(final)
        if obj.get("usage") is not None:
            obj["usage"] = None
            return [dumps(obj)]
        return [data]


def groq_usage(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    x_groq = obj.get("x_groq")
    if isinstance(x_groq, Mapping):
        usage = x_groq.get("usage")
        if isinstance(usage, dict):
            return usage
    return None
