"""Claude Code itself, pointed at Runestone: in front of Anthropic, and in front of an
OpenAI-compatible model through an alias pattern.

The real ``claude`` binary runs headless (``claude -p ... --output-format json``) with a fresh
HOME, ``ANTHROPIC_BASE_URL`` set to the gateway and ``ANTHROPIC_API_KEY`` set to a gateway
key, and everything that would reach another server switched off
(``claude_code_recording.QUIET_ENV``). The binary comes from ``RUNESTONE_CLAUDE_BIN`` (``.ci/run``
installs ``@anthropic-ai/claude-code`` with npm and sets it) or ``claude`` on PATH; without
one these tests are skipped (the recorded requests in ``tests/data/claude_code`` are replayed
by ``test_e2e_messages_*`` either way).

Upstreams: the recording fake of Anthropic (``claude_code_recording.RecordingAnthropic``)
for the native path; for the translated path a small OpenAI-compatible fake that answers the
Bash tool call Claude Code is asked to make, then text once the tool result comes back.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from claude_code_recording import QUIET_ENV, RecordingAnthropic, serve
from conftest import StartGateway
from e2e_helpers import GATEWAY_KEY, HOST, gateway_config

from runestone_proxy.config import AuthConfig, AuthKeyConfig

pytestmark = pytest.mark.slow

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
UPSTREAM_KEY = "sk-ant-upstream-for-claude-code-0000"
OPENAI_UPSTREAM_KEY = "sk-openai-upstream-for-claude-code-0000"


def _claude_bin() -> str | None:
    found = os.environ.get("RUNESTONE_CLAUDE_BIN") or shutil.which("claude")
    return found if found and Path(found).exists() else None


CLAUDE = _claude_bin()
needs_claude = pytest.mark.skipif(CLAUDE is None, reason="no Claude Code binary (see docstring)")


async def run_claude(port: int, home: Path, *args: str) -> dict[str, Any]:
    """One headless Claude Code run against the gateway; its JSON result."""
    assert CLAUDE is not None
    work = home / "work"
    work.mkdir(parents=True)
    (work / "hello.txt").write_text("hi\n")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": f"http://{HOST}:{port}",
        "ANTHROPIC_API_KEY": GATEWAY_KEY,
        **QUIET_ENV,
    }
    argv = [CLAUDE, "-p", *args, "--output-format", "json"]
    with trio.fail_after(150):
        done = await trio.run_process(
            argv, cwd=work, env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    assert done.returncode == 0, (done.stdout[-2000:], done.stderr[-2000:])
    result: dict[str, Any] = json.loads(done.stdout)
    assert result.get("is_error") is False, result
    return result


def _gateway(anthropic_url: str, openai_url: str, aliases: dict[str, str]) -> Any:
    base = gateway_config(openai_url, anthropic_url)
    providers = tuple(
        attrs.evolve(p, model_patterns=("claude-*",)) if p.name == "anthropic" else p
        for p in base.providers
    )
    keys = (AuthKeyConfig(key_env="GATEWAY_KEY", tenant="default"),)
    return attrs.evolve(
        base, providers=providers, aliases=aliases, auth=AuthConfig(enabled=True, keys=keys)
    )


@needs_claude
async def test_claude_code_in_front_of_anthropic(
    start_gateway: StartGateway, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Native: every request Claude Code makes reaches Anthropic with the provider's key (not
    the gateway's), its anthropic-beta list and version, and its answer comes back."""
    upstream = RecordingAnthropic(tmp_path / "rec", "native", tool_turn=True)
    (tmp_path / "rec").mkdir()
    port = await nursery.start(serve, upstream)
    config = _gateway(f"http://{HOST}:{port}", f"http://{HOST}:1", {})
    env = {"GATEWAY_KEY": GATEWAY_KEY, "FAKE_ANTHROPIC_KEY": UPSTREAM_KEY}
    gateway = await start_gateway(config, env)
    result = await run_claude(
        gateway.port,
        tmp_path / "home",
        "list the files in this directory using the Bash tool",
        "--allowedTools",
        "Bash",
    )
    assert result["num_turns"] >= 2  # the tool turn and the answer after it
    posts = sorted((tmp_path / "rec").glob("native_*.json"))
    bodies = [json.loads(p.read_text()) for p in posts]
    messages = [b for b in bodies if b["method"] == "POST"]
    assert len(messages) >= 2
    for record in messages:
        headers = dict(record["headers"])
        assert record["path"] == "/v1/messages"
        assert headers["x-api-key"] == UPSTREAM_KEY
        assert GATEWAY_KEY not in json.dumps(record)
        assert "claude-code-20250219" in headers["anthropic-beta"]
        assert headers["anthropic-version"] == "2023-06-01"
    follow_up = messages[-1]["body"]["messages"]
    assert any(
        block.get("type") == "tool_result"
        for turn in follow_up
        if isinstance(turn["content"], list)
        for block in turn["content"]
    )


@attrs.define(eq=False)
class BashOpenAI:
    """An OpenAI-compatible fake: a Bash tool call first, text once a tool result is in."""

    bodies: list[dict[str, Any]] = attrs.Factory(list)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        raw = b""
        while True:
            message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        body = json.loads(raw) if raw else {}
        self.bodies.append(body)
        answered = any(m.get("role") == "tool" for m in body.get("messages", ()))
        offered = any(t["function"]["name"] == "Bash" for t in body.get("tools", ()))
        delta: dict[str, Any]
        if offered and not answered:
            call = {"id": "call_1", "type": "function"}
            call["function"] = {"name": "Bash", "arguments": '{"command": "ls"}'}
            delta, finish = (
                {"role": "assistant", "tool_calls": [{"index": 0, **call}]},
                "tool_calls",
            )
        else:
            delta, finish = {"role": "assistant", "content": "The directory has hello.txt."}, "stop"
        chunks = [
            {"choices": [{"index": 0, "delta": delta, "finish_reason": None}]},
            {"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]},
            {
                "choices": [],
                "usage": {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13},
            },
        ]
        head = {"id": "chatcmpl-bash", "object": "chat.completion.chunk", "created": 0}
        events = b"".join(
            b"data: " + json.dumps({**head, "model": body.get("model"), **c}).encode() + b"\n\n"
            for c in chunks
        )
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": events + b"data: [DONE]\n\n"})


@needs_claude
async def test_claude_code_in_front_of_an_openai_compatible_model(
    start_gateway: StartGateway, nursery: trio.Nursery, tmp_path: Path
) -> None:
    """Translated: an alias pattern sends every Claude model Claude Code asks for to an
    OpenAI-compatible model; the tool round trip works through the translation."""
    upstream = BashOpenAI()
    port = await nursery.start(serve, upstream)
    config = _gateway(f"http://{HOST}:1", f"http://{HOST}:{port}/v1", {"claude-*": "openai:gpt-4o-mini"})
    config = attrs.evolve(
        config,
        providers=tuple(
            attrs.evolve(p, api_key_env="OPENAI_UP") if p.name == "openai" else p
            for p in config.providers
        ),
    )
    env = {"GATEWAY_KEY": GATEWAY_KEY, "OPENAI_UP": OPENAI_UPSTREAM_KEY}
    gateway = await start_gateway(config, env)
    result = await run_claude(
        gateway.port,
        tmp_path / "home",
        "list the files in this directory using the Bash tool",
        "--allowedTools",
        "Bash",
    )
    assert "hello.txt" in result["result"]
    assert len(upstream.bodies) >= 2
    first, last = upstream.bodies[0], upstream.bodies[-1]
    assert first["model"] == "gpt-4o-mini"
    assert first["stream"] is True
    roles = [m["role"] for m in last["messages"]]
    # The tool message follows the assistant turn that called the tool.
    at = roles.index("tool")
    assert roles[at - 1] == "assistant"
    assert last["messages"][at - 1]["tool_calls"][0]["function"]["name"] == "Bash"
