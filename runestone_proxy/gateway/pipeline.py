"""The provider call: translator + upstream pool (or the in-process mock), whole or streamed.

``Providers`` holds one :class:`ProviderRuntime` per configured provider (its translator, key,
base URL) and the shared upstream transport (the interface in :mod:`.transport`, which the
server's pool implements). Two entry points carry a call out:

* ``complete(target, call, deadline) -> bytes``: the whole OpenAI-shaped answer, or
  :class:`~runestone_proxy.errors.UpstreamTimeout` once ``deadline`` passes (the upstream
  pool bounds each of its waits by it, so the failover needs no cancel scope per attempt);
* ``open_stream(target, call)``: an async context manager yielding a :class:`PayloadStream`
  whose ``next()`` returns the next batch of OpenAI chunk payloads (``None`` at the end).
  Nothing has reached the client when it is opened, nor after a failed first ``next()``, so
  a router may still fail over; the relay starts the response only once the first payloads
  are in hand.

Every upstream error is already mapped to :mod:`runestone_proxy.errors` by the pool or the
translator; the ``retryable`` flag on each error is what routing uses to decide on failover.
Leaving the context (finished, failed, or cancelled because the client went away) closes the
upstream exchange; the pool discards a connection whose exchange did not complete.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Protocol

import attrs
import trio

from runestone_proxy import telemetry
from runestone_proxy.config import Config, ProviderConfig
from runestone_proxy.errors import (
    GatewayError,
    InvalidParam,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from runestone_proxy.gateway.dialects import Encoded, encoder_for, from_chat, to_chat, translated
from runestone_proxy.gateway.routing import Target
from runestone_proxy.gateway.transport import Response, Transport, UpstreamTimeouts
from runestone_proxy.protocol.sse import SSEError, SSEParser
from runestone_proxy.providers.anthropic import AnthropicTranslator
from runestone_proxy.providers.base import Ending, ProviderCall, StreamTranslator, Translator
from runestone_proxy.providers.completions import ChatToTextStream, chat_to_text_completion
from runestone_proxy.providers.json_codec import dumps
from runestone_proxy.providers.messages_request import estimate_input_tokens
from runestone_proxy.providers.mock import MockProvider, MockSettings
from runestone_proxy.providers.openai import OpenAITranslator


class PayloadStream(Protocol):
    async def next(self) -> list[bytes] | None:
        """The next OpenAI chunk payloads, or None once the stream ended cleanly."""

    @property
    def usage(self) -> Mapping[str, Any] | None:
        """The usage the stream reported (OpenAI's shape), whether the client saw it or not."""

    @property
    def final(self) -> bytes | None:
        """The whole answer object as the stream ended, where the dialect has one (a
        Responses stream's last ``response``: kept as conversation state); else None."""


@attrs.define(eq=False)
class ProviderRuntime:
    config: ProviderConfig
    api_key: str | None
    translator: Translator | None
    mock: MockProvider | None
    base_url: str
    extra_headers: tuple[tuple[bytes, bytes], ...]

    @classmethod
    def build(cls, config: ProviderConfig, env: Mapping[str, str]) -> ProviderRuntime:
        key = env.get(config.api_key_env) if config.api_key_env else None
        translator: Translator | None = None
        mock = None
        if config.kind == "openai":
            translator = OpenAITranslator(config.name, config.resolved_flavor)  # type: ignore[arg-type]
        elif config.kind == "anthropic":
            translator = AnthropicTranslator(
                config.name, default_max_tokens=config.default_max_tokens
            )
        else:
            mock = MockProvider(
                MockSettings(
                    latency_ms=config.latency_ms,
                    chunk_count=config.chunk_count,
                    chunk_interval_ms=config.chunk_interval_ms,
                    embedding_dim=config.embedding_dim,
                )
            )
        headers = tuple((k.lower().encode(), v.encode()) for k, v in config.headers.items())
        root = config.api_root if config.base_url else ""
        return cls(config, key, translator, mock, root, headers)

    @property
    def chat_only(self) -> bool:
        return self.config.kind == "anthropic"

    @property
    def speaks_messages(self) -> bool:
        """The Messages dialect is native here (bytes passed through), not translated."""
        return self.config.kind == "anthropic"

    def prepare(self, call: ProviderCall, target: Target) -> ProviderCall:
        """Adapt a call to what this provider speaks: a Messages or Responses call for one
        that does not speak that dialect becomes chat (:mod:`.dialects`); a legacy
        completions call for a chat-only provider too (prompt -> messages)."""
        if translated(call, self):
            return to_chat(call, self, target)
        if call.endpoint == "completions" and self.chat_only:
            from runestone_proxy.providers.completions import prompt_to_chat_body

            return attrs.evolve(
                call, endpoint="chat", body=prompt_to_chat_body(call.body), raw=None
            )
        if call.endpoint == "embeddings" and self.chat_only:
            raise InvalidParam(
                f"Provider `{self.config.name}` does not serve embeddings.", param="model"
            )
        return call


#: How long the end of an upstream body may lag its terminal event (``[DONE]``,
#: ``message_stop``) before the connection is given up instead of returned to the pool.
_DRAIN_S = 1.0


@attrs.define(eq=False)
class _UpstreamStream:
    """Upstream bytes -> SSE events -> OpenAI payloads. Where the upstream ends without its
    terminator, the translator's ``ENDINGS`` table decides (``finish(ending)``): a transport
    error after the provider said how it finished ends the stream normally; before that, the
    transport error itself is what the client gets."""

    response: Response
    translator: StreamTranslator
    parser: SSEParser
    ended: bool = False
    #: The upstream body was read to its end (so the pool may reuse the connection).
    drained: bool = False

    @property
    def usage(self) -> Mapping[str, Any] | None:
        return self.translator.usage

    @property
    def final(self) -> bytes | None:
        final: bytes | None = getattr(self.translator, "final", None)
        return final

    async def next(self) -> list[bytes] | None:
        while not self.ended:
            try:
                data = await self.response.receive()
            except GatewayError as exc:
                return self._end("broken", exc)
            try:
                if not data:
                    return self._end("eof", None)
                out: list[bytes] = []
                for event in self.parser.feed(data):
                    out.extend(self.translator.feed(event))
                    if self.translator.done:
                        self.ended = True
                        out.extend(self.translator.finish())
                        break
            except SSEError as exc:
                raise UpstreamProtocolError(
                    f"Provider sent a malformed event stream: {exc}"
                ) from None
            if out:
                return out
        if not self.drained:
            self.drained = True
            await self._drain()
        return None

    def _end(self, how: Ending, error: GatewayError | None) -> list[bytes] | None:
        """The upstream body ended (``error`` None) or broke, before the terminator."""
        self.ended = self.drained = True  # nothing more to read (the pool drops a broken one)
        self.parser.close()
        ending: Ending = "partial" if self.parser.truncated else how
        try:
            tail = self.translator.finish(ending)
        except UpstreamProtocolError:
            if error is not None:
                raise error from None
            raise
        return tail or None

    async def _drain(self) -> None:
        """Read what follows the terminal event (normally only the end of the chunked body),
        so that the connection goes back to the pool rather than being closed. A stream's
        terminal event usually comes with the body's end (the upstream's last write): then
        there is nothing to wait for, and no cancel scope to pay for (it is a few
        microseconds of a paced stream's fixed cost)."""
        if self.response.body_done:
            return
        with trio.move_on_after(_DRAIN_S):
            try:
                while await self.response.receive():
                    pass
            except GatewayError:
                pass  # the answer is complete; the pool discards the broken connection


@attrs.define(eq=False)
class _MockStream:
    payloads: list[bytes]
    usage: Mapping[str, Any] | None
    interval_s: float
    index: int = 0
    final: bytes | None = None

    async def next(self) -> list[bytes] | None:
        if self.index >= len(self.payloads):
            return None
        if self.interval_s and self.index:
            await trio.sleep(self.interval_s)
        else:
            await trio.lowlevel.checkpoint()  # an unpaced mock stream still yields per chunk
        self.index += 1
        return [self.payloads[self.index - 1]]


@attrs.define(eq=False)
class Providers:
    """The provider runtimes and the upstream transport they share (the server's pool);
    rebuilt on config reload."""

    runtimes: dict[str, ProviderRuntime]
    pool: Transport
    timeouts: UpstreamTimeouts
    #: The cap on a buffered non-stream answer, and on one SSE event of a stream (the
    #: parser holds at most one event, so a stream's memory stays bounded by it).
    max_response_bytes: int

    @classmethod
    def build(cls, config: Config, env: Mapping[str, str], pool: Transport) -> Providers:
        up = config.upstream
        timeouts = UpstreamTimeouts(
            connect_s=up.connect_timeout_s,
            first_byte_s=up.first_byte_timeout_s,
            between_chunks_s=up.between_chunks_timeout_s,
            total_s=up.total_timeout_s,
        )
        runtimes = {p.name: ProviderRuntime.build(p, env) for p in config.providers}
        return cls(runtimes, pool, timeouts, up.max_response_bytes)

    def runtime(self, target: Target) -> ProviderRuntime:
        return self.runtimes[target.provider]

    async def complete(self, target: Target, call: ProviderCall, deadline: float) -> bytes:
        runtime = self.runtime(target)
        legacy = call.endpoint == "completions" and runtime.chat_only
        dialect = call if translated(call, runtime) else None
        if call.endpoint == "count_tokens" and not runtime.speaks_messages:
            # No provider call: the documented estimate (``providers.messages_request``).
            return dumps({"input_tokens": estimate_input_tokens(call.body)})
        call = runtime.prepare(call, target)
        with _Accounted(target, call, stream=False):
            if runtime.mock is not None:
                if runtime.config.latency_ms:
                    with trio.move_on_at(deadline):
                        await _mock_latency(runtime)
                    if trio.current_time() >= deadline:
                        raise UpstreamTimeout(f"{target.provider} did not answer in time.")
                body = runtime.mock.respond(call)
            else:
                body = await self._http_complete(runtime, call, deadline)
            if dialect is not None:
                return from_chat(dialect, body)
            return chat_to_text_completion(body) if legacy else body

    def _upstream(
        self, runtime: ProviderRuntime, call: ProviderCall
    ) -> tuple[Translator, str, str, tuple[tuple[bytes, bytes], ...], bytes]:
        """The translator and (method, url, headers, body) of the provider request."""
        assert runtime.translator is not None
        up = runtime.translator.build_request(call, runtime.api_key)
        headers = (*up.headers, *runtime.extra_headers)
        return runtime.translator, up.method, runtime.base_url + up.path, headers, up.body

    async def _http_complete(
        self, runtime: ProviderRuntime, call: ProviderCall, deadline: float
    ) -> bytes:
        translator, method, url, headers, body = self._upstream(runtime, call)
        exchange = self.pool.request(method, url, headers, body, self.timeouts, deadline)
        async with exchange as resp:
            answer = await resp.read(self.max_response_bytes)
            if resp.status >= 300:
                raise translator.parse_error(resp.status, resp.headers, answer)
        return translator.parse_response(call, answer)

    @asynccontextmanager
    async def open_stream(self, target: Target, call: ProviderCall) -> AsyncIterator[PayloadStream]:
        runtime = self.runtime(target)
        legacy = call.endpoint == "completions" and runtime.chat_only
        dialect = call if translated(call, runtime) else None
        call = runtime.prepare(call, target)
        with _Accounted(target, call, stream=True):
            if runtime.mock is not None:
                await _mock_latency(runtime)
                interval = runtime.config.chunk_interval_ms / 1000
                mocked = _MockStream(*runtime.mock.stream(call), interval)
                yield mocked if dialect is None else Encoded(mocked, encoder_for(dialect))
                return
            translator, method, url, headers, body = self._upstream(runtime, call)
            async with self.pool.request(method, url, headers, body, self.timeouts) as resp:
                if resp.status >= 300:
                    answer = await resp.read(self.max_response_bytes)
                    raise translator.parse_error(resp.status, resp.headers, answer)
                chunks: StreamTranslator = translator.stream(call)
                if legacy:
                    chunks = ChatToTextStream(chunks)
                # One event may be as large as a whole non-stream answer (the same key).
                upstream = _UpstreamStream(resp, chunks, SSEParser(self.max_response_bytes))
                yield upstream if dialect is None else Encoded(upstream, encoder_for(dialect))


class _Accounted:
    """``provider.request.start``, then ``.stop`` or ``.error`` (with status and
    retryability). A class rather than a generator context manager: it wraps every provider
    call, and a generator costs a few microseconds more per use."""

    __slots__ = ("fields", "started", "stream")

    def __init__(self, target: Target, call: ProviderCall, *, stream: bool) -> None:
        self.fields = {
            "provider": target.provider,
            "model": target.model,
            "request_id": call.request_id,
        }
        self.stream = stream

    def __enter__(self) -> None:
        self.started = time.perf_counter()
        telemetry.emit("provider.request.start", stream=self.stream, **self.fields)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            duration = _ms(self.started)
            telemetry.emit(
                "provider.request.stop", duration_ms=duration, stream=self.stream, **self.fields
            )
        elif isinstance(exc, GatewayError):
            telemetry.emit(
                "provider.request.error",
                status=exc.http_status,
                code=exc.code,
                retryable=exc.is_retryable,
                duration_ms=_ms(self.started),
                **self.fields,
            )


async def _mock_latency(runtime: ProviderRuntime) -> None:
    if runtime.config.latency_ms:
        await trio.sleep(runtime.config.latency_ms / 1000)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 3)
