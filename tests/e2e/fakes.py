"""Fake providers for the end-to-end tests: real HTTP servers on 127.0.0.1, port 0.

:class:`FakeOpenAI` speaks OpenAI's REST API (``/v1/chat/completions``, ``/v1/completions``,
``/v1/embeddings``) and :class:`FakeAnthropic` the Messages API (``/v1/messages``). Each is a
small ASGI app served by hypercorn's trio worker, so the gateway's upstream pool talks to an
independent HTTP/1.1 implementation over real sockets.

What a fake answers is chosen by the ``model`` the gateway sends upstream (after alias and
``provider:model`` resolution), so one fake serves every scenario and a test names its
scenario in the request, e.g. ``model="openai:err-429"``:

    FakeOpenAI
    (any other model)  text
    tools              a get_weather call
    err-400 / 401 / 403 / 404 / 429 / 429-tokens / 429-quota / 500 / 503
                       OpenAI's documented error bodies (``OPENAI_ERRORS``)
    mid-<err>          chunks, then that error as an in-band stream event
    first-<err>        that error as a 200 stream's first event
    cut                stream ends, no [DONE]
    cut-hard           connection dropped mid-body
    hang               one chunk, then waits for the client to leave
    stall              no response head; waits for the client to leave

    no-done            whole stream, then a clean end without [DONE]
    finish-reset       finish chunk, then the connection dropped
    finish-partial     finish chunk, then half an event and a clean end
    big                one content delta of BIG_TEXT (5 MiB)
    usage-always       the usage chunk even if include_usage was not asked
    reasoner           ``reasoning_content`` (DeepSeek/vLLM style: REASONING), then text
    tool-turns         a get_weather call; text once the messages hold a tool result
                       (on /v1/responses: once ``input`` holds a function_call_output)
    paced              the first text chunk, then waits for ``paced_gate`` (an event the
                       test sets), then the rest

    FakeOpenAI /v1/responses (the Responses API: a whole Response object, or its stream of
    ``event:``-named events with ``sequence_number``, ending with response.completed)
    (any other model)  a text message (TEXT_PIECES)
    tools              a get_weather function call (ARGUMENT_PIECES)
    reasoner           a reasoning item with a summary (REASONING_PIECES), then text
    resp-error         400 in OpenAI's envelope
    resp-fail-mid      stream: one text delta, then response.failed (server_error)

    FakeAnthropic
    (any other model)  text, with a ping
    claude-tools       text, then tool_use
    claude-thinking    thinking (signed), text
    claude-tool-turns  as claude-tools; the plain text once the last message holds a
                       tool_result
    claude-err-401 / 429 / 529     error bodies
    claude-overloaded-mid          an overloaded_error event mid-stream
    claude-error-<type>            every documented error type (``ANTHROPIC_ERROR_TYPES``)
                                   as an HTTP error; with ``-first`` as a 200 stream's first
                                   event, with ``-mid`` as an ``event: error`` after text
    claude-no-stop     whole stream, no message_stop
    claude-cut         ends inside a text block (no message_delta)
    claude-max-tokens-tool         message_delta cuts an open tool block
    claude-big         one text delta of BIG_TEXT (5 MiB)
    /v1/messages/count_tokens      ``{"input_tokens": fake_token_count(body)}``

A request with the wrong key gets the provider's 401, as the real services answer it.

Every request is recorded (headers and parsed body) in ``requests``. ``in_flight`` counts the
requests being answered and ``disconnects`` the exchanges whose client went away before the
answer ended; ``wait_until(predicate)`` awaits a change of either, without polling.

Wire formats: https://platform.openai.com/docs/api-reference/chat/streaming (chunks, tool-call
deltas, the ``include_usage`` chunk), https://platform.openai.com/docs/guides/error-codes,
https://docs.anthropic.com/en/api/messages-streaming and https://docs.anthropic.com/en/api/errors.
"""

from __future__ import annotations

import base64
import itertools
import json
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

HOST = "127.0.0.1"
CREATED = 1_700_000_000
TEXT_PIECES = ("Hello", " from", " the", " fake.")
TEXT = "".join(TEXT_PIECES)
USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
#: A tool call's arguments, and how the stream splits them.
ARGUMENT_PIECES = ('{"ci', 'ty": "Pa', 'ris"}')
ARGUMENTS = "".join(ARGUMENT_PIECES)
#: What the ``reasoner`` model thinks before it answers, and how the stream splits it.
REASONING_PIECES = ("Paris is", " in France.")
REASONING = "".join(REASONING_PIECES)
#: One legal SSE event of several MiB (past the parser's old 1 MiB cap).
BIG_TEXT = "abcdefgh" * (5 * 1024 * 1024 // 8)

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


@attrs.frozen
class Recorded:
    """One request as the fake received it."""

    method: str
    path: str
    headers: Mapping[str, str]
    body: Any


@attrs.define(eq=False)
class Exchange:
    """One request's ASGI channel, with the few ways the fakes answer."""

    fake: FakeProvider
    receive: Receive
    send: Send
    gone: bool = False

    async def json(
        self, status: int, obj: object, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        body = json.dumps(obj).encode()
        await self.start(status, (("content-type", "application/json"), *headers))
        await self.send({"type": "http.response.body", "body": body})

    async def start(self, status: int, headers: tuple[tuple[str, str], ...]) -> None:
        raw = [(k.encode(), v.encode()) for k, v in headers]
        await self.send({"type": "http.response.start", "status": status, "headers": raw})

    async def start_sse(self) -> None:
        await self.start(
            200, (("content-type", "text/event-stream"), ("cache-control", "no-cache"))
        )

    async def event(self, data: object, event: str | None = None) -> None:
        text = data if isinstance(data, str) else json.dumps(data)
        frame = (f"event: {event}\n" if event else "") + f"data: {text}\n\n"
        await self.send({"type": "http.response.body", "body": frame.encode(), "more_body": True})

    async def end(self) -> None:
        await self.send({"type": "http.response.body", "body": b""})

    async def wait_gone(self) -> None:
        """Return once the client went away (ASGI ``http.disconnect``)."""
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.gone = True


@attrs.define(eq=False)
class FakeProvider:
    """What both fakes share: the server, the recording and the counters."""

    key: str
    port: int = 0
    requests: list[Recorded] = attrs.Factory(list)
    in_flight: int = 0
    disconnects: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://{HOST}:{self.port}/v1"

    def last(self) -> Recorded:
        return self.requests[-1]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        while not predicate():
            await self._changed.wait()

    async def serve(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(serve_asgi, self)
            task_status.started()

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        body = json.loads(raw) if raw else None
        self.requests.append(Recorded(scope["method"], scope["path"], headers, body))
        exchange = Exchange(self, receive, send)
        self.in_flight += 1
        self._notify()
        try:
            await self.handle(scope["path"], headers, body, exchange)
        finally:
            self.in_flight -= 1
            if exchange.gone:
                self.disconnects += 1
            self._notify()

    async def handle(self, path: str, headers: Mapping[str, str], body: Any, ex: Exchange) -> None:
        raise NotImplementedError


async def serve_asgi(
    app: Callable[[Message, Receive, Send], Awaitable[None]],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with hypercorn's trio worker on 127.0.0.1, port chosen by the OS;
    reports the port."""
    config = HypercornConfig()
    config.bind = [f"{HOST}:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, app, config)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


async def lifespan(receive: Receive, send: Send) -> None:
    """Answer ASGI lifespan startup and shutdown."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


# --- OpenAI ---------------------------------------------------------------------------------

#: model -> (status, error object, extra headers), in OpenAI's own words.
OPENAI_ERRORS: dict[str, tuple[int, dict[str, Any], tuple[tuple[str, str], ...]]] = {
    "err-400": (
        400,
        {
            "message": "Invalid 'temperature': decimal above maximum value. Expected a value "
            "<= 2, but got 7 instead.",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "decimal_above_max_value",
        },
        (),
    ),
    "err-401": (
        401,
        {
            "message": "Incorrect API key provided: sk-fake...0000. You can find your API key "
            "at https://platform.openai.com/account/api-keys.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        },
        (),
    ),
    "err-404": (
        404,
        {
            "message": "The model `err-404` does not exist or you do not have access to it.",
            "type": "invalid_request_error",
            "param": None,
            "code": "model_not_found",
        },
        (),
    ),
    "err-429": (
        429,
        {
            "message": "Rate limit reached for requests. Please try again in 7s.",
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        (("retry-after", "7"), ("x-ratelimit-remaining-requests", "0")),
    ),
    "err-403": (
        403,
        {
            "message": "Country, region, or territory not supported",
            "type": "request_forbidden",
            "param": None,
            "code": "unsupported_country_region_territory",
        },
        (),
    ),
    "err-429-tokens": (
        429,
        {
            "message": "Rate limit reached for gpt-4o in organization org-fake on tokens per min "
            "(TPM): Limit 30000, Used 29000, Requested 2000. Please try again in 2s.",
            "type": "tokens",
            "param": None,
            "code": "rate_limit_exceeded",
        },
        (("retry-after", "2"),),
    ),
    "err-429-quota": (
        429,
        {
            "message": "You exceeded your current quota, please check your plan and billing "
            "details.",
            "type": "insufficient_quota",
            "param": None,
            "code": "insufficient_quota",
        },
        (),
    ),
    "err-500": (
        500,
        {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        },
        (),
    ),
    "err-503": (
        503,
        {
            "message": "The engine is currently overloaded, please try again later",
            "type": "server_error",
            "param": None,
            "code": None,
        },
        (("retry-after", "1"),),
    ),
}


def _openai_chunk(model: str, choices: list[Any], usage: bool, obj: str) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": "chatcmpl-fake" if obj == "chat.completion.chunk" else "cmpl-fake",
        "object": obj,
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": choices,
    }
    if usage:
        chunk["usage"] = None  # OpenAI: null on every chunk but the last
    return chunk


def _delta(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(text: str, finish: str | None = None) -> dict[str, Any]:
    return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}


def _tool_call_pieces() -> list[dict[str, Any]]:
    first = {
        "index": 0,
        "id": "call_fake_weather",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    rest = [{"index": 0, "function": {"arguments": piece}} for piece in ARGUMENT_PIECES]
    return [first, *rest]


@attrs.define(eq=False)
class FakeOpenAI(FakeProvider):
    #: The ``paced`` model's stream waits for this between its first and second chunk.
    paced_gate: trio.Event = attrs.Factory(trio.Event)

    async def handle(self, path: str, headers: Mapping[str, str], body: Any, ex: Exchange) -> None:
        if headers.get("authorization") != f"Bearer {self.key}":
            await ex.json(401, {"error": OPENAI_ERRORS["err-401"][1]})
            return
        model = body.get("model", "") if isinstance(body, dict) else ""
        if model == "tool-turns":  # text once the tool answered, else the tool call
            answered = any(m.get("role") == "tool" for m in body.get("messages") or ())
            answered = answered or _function_output_in(body.get("input"))
            model = "text" if answered else "tools"
        if model in OPENAI_ERRORS:
            status, error, extra = OPENAI_ERRORS[model]
            await ex.json(status, {"error": error}, extra)
            return
        if model == "stall":
            await ex.wait_gone()
            return
        if path == "/v1/responses":
            await self._responses(model, body, ex)
        elif path == "/v1/embeddings":
            await ex.json(200, _embeddings(body))
        elif path not in ("/v1/chat/completions", "/v1/completions"):
            not_found = {"message": f"Invalid URL (POST {path})", "type": "invalid_request_error"}
            await ex.json(404, {"error": {**not_found, "param": None, "code": None}})
        elif body.get("stream"):
            await self._stream(path, model, body, ex)
        elif path == "/v1/completions":
            await ex.json(200, _text_completion(model))
        else:
            await ex.json(200, _chat_completion(model))

    async def _stream(self, path: str, model: str, body: dict[str, Any], ex: Exchange) -> None:
        options = body.get("stream_options") or {}
        usage = bool(options.get("include_usage"))
        chat = path == "/v1/chat/completions"
        obj = "chat.completion.chunk" if chat else "text_completion"
        await ex.start_sse()
        if model.startswith("first-"):  # a 200 stream whose first event is the error
            await ex.event({"error": OPENAI_ERRORS[model.removeprefix("first-")][1]})
            await ex.end()
            return
        if chat and model == "tools":
            first = {"role": "assistant", "content": None, "tool_calls": _tool_call_pieces()[:1]}
            deltas = [first] + [{"tool_calls": [p]} for p in _tool_call_pieces()[1:]]
            choices = [_delta(d) for d in deltas] + [_delta({}, "tool_calls")]
        elif chat:
            pieces = (BIG_TEXT,) if model == "big" else TEXT_PIECES
            deltas = [{"role": "assistant", "content": "", "refusal": None}]
            if model == "reasoner":
                deltas += [{"reasoning_content": piece} for piece in REASONING_PIECES]
            deltas += [{"content": piece} for piece in pieces]
            choices = [_delta(d) for d in deltas] + [_delta({}, "stop")]
        else:
            pieces = (BIG_TEXT,) if model == "big" else TEXT_PIECES
            choices = [_text_choice(p) for p in pieces] + [_text_choice("", "stop")]
        if model in ("cut", "cut-hard", "hang") or model.startswith("mid-"):
            choices = choices[: 1 if model == "hang" else 2]
        for index, choice in enumerate(choices):
            if model == "paced" and index == 2:  # after the role chunk and one text piece
                await self.paced_gate.wait()
            await ex.event(_openai_chunk(model, [choice], usage, obj))
        if model.startswith("mid-"):  # a failure after the stream started: an error event
            await ex.event({"error": OPENAI_ERRORS[model.removeprefix("mid-")][1]})
            await ex.end()
            return
        if model == "hang":
            await ex.wait_gone()
            return
        if model in ("cut-hard", "finish-reset"):
            return  # the ASGI app returns mid-body: hypercorn drops the connection
        if model == "finish-partial":
            await ex.send(
                {"type": "http.response.body", "body": b'data: {"id":', "more_body": True}
            )
        elif model != "cut":
            if usage or model == "usage-always":
                await ex.event({**_openai_chunk(model, [], False, obj), "usage": USAGE})
            if model != "no-done":
                await ex.event("[DONE]")
        await ex.end()

    async def _responses(self, model: str, body: dict[str, Any], ex: Exchange) -> None:
        if model == "resp-error":
            await ex.json(400, {"error": RESPONSES_ERROR})
            return
        items = _response_items(model)
        if not body.get("stream"):
            await ex.json(200, _response(body, "completed", [item for item, _ in items]))
            return
        await ex.start_sse()
        seq = itertools.count()

        async def send(event_type: str, **fields: Any) -> None:
            event = {"type": event_type, "sequence_number": next(seq), **fields}
            await ex.event(event, event_type)

        await send("response.created", response=_response(body, "in_progress", []))
        await send("response.in_progress", response=_response(body, "in_progress", []))
        for index, (item, pieces) in enumerate(items):
            if model == "resp-fail-mid":
                await _stream_item(send, index, item, pieces[:1], done=False)
                failed = _response(body, "failed", [])
                failed["error"] = {"code": "server_error", "message": RESPONSES_FAILED}
                failed["usage"] = None
                await send("response.failed", response=failed)
                await ex.end()
                return
            await _stream_item(send, index, item, pieces, done=True)
        await send(
            "response.completed", response=_response(body, "completed", [i for i, _ in items])
        )
        await ex.end()


def _function_output_in(items: object) -> bool:
    """A Responses ``input`` holds a tool's result (a ``function_call_output`` item)."""
    if not isinstance(items, list):
        return False
    return any(isinstance(i, dict) and i.get("type") == "function_call_output" for i in items)


#: The ``resp-error`` model's answer, as OpenAI words an unknown Responses parameter.
RESPONSES_ERROR = {
    "message": "Unsupported parameter: 'temperature' is not supported with this model.",
    "type": "invalid_request_error",
    "param": "temperature",
    "code": "unsupported_parameter",
}
RESPONSES_FAILED = "The server had an error while processing your request. Sorry about that!"
RESPONSE_ID = "resp_fake0123456789abcdef01234567"
RESPONSE_USAGE = {
    "input_tokens": 9,
    "input_tokens_details": {"cached_tokens": 0},
    "output_tokens": 4,
    "output_tokens_details": {"reasoning_tokens": 0},
    "total_tokens": 13,
}


def _response(body: dict[str, Any], status: str, output: list[Any]) -> dict[str, Any]:
    """A Response object (https://platform.openai.com/docs/api-reference/responses/object)."""
    return {
        "id": RESPONSE_ID,
        "object": "response",
        "created_at": CREATED,
        "status": status,
        "error": None,
        "incomplete_details": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": body.get("model"),
        "output": output,
        "parallel_tool_calls": True,
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": None, "summary": None},
        "store": body.get("store", True),
        "temperature": 1.0,
        "text": {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools", []),
        "top_p": 1.0,
        "truncation": "disabled",
        "usage": RESPONSE_USAGE if status == "completed" else None,
        "user": None,
        "metadata": body.get("metadata") or {},
    }


def _response_items(model: str) -> list[tuple[dict[str, Any], tuple[str, ...]]]:
    """The finished output items a model answers, each with the pieces its stream sends."""
    message = {
        "id": "msg_fake0",
        "type": "message",
        "status": "completed",
        "role": "assistant",
        "content": [{"type": "output_text", "text": TEXT, "annotations": [], "logprobs": []}],
    }
    if model == "tools":
        call = {
            "id": "fc_fake0",
            "type": "function_call",
            "status": "completed",
            "call_id": "call_fake_weather",
            "name": "get_weather",
            "arguments": ARGUMENTS,
        }
        return [(call, ARGUMENT_PIECES)]
    if model == "reasoner":
        summary = [{"type": "summary_text", "text": REASONING}]
        reasoning = {"id": "rs_fake0", "type": "reasoning", "summary": summary}
        message["id"] = "msg_fake1"
        return [(reasoning, REASONING_PIECES), (message, TEXT_PIECES)]
    return [(message, TEXT_PIECES)]


async def _stream_item(
    send: Callable[..., Awaitable[None]],
    index: int,
    item: dict[str, Any],
    pieces: tuple[str, ...],
    *,
    done: bool,
) -> None:
    """One output item's events: added, its part / deltas / done events, item done."""
    kind, item_id = item["type"], item["id"]
    at = {"item_id": item_id, "output_index": index}
    if kind == "function_call":
        await send(
            "response.output_item.added",
            output_index=index,
            item={**item, "status": "in_progress", "arguments": ""},
        )
        for piece in pieces:
            await send("response.function_call_arguments.delta", **at, delta=piece)
        if done:
            await send("response.function_call_arguments.done", **at, arguments=item["arguments"])
    elif kind == "reasoning":
        at["summary_index"] = 0
        part = item["summary"][0]
        await send("response.output_item.added", output_index=index, item={**item, "summary": []})
        await send("response.reasoning_summary_part.added", **at, part={**part, "text": ""})
        for piece in pieces:
            await send("response.reasoning_summary_text.delta", **at, delta=piece)
        if done:
            await send("response.reasoning_summary_text.done", **at, text=part["text"])
            await send("response.reasoning_summary_part.done", **at, part=part)
    else:
        at["content_index"] = 0
        part = item["content"][0]
        added = {**item, "status": "in_progress", "content": []}
        await send("response.output_item.added", output_index=index, item=added)
        await send("response.content_part.added", **at, part={**part, "text": ""})
        for piece in pieces:
            await send("response.output_text.delta", **at, delta=piece, logprobs=[])
        if done:
            await send("response.output_text.done", **at, text=part["text"], logprobs=[])
            await send("response.content_part.done", **at, part=part)
    if done:
        await send("response.output_item.done", output_index=index, item=item)


def _chat_completion(model: str) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": TEXT, "refusal": None}
    finish = "stop"
    if model == "tools":
        call = {
            "id": "call_fake_weather",
            "type": "function",
            "function": {"name": "get_weather", "arguments": ARGUMENTS},
        }
        message = {"role": "assistant", "content": None, "tool_calls": [call], "refusal": None}
        finish = "tool_calls"
    elif model == "reasoner":
        message["reasoning_content"] = REASONING
    return {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": USAGE,
    }


def _text_completion(model: str) -> dict[str, Any]:
    return {
        "id": "cmpl-fake",
        "object": "text_completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_fake",
        "choices": [_text_choice(TEXT, "stop")],
        "usage": USAGE,
    }


def embedding_vector(index: int) -> list[float]:
    """The fake's embedding for input ``index``: 8 floats exact in float32."""
    return [(index + 1) / 4 + j / 8 for j in range(8)]


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body.get("input")
    count = len(inputs) if isinstance(inputs, list) and not isinstance(inputs[0], int) else 1
    data = []
    for index in range(count):
        vector: object = embedding_vector(index)
        if body.get("encoding_format") == "base64":  # what the SDK asks for by default
            vector = base64.b64encode(struct.pack("<8f", *embedding_vector(index))).decode()
        data.append({"object": "embedding", "index": index, "embedding": vector})
    usage = {"prompt_tokens": 3 * count, "total_tokens": 3 * count}
    return {"object": "list", "data": data, "model": body.get("model"), "usage": usage}


# --- Anthropic ------------------------------------------------------------------------------

ANTHROPIC_ERRORS: dict[str, tuple[int, str, str, tuple[tuple[str, str], ...]]] = {
    "claude-err-401": (401, "authentication_error", "invalid x-api-key", ()),
    "claude-err-429": (
        429,
        "rate_limit_error",
        "Number of request tokens has exceeded your per-minute rate limit.",
        (("retry-after", "9"),),
    ),
    "claude-err-529": (529, "overloaded_error", "Overloaded", ()),
}
#: Every error type on https://docs.anthropic.com/en/api/errors: (status, message, headers).
#: ``claude-error-<type>`` answers it as an HTTP error, ``claude-error-<type>-first`` as the
#: first event of a 200 stream, ``claude-error-<type>-mid`` as an ``event: error`` after text.
ANTHROPIC_ERROR_TYPES: dict[str, tuple[int, str, tuple[tuple[str, str], ...]]] = {
    "invalid_request_error": (400, "max_tokens: Field required", ()),
    "authentication_error": (401, "invalid x-api-key", ()),
    "billing_error": (402, "Your credit balance is too low to access the Anthropic API.", ()),
    "permission_error": (403, "Your API key does not have permission to use this resource.", ()),
    "not_found_error": (404, "Not found", ()),
    "conflict_error": (409, "The request conflicts with the current state.", ()),
    "request_too_large": (413, "Request exceeds the maximum allowed number of bytes.", ()),
    "rate_limit_error": (
        429,
        "This request would exceed your organization's rate limit of 50 requests per minute.",
        (("retry-after", "9"),),
    ),
    "api_error": (500, "Internal server error", ()),
    "timeout_error": (504, "Request timeout", ()),
    "overloaded_error": (529, "Overloaded", (("retry-after", "3"),)),
}
SIGNATURE = "EqQBCgIYAhIM1gbcDa9GJwZA2b3hGgxBdjrkzLoky3dl1pkiMOYds"
THINKING = "The user wants the weather."


def fake_token_count(body: Any) -> int:
    """FakeAnthropic's count_tokens answer: the words of every string value in ``system``
    and ``messages`` (texts, roles, block types, tool inputs and results), plus 7."""

    def words(value: Any) -> int:
        if isinstance(value, str):
            return len(value.split())
        if isinstance(value, dict):
            return sum(words(v) for v in value.values())
        if isinstance(value, list):
            return sum(words(v) for v in value)
        return 0

    return 7 + words(body.get("system")) + words(body.get("messages"))


def _anthropic_error(kind: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": message}}


def _blocks(model: str) -> list[dict[str, Any]]:
    """The content blocks of the fake's answer to ``model``."""
    if model == "claude-tools":
        return [
            {"type": "text", "text": "Let me check."},
            {
                "type": "tool_use",
                "id": "toolu_01fake",
                "name": "get_weather",
                "input": json.loads(ARGUMENTS),
            },
        ]
    if model == "claude-thinking":
        thinking = {"type": "thinking", "thinking": THINKING, "signature": SIGNATURE}
        return [thinking, {"type": "text", "text": TEXT}]
    return [{"type": "text", "text": BIG_TEXT if model == "claude-big" else TEXT}]


@attrs.define(eq=False)
class FakeAnthropic(FakeProvider):
    async def handle(self, path: str, headers: Mapping[str, str], body: Any, ex: Exchange) -> None:
        if headers.get("x-api-key") != self.key:
            await ex.json(401, _anthropic_error("authentication_error", "invalid x-api-key"))
            return
        if path == "/v1/messages/count_tokens" and headers.get("anthropic-version"):
            await ex.json(200, {"input_tokens": fake_token_count(body)})
            return
        if path != "/v1/messages" or not headers.get("anthropic-version"):
            await ex.json(404, _anthropic_error("not_found_error", f"Not found: {path}"))
            return
        model = body.get("model", "")
        if model == "claude-tool-turns":  # text once the tool answered, else claude-tools
            model = "claude-sonnet" if _tool_result_in(body) else "claude-tools"
        if model in ANTHROPIC_ERRORS:
            status, kind, message, extra = ANTHROPIC_ERRORS[model]
            await ex.json(status, _anthropic_error(kind, message), extra)
            return
        kind, when = "", ""
        if model.startswith("claude-error-"):
            kind, _, when = model.removeprefix("claude-error-").partition("-")
        if kind and not (when and body.get("stream")):
            status, message, extra = ANTHROPIC_ERROR_TYPES[kind]
            await ex.json(status, _anthropic_error(kind, message), extra)
            return
        if when == "first":
            await ex.start_sse()
            error = _anthropic_error(kind, ANTHROPIC_ERROR_TYPES[kind][1])
            await ex.event(error, "error")
            await ex.end()
            return
        stop = "tool_use" if model == "claude-tools" else "end_turn"
        if not body.get("stream"):
            await ex.json(200, _message(model, _blocks(model), stop))
            return
        await ex.start_sse()
        start = _message(model, [], None)
        start["usage"] = {"input_tokens": 12, "output_tokens": 1}
        await ex.event({"type": "message_start", "message": start}, "message_start")
        if model in ("claude-cut", "claude-max-tokens-tool"):
            await self._cut_block(ex, model)
            return
        for index, block in enumerate(_blocks(model)):
            await self._block(ex, index, block)
            if model == "claude-overloaded-mid" or when == "mid":
                kind = kind if when == "mid" else "overloaded_error"
                error = _anthropic_error(kind, ANTHROPIC_ERROR_TYPES[kind][1])
                await ex.event(error, "error")
                await ex.end()
                return
        delta = {"stop_reason": stop, "stop_sequence": None}
        usage = {"output_tokens": 5}
        await ex.event({"type": "message_delta", "delta": delta, "usage": usage}, "message_delta")
        if model != "claude-no-stop":
            await ex.event({"type": "message_stop"}, "message_stop")
        await ex.end()

    async def _cut_block(self, ex: Exchange, model: str) -> None:
        """One block left open: the body simply ends (claude-cut), or max_tokens cuts a tool's
        input and message_delta arrives with the block still open (claude-max-tokens-tool)."""
        tool = model == "claude-max-tokens-tool"
        opening = (
            {"type": "tool_use", "id": "toolu_01cut", "name": "get_weather", "input": {}}
            if tool
            else {"type": "text", "text": ""}
        )
        start = {"type": "content_block_start", "index": 0, "content_block": opening}
        await ex.event(start, "content_block_start")
        piece = (
            {"type": "input_json_delta", "partial_json": ARGUMENT_PIECES[0]}
            if tool
            else {"type": "text_delta", "text": TEXT_PIECES[0]}
        )
        delta_event = {"type": "content_block_delta", "index": 0, "delta": piece}
        await ex.event(delta_event, "content_block_delta")
        if tool:
            delta = {"stop_reason": "max_tokens", "stop_sequence": None}
            usage = {"output_tokens": 5}
            message_delta = {"type": "message_delta", "delta": delta, "usage": usage}
            await ex.event(message_delta, "message_delta")
            await ex.event({"type": "message_stop"}, "message_stop")
        await ex.end()

    async def _block(self, ex: Exchange, index: int, block: dict[str, Any]) -> None:
        kind = block["type"]
        opening = {
            "text": {"type": "text", "text": ""},
            "thinking": {"type": "thinking", "thinking": ""},
        }.get(kind, {**block, "input": {}})
        start = {"type": "content_block_start", "index": index, "content_block": opening}
        await ex.event(start, "content_block_start")
        if index == 0:
            await ex.event({"type": "ping"}, "ping")
        if kind == "text":
            pieces = [{"type": "text_delta", "text": block["text"]}]
        elif kind == "thinking":
            pieces = [
                {"type": "thinking_delta", "thinking": block["thinking"]},
                {"type": "signature_delta", "signature": block["signature"]},
            ]
        else:  # tool_use: the first input_json_delta is empty, as Anthropic sends it
            pieces = [
                {"type": "input_json_delta", "partial_json": p} for p in ("", *ARGUMENT_PIECES)
            ]
        for piece in pieces:
            event = {"type": "content_block_delta", "index": index, "delta": piece}
            await ex.event(event, "content_block_delta")
        await ex.event({"type": "content_block_stop", "index": index}, "content_block_stop")


def _tool_result_in(body: dict[str, Any]) -> bool:
    """The last message is the user's with a ``tool_result`` block (the tool answered)."""
    messages = body.get("messages") or [{}]
    content = messages[-1].get("content")
    blocks = content if isinstance(content, list) else ()
    return any(isinstance(b, dict) and b.get("type") == "tool_result" for b in blocks)


def _message(model: str, content: list[dict[str, Any]], stop: str | None) -> dict[str, Any]:
    return {
        "id": "msg_01fake",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 5},
    }
