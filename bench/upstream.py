"""A fast local fake of an OpenAI-compatible provider: raw trio + h11, no framework.

Routes (anything else is 404 in OpenAI's error envelope):

* ``POST /v1/chat/completions``: a fixed ``chat.completion`` JSON; with ``"stream": true``
  in the body, an SSE stream of ``chunks`` ``chat.completion.chunk`` data events (the first
  carries the role, the last ``finish_reason: "stop"``) and then ``data: [DONE]``, with
  ``pacing_ms`` between events. Both default to the CLI flags and can be set per request
  in the query string: ``/v1/chat/completions?chunks=50&pacing_ms=5``, and ``chunks`` in
  the body as ``"bench_chunks": N`` and ``"bench_pacing_ms": M`` (which a gateway in front
  forwards). With
  ``"stream_options": {"include_usage": true}``, OpenAI's final usage chunk (empty
  ``choices``) precedes ``[DONE]`` (what the gateway asks for on a translated Messages
  stream).
* ``POST /v1/messages`` (Anthropic's Messages API): a fixed ``message`` JSON with ``usage``;
  with ``"stream": true``, Anthropic's SSE sequence (``event:`` and ``data:`` lines):
  ``message_start``, ``content_block_start``, ``ping``, ``chunks`` ``content_block_delta``
  text deltas, ``content_block_stop``, ``message_delta`` (stop reason, usage),
  ``message_stop``. It is flushed as the OpenAI stream is, ``chunks + 1`` writes: the three
  opening events ride with the first delta, the three closing ones are the last write (in
  place of ``[DONE]``). ``chunks`` and ``pacing_ms`` as for chat. A request without
  ``x-api-key`` (or ``authorization``, which newer Anthropic SDKs send) is a 401, without
  ``anthropic-version`` a 400, in Anthropic's error envelope.
  ``POST /v1/messages/count_tokens`` answers ``{"input_tokens": 9}``.
* ``POST /v1/responses`` (OpenAI's Responses API): a ``response`` object with ``usage``;
  with ``"stream": true``, the documented event sequence (``event:`` lines, each event with
  its ``sequence_number``): ``response.created``, ``response.in_progress``, the message item
  and its part opened, ``chunks`` ``response.output_text.delta`` events, the text, part and
  item done, and ``response.completed`` carrying the whole Response; flushed in the same
  ``chunks + 1`` writes as the chat stream (bodies and events in
  ``bench/upstream_responses.py``). ``chunks`` and ``pacing_ms`` as for chat.
* ``POST /v1/embeddings``: one small fixed vector per input.
* ``GET /v1/models``: a fixed model list.

It is a benchmark fixture, not a test double: it checks nothing but the presence of the
Messages API's two required headers, answers as fast as it can, and echoes the request's
``model``. Precomputed bodies keep its per-request cost low so that
it is never the bottleneck of a proxy benchmark.

    python -m bench.upstream --port 0 --chunks 20 --pacing-ms 0
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl

import attrs
import h11
import trio

from bench.serving import StreamHandler, next_request, run, server_args
from bench.upstream_responses import response_body, response_events

CREATED = 1_700_000_000
DEFAULT_MODEL = "bench-model"
JSON_TYPE = ("content-type", "application/json")
SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
]
MODELS = [DEFAULT_MODEL, "gpt-4o-mini", "gpt-4o"]
MESSAGES_PATHS = ("/v1/messages", "/v1/messages/count_tokens")
RESPONSES_PATH = "/v1/responses"


@attrs.frozen
class Defaults:
    chunks: int = 20
    pacing_ms: float = 0.0


@attrs.frozen
class Reply:
    """What to send: a whole body, or (``events`` set) an SSE stream paced by ``pacing_s``."""

    status: int
    body: bytes = b""
    events: tuple[bytes, ...] | None = None
    pacing_s: float = 0.0


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _error(status: int, message: str, type_: str, code: str) -> Reply:
    err = {"error": {"message": message, "type": type_, "code": code, "param": None}}
    return Reply(status, _dumps(err))


@functools.lru_cache(maxsize=64)
def completion_body(model: str) -> bytes:
    return _dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "Hello from the bench upstream."},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 9, "completion_tokens": 6, "total_tokens": 15},
        }
    )


@functools.lru_cache(maxsize=256)
def stream_events(model: str, chunks: int, usage: bool = False) -> tuple[bytes, ...]:
    """``chunks`` framed ``data:`` events (role first, ``stop`` last) plus ``[DONE]``; with
    ``usage`` (the request's ``stream_options.include_usage``), OpenAI's usage chunk (no
    choices) rides with ``[DONE]``, so that the number of writes stays ``chunks + 1``."""
    events = []
    for i in range(chunks):
        delta: dict[str, Any] = {"content": f"tok{i} "}
        if i == 0:
            delta["role"] = "assistant"
        last = i == chunks - 1
        chunk = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": "stop" if last else None,
                }
            ],
        }
        events.append(b"data: " + _dumps(chunk) + b"\n\n")
    done = b"data: [DONE]\n\n"
    if usage:
        tail = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "choices": [],
            "usage": {"prompt_tokens": 9, "completion_tokens": chunks, "total_tokens": 9 + chunks},
        }
        done = b"data: " + _dumps(tail) + b"\n\n" + done
    events.append(done)
    return tuple(events)


# --- Anthropic's Messages API (https://docs.anthropic.com/en/api/messages,
# .../en/docs/build-with-claude/streaming: the event flow and each event's shape) ------------

TEXT = "Hello from the bench upstream."


def _anthropic_error(status: int, type_: str, message: str) -> Reply:
    return Reply(status, _dumps({"type": "error", "error": {"type": type_, "message": message}}))


@functools.lru_cache(maxsize=64)
def message_body(model: str) -> bytes:
    return _dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [{"type": "text", "text": TEXT}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 6},
        }
    )


def _event(obj: dict[str, Any]) -> bytes:
    return b"event: " + str(obj["type"]).encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


@functools.lru_cache(maxsize=256)
def message_events(model: str, chunks: int) -> tuple[bytes, ...]:
    """``chunks + 1`` writes, as :func:`stream_events`: the opening events with the first
    text delta, one delta per write, then the closing events."""
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": 9, "output_tokens": 1},
        },
    }
    opening = (
        _event(start)
        + _event(
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            }
        )
        + _event({"type": "ping"})
    )
    deltas = [
        _event(
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": f"tok{i} "},
            }
        )
        for i in range(chunks)
    ]
    closing = (
        _event({"type": "content_block_stop", "index": 0})
        + _event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": chunks},
            }
        )
        + _event({"type": "message_stop"})
    )
    return (opening + deltas[0], *deltas[1:], closing)


def _messages(
    path: str, query: str, headers: Sequence[tuple[bytes, bytes]], body: bytes, defaults: Defaults
) -> Reply:
    names = {name for name, _ in headers}
    if b"x-api-key" not in names and b"authorization" not in names:  # newer SDKs: Bearer
        return _anthropic_error(401, "authentication_error", "x-api-key header is required")
    if b"anthropic-version" not in names:
        return _anthropic_error(400, "invalid_request_error", "anthropic-version is required")
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return _anthropic_error(400, "invalid_request_error", "Body is not JSON")
    if not isinstance(payload, dict):
        return _anthropic_error(400, "invalid_request_error", "Body is not a JSON object")
    if path == "/v1/messages/count_tokens":
        return Reply(200, b'{"input_tokens":9}')
    model = str(payload.get("model", DEFAULT_MODEL))
    if payload.get("stream") is True:
        params = dict(parse_qsl(query))
        chunks = int(params.get("chunks", defaults.chunks))
        pacing_ms = float(params.get("pacing_ms", defaults.pacing_ms))
        return Reply(200, events=message_events(model, max(chunks, 1)), pacing_s=pacing_ms / 1000)
    return Reply(200, message_body(model))


def _responses(query: str, body: bytes, defaults: Defaults) -> Reply:
    """OpenAI's Responses API: the whole Response, or its event stream."""
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return _error(400, "Body is not JSON", "invalid_request_error", "invalid_json")
    if not isinstance(payload, dict):
        return _error(400, "Body is not a JSON object", "invalid_request_error", "invalid_json")
    model = str(payload.get("model", DEFAULT_MODEL))
    if payload.get("stream") is True:
        params = dict(parse_qsl(query))
        chunks = int(params.get("chunks", defaults.chunks))
        pacing_ms = float(params.get("pacing_ms", defaults.pacing_ms))
        return Reply(200, events=response_events(model, max(chunks, 1)), pacing_s=pacing_ms / 1000)
    return Reply(200, response_body(model))


def _embeddings(payload: dict[str, Any]) -> bytes:
    inputs = payload.get("input", "")
    count = len(inputs) if isinstance(inputs, list) else 1
    data = [
        {"object": "embedding", "index": i, "embedding": [0.001 * (i + k) for k in range(8)]}
        for i in range(count)
    ]
    model = payload.get("model", "text-embedding-3-small")
    usage = {"prompt_tokens": 2 * count, "total_tokens": 2 * count}
    return _dumps({"object": "list", "data": data, "model": model, "usage": usage})


@functools.lru_cache(maxsize=1)
def models_body() -> bytes:
    data = [{"id": m, "object": "model", "created": CREATED, "owned_by": "bench"} for m in MODELS]
    return _dumps({"object": "list", "data": data})


def decide(
    method: str,
    target: str,
    body: bytes,
    defaults: Defaults,
    headers: Sequence[tuple[bytes, bytes]] | None = None,
) -> Reply:
    """Pure routing: (method, target, body, headers) -> what to answer."""
    path, _, query = target.partition("?")
    if path == "/v1/models" and method == "GET":
        return Reply(200, models_body())
    if path not in ("/v1/chat/completions", "/v1/embeddings"):
        # Checked here, so that the chat and embeddings paths pay nothing for them.
        if path in MESSAGES_PATHS and method == "POST":
            return _messages(path, query, headers or (), body, defaults)
        if path == RESPONSES_PATH and method == "POST":
            return _responses(query, body, defaults)
        return _error(404, f"Unknown path {path}", "invalid_request_error", "not_found")
    if method != "POST":
        return _error(405, "Method not allowed", "invalid_request_error", "method_not_allowed")
    try:
        payload = json.loads(body) if body else {}
    except ValueError:
        return _error(400, "Body is not JSON", "invalid_request_error", "invalid_json")
    if not isinstance(payload, dict):
        return _error(400, "Body is not a JSON object", "invalid_request_error", "invalid_json")
    if path == "/v1/embeddings":
        return Reply(200, _embeddings(payload))
    model = str(payload.get("model", DEFAULT_MODEL))
    if payload.get("stream") is True:
        params = dict(parse_qsl(query))
        # ``bench_*`` in the body: the overrides that survive a gateway in front
        # (it forwards unknown fields, not the client's query string).
        chunks = int(payload.get("bench_chunks") or params.get("chunks", defaults.chunks))
        pacing_ms = float(
            payload.get("bench_pacing_ms") or params.get("pacing_ms", defaults.pacing_ms)
        )
        opts = payload.get("stream_options")
        usage = type(opts) is dict and opts.get("include_usage") is True
        events = stream_events(model, max(chunks, 1), usage)
        return Reply(200, events=events, pacing_s=pacing_ms / 1000)
    return Reply(200, completion_body(model))


def _frames(conn: h11.Connection, reply: Reply) -> Iterator[bytes]:
    """The bytes to write, one item per flush (the whole response, or one per SSE event)."""
    if reply.events is None:
        headers = [JSON_TYPE, ("content-length", str(len(reply.body)))]
        out = conn.send(h11.Response(status_code=reply.status, headers=headers)) or b""
        out += conn.send(h11.Data(data=reply.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        yield out
        return
    out = conn.send(h11.Response(status_code=reply.status, headers=SSE_HEADERS)) or b""
    last = len(reply.events) - 1
    for i, event in enumerate(reply.events):
        out += conn.send(h11.Data(data=event)) or b""
        if i == last:  # the chunked-encoding terminator rides with [DONE]
            out += conn.send(h11.EndOfMessage()) or b""
        yield out
        out = b""


def make_handler(defaults: Defaults) -> StreamHandler:
    async def handle(stream: trio.SocketStream) -> None:
        conn = h11.Connection(h11.SERVER)
        try:
            while (got := await next_request(stream, conn)) is not None:
                request, body = got
                method, target = request.method.decode(), request.target.decode()
                reply = decide(method, target, body, defaults, request.headers)
                for i, out in enumerate(_frames(conn, reply)):
                    if i and reply.pacing_s:
                        await trio.sleep(reply.pacing_s)
                    await stream.send_all(out)
                if conn.our_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (h11.ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    return handle


def main() -> None:
    parser = server_args(__doc__ or "")
    parser.add_argument("--chunks", type=int, default=20, help="SSE data events per stream")
    parser.add_argument("--pacing-ms", type=float, default=0.0, help="delay between events")
    args = parser.parse_args()
    run(make_handler(Defaults(args.chunks, args.pacing_ms)), args.host, args.port)


if __name__ == "__main__":
    main()
