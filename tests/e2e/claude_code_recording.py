"""Record what Claude Code sends to an Anthropic-compatible gateway.

A small fake of Anthropic's Messages API (hypercorn's trio worker, 127.0.0.1, port 0) that
writes every request it receives, in arrival order, to ``<out>/<scenario>_<n>.json`` as
``{"method", "path", "headers": [[name, value], ...], "body": <parsed JSON or null>}``, and
answers the way api.anthropic.com does:

    HEAD / (any HEAD)                 200, empty
    POST /v1/messages, stream true    a Messages SSE stream; in the ``tool`` scenario the
                                      first request that offers the Bash tool and carries no
                                      tool_result gets a Bash ``tool_use`` ({"command": "ls"}),
                                      every other one text ending with end_turn
    POST /v1/messages, stream false   the same answer as one whole message
    POST /v1/messages/count_tokens    {"input_tokens": 10}
    anything else                     404 in Anthropic's error envelope

Run as a script it starts the fake, runs the Claude Code binary headless against it with a
fresh HOME and working directory, and writes the scrubbed recordings::

    .venv/bin/python tests/e2e/claude_code_recording.py --claude PATH --out tests/data/claude_code

Scrubbing: the fake API key becomes ``<ANTHROPIC_API_KEY>``; the temporary HOME and working
directory are fixed paths (``/tmp/cc-rec/home``, ``/tmp/cc-rec/work``) so the system prompt is
stable; per-run ids (session, device ids) become ``<uuid-N>``/``<hex64-N>`` placeholders and the
``host`` header ``127.0.0.1:<port>``; a string
longer than ``MAX_TEXT`` is cut with a marker only when a file would exceed ``MAX_FILE_BYTES``.

Wire formats: https://docs.anthropic.com/en/api/messages-streaming (event sequence, tool_use
``input_json_delta``), https://docs.anthropic.com/en/api/errors (the error envelope),
https://docs.anthropic.com/en/api/messages-count-tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve

HOST = "127.0.0.1"
FAKE_KEY = "sk-test-claude-code-recording-0000"
KEY_PLACEHOLDER = "<ANTHROPIC_API_KEY>"
ROOT = Path("/tmp/cc-rec")
MAX_FILE_BYTES = 300_000
MAX_TEXT = 20_000
TOOL_INPUT = '{"command": "ls"}'

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: Environment for every run: the fake's URL and key are added per run. Everything that
#: would reach a server other than ANTHROPIC_BASE_URL is switched off.
QUIET_ENV = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "DISABLE_AUTOUPDATER": "1",
    "DISABLE_TELEMETRY": "1",
    "DISABLE_ERROR_REPORTING": "1",
    "DISABLE_BUG_COMMAND": "1",
    "CLAUDE_CODE_ENABLE_TELEMETRY": "0",
    "CLAUDE_CODE_DISABLE_OFFICIAL_MARKETPLACE_AUTOINSTALL": "1",
    "CLAUDE_CODE_IDE_SKIP_AUTO_INSTALL": "1",
    "NO_COLOR": "1",
}

#: scenario -> (prompt, extra argv, extra env)
SCENARIOS: dict[str, tuple[str, tuple[str, ...], dict[str, str]]] = {
    "say_hi": ("say hi", (), {}),
    "tool_bash": (
        "list the files in this directory using the Bash tool",
        ("--allowedTools", "Bash"),
        {},
    ),
    "say_hi_haiku": ("say hi", ("--model", "claude-haiku-4-5"), {}),
    "say_hi_custom_model": ("say hi", ("--model", "gateway-model"), {}),
    # Tool search (defer_loading) is off when ANTHROPIC_BASE_URL is not Anthropic's own host,
    # unless this is set.
    "say_hi_tool_search": ("say hi", (), {"ENABLE_TOOL_SEARCH": "true"}),
}


@attrs.define(eq=False)
class RecordingAnthropic:
    """The fake: an ASGI app that records each request to a file and answers it."""

    out: Path
    scenario: str
    tool_turn: bool
    count: int = 0
    tool_sent: bool = False
    paths: list[str] = attrs.Factory(list)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        raw = b"".join(chunks)
        query = scope["query_string"].decode("latin-1")
        path = scope["path"] + (f"?{query}" if query else "")
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = {"<unparsed>": raw.decode("utf-8", "replace")}
        headers = [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]]
        self.count += 1
        record = {"method": scope["method"], "path": path, "headers": headers, "body": body}
        name = f"{self.scenario}_{self.count}.json"
        (self.out / name).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        self.paths.append(f"{scope['method']} {path}")
        await self.answer(scope["method"], scope["path"], body, send)

    async def answer(self, method: str, path: str, body: Any, send: Send) -> None:
        if method == "HEAD":
            await _start(send, 200, "text/plain")
            await send({"type": "http.response.body", "body": b""})
        elif method == "POST" and path == "/v1/messages/count_tokens":
            await _json(send, 200, {"input_tokens": 10})
        elif method == "POST" and path == "/v1/messages" and isinstance(body, dict):
            blocks, stop = self.decide(body)
            model = str(body.get("model", "claude-fake"))
            msg_id = f"msg_fake_{self.count:04d}"
            if body.get("stream"):
                await _stream(send, msg_id, model, blocks, stop)
            else:
                await _json(send, 200, _whole(msg_id, model, blocks, stop))
        else:
            error = {"type": "not_found_error", "message": f"Not found: {method} {path}"}
            await _json(send, 404, {"type": "error", "error": error})

    def decide(self, body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
        """The content blocks and stop reason this request gets."""
        tools = body.get("tools") or []
        offers_bash = any(isinstance(t, dict) and t.get("name") == "Bash" for t in tools)
        if self.tool_turn and offers_bash and not self.tool_sent and not _has_tool_result(body):
            self.tool_sent = True
            tool = {"type": "tool_use", "id": "toolu_fake_0001", "name": "Bash", "input": {}}
            return [tool], "tool_use"
        return [{"type": "text", "text": "Hi! The fake is listening."}], "end_turn"


def _has_tool_result(body: dict[str, Any]) -> bool:
    for message in body.get("messages") or []:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        ):
            return True
    return False


def _whole(msg_id: str, model: str, blocks: list[dict[str, Any]], stop: str) -> dict[str, Any]:
    content = [
        {**b, "input": json.loads(TOOL_INPUT)} if b["type"] == "tool_use" else b for b in blocks
    ]
    return {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 8},
    }


async def _stream(
    send: Send, msg_id: str, model: str, blocks: list[dict[str, Any]], stop: str
) -> None:
    await _start(send, 200, "text/event-stream", (("cache-control", "no-cache"),))
    start: dict[str, Any] = {
        "id": msg_id,
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 10, "output_tokens": 1},
    }
    await _event(send, "message_start", {"type": "message_start", "message": start})
    for index, block in enumerate(blocks):
        if block["type"] == "text":
            opened = {**block, "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        else:
            opened = block
            delta = {"type": "input_json_delta", "partial_json": TOOL_INPUT}
        await _event(
            send,
            "content_block_start",
            {"type": "content_block_start", "index": index, "content_block": opened},
        )
        await _event(send, "ping", {"type": "ping"})
        await _event(
            send,
            "content_block_delta",
            {"type": "content_block_delta", "index": index, "delta": delta},
        )
        await _event(send, "content_block_stop", {"type": "content_block_stop", "index": index})
    await _event(
        send,
        "message_delta",
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": 8},
        },
    )
    await _event(send, "message_stop", {"type": "message_stop"})
    await send({"type": "http.response.body", "body": b""})


async def _start(
    send: Send, status: int, content_type: str, extra: tuple[tuple[str, str], ...] = ()
) -> None:
    headers = [("content-type", content_type), ("request-id", "req_fake"), *extra]
    raw = [(k.encode(), v.encode()) for k, v in headers]
    await send({"type": "http.response.start", "status": status, "headers": raw})


async def _json(send: Send, status: int, obj: object) -> None:
    await _start(send, status, "application/json")
    await send({"type": "http.response.body", "body": json.dumps(obj).encode()})


async def _event(send: Send, event: str, data: object) -> None:
    frame = f"event: {event}\ndata: {json.dumps(data)}\n\n".encode()
    await send({"type": "http.response.body", "body": frame, "more_body": True})


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def serve(
    app: RecordingAnthropic, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``app`` on 127.0.0.1, port chosen by the OS; reports the port."""
    config = HypercornConfig()
    config.bind = [f"{HOST}:0"]
    config.accesslog = None
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(hypercorn_serve, app, config)
        task_status.started(int(binds[0].rsplit(":", 1)[1]))


def claude_env(base_url: str, home: Path) -> dict[str, str]:
    """The whole environment a recording run gets (nothing inherited but PATH)."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": base_url,
        "ANTHROPIC_API_KEY": FAKE_KEY,
        **QUIET_ENV,
    }


async def record(claude: str, scenario: str, raw_dir: Path) -> list[str]:
    """Run one scenario against a fresh fake; return 'METHOD path' of each request."""
    prompt, extra, extra_env = SCENARIOS[scenario]
    home, work = ROOT / "home", ROOT / "work"
    for directory in (home, work):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    app = RecordingAnthropic(raw_dir, scenario, tool_turn=scenario.startswith("tool"))
    argv = ["timeout", "120", claude, "-p", prompt, "--output-format", "json", *extra]
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve, app)
        env = claude_env(f"http://{HOST}:{port}", home) | extra_env
        with trio.fail_after(130):
            done = await trio.run_process(
                argv, cwd=work, env=env, capture_stdout=True, capture_stderr=True, check=False
            )
        (raw_dir / f"{scenario}.stdout").write_bytes(done.stdout)
        (raw_dir / f"{scenario}.stderr").write_bytes(done.stderr)
        (raw_dir / f"{scenario}.rc").write_text(f"{done.returncode}\n")
        nursery.cancel_scope.cancel()
    return app.paths


# --- scrubbing ------------------------------------------------------------------------------

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_HEX64 = re.compile(r"\b[0-9a-f]{64}\b")


def scrub(record: dict[str, Any], ids: dict[str, str]) -> dict[str, Any]:
    """Replace the fake key and per-run ids with stable placeholders (``ids`` maps each id
    seen so far to its placeholder, shared across the files of one run)."""

    def text(value: str) -> str:
        value = value.replace(FAKE_KEY, KEY_PLACEHOLDER)
        value = _UUID.sub(lambda m: _placeholder(ids, m.group(0), "uuid"), value)
        return _HEX64.sub(lambda m: _placeholder(ids, m.group(0), "hex64"), value)

    def walk(value: Any) -> Any:
        if isinstance(value, str):
            return text(value)
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = walk(record)
    out["headers"] = [[k, "127.0.0.1:<port>" if k == "host" else v] for k, v in out["headers"]]
    return out


def _placeholder(ids: dict[str, str], value: str, kind: str) -> str:
    if value not in ids:
        ids[value] = f"<{kind}-{sum(1 for v in ids.values() if v.startswith('<' + kind)) + 1}>"
    return ids[value]


def cap(record: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Cut long strings with a marker if the file would exceed MAX_FILE_BYTES."""
    if len(json.dumps(record, indent=1, ensure_ascii=False).encode()) <= MAX_FILE_BYTES:
        return record, False

    def walk(value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_TEXT:
            return value[:MAX_TEXT] + f"...[truncated {len(value) - MAX_TEXT} chars]"
        if isinstance(value, list):
            return [walk(v) for v in value]
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        return value

    out: dict[str, Any] = walk(record)
    return out, True


def finish(raw_dir: Path, out: Path, scenario: str) -> list[str]:
    """Scrub and cap one scenario's raw recordings into ``out``; return notes."""
    notes: list[str] = []
    ids: dict[str, str] = {}
    n = 1
    while (raw := raw_dir / f"{scenario}_{n}.json").exists():
        record = scrub(json.loads(raw.read_text()), ids)
        record, cut = cap(record)
        if cut:
            notes.append(f"{raw.name}: long strings truncated")
        (out / raw.name).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
        n += 1
    return notes


async def main_async(claude: str, out: Path, raw_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    raw_dir.mkdir(parents=True, exist_ok=True)
    for scenario in SCENARIOS:
        paths = await record(claude, scenario, raw_dir)
        rc = (raw_dir / f"{scenario}.rc").read_text().strip()
        print(f"{scenario}: rc={rc} requests={paths}")
        for note in finish(raw_dir, out, scenario):
            print("  " + note)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--claude", required=True, help="path to the claude binary")
    parser.add_argument("--out", type=Path, default=Path("tests/data/claude_code"))
    parser.add_argument("--raw", type=Path, default=ROOT / "raw")
    args = parser.parse_args()
    trio.run(main_async, args.claude, args.out, args.raw)


if __name__ == "__main__":
    main()
