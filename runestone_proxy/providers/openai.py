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

Usage chunks (``choices: []``) reach the client only when it asked
(``stream_options.include_usage``); when only Runestone asked (``account_usage``, for a
tokens-per-minute limit) they are recorded and dropped. Stream endings: see ``ENDINGS``.

Errors follow OpenAI's envelope ``{"error": {"message", "type", "param", "code"}}``
(https://platform.openai.com/docs/guides/error-codes); the helpers here also read the
shapes compatible servers use instead (vLLM's ``{"object": "error", ...}``, FastAPI's
``{"detail": ...}``, a bare ``{"error": "text"}``, non-JSON bodies).
"""

from __future__ import annotations

import email.utils
import enum
import json
import time
from collections.abc import Mapping
from typing import Any, Final, Literal

import attrs

from runestone_proxy.errors import ProviderError, UpstreamProtocolError
from runestone_proxy.protocol.sse import SSEEvent
from runestone_proxy.providers.base import (
    RUNESTONE_FIELDS,
    Ending,
    HeaderPairs,
    Outcome,
    ProviderCall,
    UpstreamRequest,
)
from runestone_proxy.providers.provider_errors import default_type, in_band_status

__all__ = [
    "ENDINGS",
    "Flavor",
    "OpenAIStream",
    "OpenAITranslator",
    "Phase",
    "dumps",
    "error_from_payload",
    "error_from_response",
    "loads_object",
    "retry_after_s",
]

Flavor = Literal["openai", "groq", "openrouter", "generic"]

_PATHS = {"chat": "/chat/completions", "completions": "/completions", "embeddings": "/embeddings"}
_MAX_MESSAGE_CHARS = 1000


def dumps(obj: object) -> bytes:
    """Compact JSON, UTF-8 (what OpenAI itself sends).

    A client's escaped lone surrogate (``"\\ud800"``, valid JSON, not valid Unicode) cannot
    be written as UTF-8: only then is the object written again with ``\\u`` escapes, which
    carry the value on exactly as the client sent it (no cost for any other body)."""
    text = json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj, separators=(",", ":")).encode("ascii")


def loads_object(data: bytes, what: str) -> dict[str, Any]:
    """Decode a JSON object from a provider, or raise :class:`UpstreamProtocolError`."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise UpstreamProtocolError(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise UpstreamProtocolError(f"{what} is not a JSON object")
    return obj


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
        if call.raw is not None and not _needs_rewrite(call):
            body = call.raw  # the client's own bytes: no decode/encode round trip
        else:
            body = dumps(_rewrite(call))
        return UpstreamRequest(
            method="POST", path=_PATHS[call.endpoint], headers=tuple(headers), body=body
        )

    def parse_response(self, call: ProviderCall, body: bytes) -> bytes:
        if not body.lstrip()[:1] == b"{":
            raise UpstreamProtocolError(f"{self.name}: 2xx response body is not a JSON object")
        obj: dict[str, Any] | None = None
        if b'"error"' in body:
            obj = loads_object(body, f"{self.name} response")
            # OpenRouter: "the returned HTTP response status will be 200 and any error ...
            # will be emitted in the response body".
            if _is_error(obj) and "choices" not in obj and "data" not in obj:
                raise error_from_payload(obj)
        if b'"x_groq"' in body:
            obj = obj if obj is not None else loads_object(body, f"{self.name} response")
            usage = _groq_usage(obj)
            if usage is not None and obj.get("usage") is None:
                obj["usage"] = usage
                return dumps(obj)
        return body

    def stream(self, call: ProviderCall) -> OpenAIStream:
        n = call.body.get("n", 1)
        n = n if isinstance(n, int) and not isinstance(n, bool) else 1
        return OpenAIStream(name=self.name, include_usage=call.include_usage, n=n)

    def parse_error(self, status: int, headers: HeaderPairs, body: bytes) -> ProviderError:
        return error_from_response(status, headers, body)


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
        if data == b"[DONE]" or data.strip() == b"[DONE]":
            self.done = True
            return self._trailer()
        if not data.strip():
            return []
        if event.event == "error":  # some compatible servers name their error events
            raise _error_event(data)
        if data.lstrip()[:1] != b"{":
            raise UpstreamProtocolError(f"{self.name}: stream event is not a JSON object")
        obj: dict[str, Any] | None = None
        if b'"error"' in data:
            obj = self._load(data)
            if _is_error(obj):  # OpenRouter / OpenAI / vLLM mid-stream error
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
        if b'"x_groq"' in data and b'"usage"' in data:
            return self._groq(obj if obj is not None else self._load(data), data)
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
        usage = _groq_usage(obj)
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


def _needs_rewrite(call: ProviderCall) -> bool:
    body = call.body
    if body.get("model") != call.model or not RUNESTONE_FIELDS.isdisjoint(body):
        return True
    if call.endpoint == "embeddings":
        return False
    if bool(body.get("stream", False)) != call.stream:
        return True
    wants_usage = call.include_usage or call.account_usage
    return call.stream and wants_usage and not _asks_usage(body)


def _asks_usage(body: Mapping[str, Any]) -> bool:
    opts = body.get("stream_options")
    return isinstance(opts, Mapping) and opts.get("include_usage") is True


def _rewrite(call: ProviderCall) -> dict[str, Any]:
    out = {k: v for k, v in call.body.items() if k not in RUNESTONE_FIELDS}
    out["model"] = call.model
    if call.endpoint == "embeddings":
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


def _error_event(data: bytes) -> ProviderError:
    try:
        payload = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        payload = None
    if not isinstance(payload, dict):
        payload = {"message": data.decode("utf-8", "replace")}
    return error_from_payload(payload)


def _is_error(obj: Mapping[str, Any]) -> bool:
    """A top-level ``error`` (OpenAI, OpenRouter) or vLLM's ``{"object": "error", ...}``."""
    return bool(obj.get("error")) or obj.get("object") == "error"


def _groq_usage(obj: Mapping[str, Any]) -> dict[str, Any] | None:
    x_groq = obj.get("x_groq")
    if isinstance(x_groq, Mapping):
        usage = x_groq.get("usage")
        if isinstance(usage, dict):
            return usage
    return None


# -- errors ---------------------------------------------------------------------------------


def retry_after_s(headers: HeaderPairs, *, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI's, preferred) or ``retry-after``
    (RFC 9110 §10.2.3: delay-seconds or an HTTP-date); None if absent or unreadable."""
    seconds: float | None = None
    for raw_name, raw_value in headers:
        name = raw_name.lower()
        value = raw_value.decode("latin-1").strip()
        if name == b"retry-after-ms":
            try:
                ms = float(value)
            except ValueError:
                continue
            if ms >= 0:
                return ms / 1000.0
        elif name == b"retry-after" and seconds is None:
            seconds = _parse_retry_after(value, now)
    return seconds


def _parse_retry_after(value: str, now: float | None) -> float | None:
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return seconds if seconds >= 0 else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None  # RFC 9110 HTTP-dates are GMT; a zone-less date is not one
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


def _retryable(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def error_from_response(
    status: int, headers: HeaderPairs, body: bytes, *, now: float | None = None
) -> ProviderError:
    """A non-2xx answer in OpenAI's (or a compatible server's) format -> ProviderError."""
    if not 400 <= status <= 599:
        # A redirect or other non-error status where an answer was due: a gateway failure.
        message = f"upstream answered with unexpected HTTP status {status}"
        return ProviderError(message, status=502, error_type="server_error", retryable=True)
    payload: object = None
    if body.lstrip()[:1] in (b"{", b"["):
        try:
            payload = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            payload = None
    if isinstance(payload, list) and payload and isinstance(payload[0], dict):
        payload = payload[0]  # some compatible servers wrap the envelope in a list
    if isinstance(payload, dict):
        return error_from_payload(
            payload, status=status, retry_after=retry_after_s(headers, now=now)
        )
    text = body.decode("utf-8", "replace").strip()
    message = f"upstream returned HTTP {status}" + (f": {text}" if text else "")
    return ProviderError(
        message[:_MAX_MESSAGE_CHARS],
        status=status,
        error_type=default_type(status),
        retryable=_retryable(status),
        retry_after_s=retry_after_s(headers, now=now),
    )


def error_from_payload(
    payload: Mapping[str, Any], *, status: int | None = None, retry_after: float | None = None
) -> ProviderError:
    """An error object from a body or a stream event -> ProviderError.

    ``status`` is the HTTP status it came with; None for an in-band error (an HTTP 200 body
    or a stream event), whose status is then an OpenRouter-style numeric ``error.code`` in
    400..599 if there is one, else the status OpenAI gives its ``code`` or ``type``
    (``provider_errors.in_band_status``), else 502.
    """
    err = payload.get("error")
    if isinstance(err, Mapping):
        fields: Mapping[str, Any] = err
    elif payload.get("object") == "error":  # vLLM: the envelope's fields at top level
        fields = payload
    else:
        fields = {"message": err or payload.get("message") or payload.get("detail")}
    code = fields.get("code")
    if status is None:
        in_range = isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599
        if in_range and isinstance(code, int):
            status = code
        else:
            status = in_band_status(code, fields.get("type"))
    message = fields.get("message")
    if not isinstance(message, str) or not message:
        message = dumps(message).decode() if message else f"upstream error (HTTP {status})"
    error_type = fields.get("type")
    if not isinstance(error_type, str) or not error_type:
        error_type = default_type(status)
    param = fields.get("param")
    return ProviderError(
        message[:_MAX_MESSAGE_CHARS],
        status=status,
        error_type=error_type,
        retryable=_retryable(status),
        param=param if isinstance(param, str) else None,
        code=None if code is None else str(code),
        retry_after_s=retry_after,
    )
