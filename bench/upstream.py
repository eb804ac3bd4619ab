"""A fast local fake of an OpenAI-compatible provider: raw trio + h11, no framework.

Routes (anything else is 404 in OpenAI's error envelope):

* ``POST /v1/chat/completions``: a fixed ``chat.completion`` JSON; with ``"stream": true``
  in the body, an SSE stream of ``chunks`` ``chat.completion.chunk`` data events (the first
  carries the role, the last ``finish_reason: "stop"``) and then ``data: [DONE]``, with
  ``pacing_ms`` between events. Both default to the CLI flags and can be set per request
  in the query string: ``/v1/chat/completions?chunks=50&pacing_ms=5``.
* ``POST /v1/embeddings``: one small fixed vector per input.
* ``GET /v1/models``: a fixed model list.

It is a benchmark fixture, not a test double: it checks nothing, answers as fast as it can,
and echoes the request's ``model``. Precomputed bodies keep its per-request cost low so that
it is never the bottleneck of a proxy benchmark.

    python -m bench.upstream --port 0 --chunks 20 --pacing-ms 0
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qsl

import attrs
import h11
import trio

from bench.serving import StreamHandler, next_request, run, server_args

CREATED = 1_700_000_000
DEFAULT_MODEL = "bench-model"
JSON_TYPE = ("content-type", "application/json")
SSE_HEADERS = [
    ("content-type", "text/event-stream; charset=utf-8"),
    ("cache-control", "no-cache"),
]
MODELS = [DEFAULT_MODEL, "gpt-4o-mini", "gpt-4o"]


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
def stream_events(model: str, chunks: int) -> tuple[bytes, ...]:
    """``chunks`` framed ``data:`` events (role first, ``stop`` last) plus ``[DONE]``."""
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
    events.append(b"data: [DONE]\n\n")
    return tuple(events)


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


def decide(method: str, target: str, body: bytes, defaults: Defaults) -> Reply:
    """Pure routing: (method, target, body) -> what to answer."""
    path, _, query = target.partition("?")
    if path == "/v1/models" and method == "GET":
        return Reply(200, models_body())
    if path not in ("/v1/chat/completions", "/v1/embeddings"):
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
        chunks = int(params.get("chunks", defaults.chunks))
        pacing_ms = float(params.get("pacing_ms", defaults.pacing_ms))
        return Reply(200, events=stream_events(model, max(chunks, 1)), pacing_s=pacing_ms / 1000)
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
                reply = decide(method, target, body, defaults)
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
