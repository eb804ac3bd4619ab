"""Every request Claude Code 2.1.197 was recorded sending (``tests/data/claude_code``),
replayed through the gateway as sent: its headers (``x-stainless-*``, ``x-app``, the session
id, ``accept-encoding`` with br and zstd, the long ``anthropic-beta`` list), ``?beta=true``,
and its body (system blocks with ``cache_control``, two dozen tools, ``metadata.user_id``
holding a JSON string, ``context_management``, adaptive or budgeted ``thinking``,
``output_config.effort``, a ``role: "system"`` message inside ``messages``).

Native (a ``claude-*`` provider pattern on the Anthropic fake): Anthropic receives the body
unchanged, the ``anthropic-*`` headers as sent and its own key. Translated (an alias pattern
to an OpenAI-compatible model, and to the mock): 200 and a well-formed Anthropic stream; what
the OpenAI-compatible fake receives is a valid chat body (system first, the mid-conversation
system message kept in place, every tool as a function).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import ANTHROPIC_KEY, GATEWAY_KEY, gateway_config
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.config import AuthConfig, AuthKeyConfig

DATA = Path(__file__).resolve().parents[1] / "data" / "claude_code"
RECORDED = sorted(
    p
    for p in DATA.glob("*.json")
    if json.loads(p.read_text())["method"] == "POST"
    and json.loads(p.read_text())["path"].startswith("/v1/messages")
)
#: Hop-by-hop or recomputed: not replayed as recorded.
_NOT_REPLAYED = {"host", "content-length", "connection", "x-api-key"}


def replay_headers(recorded: dict[str, Any]) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in recorded["headers"] if k not in _NOT_REPLAYED]
    return [*headers, ("x-api-key", GATEWAY_KEY)]


def frames(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` of an Anthropic event stream, checking each frame's framing."""
    out = []
    for block in text.strip("\n").split("\n\n"):
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: "), block
        assert data_line.startswith("data: "), block
        data = json.loads(data_line[len("data: ") :])
        assert data["type"] == event_line[len("event: ") :]
        out.append((data["type"], data))
    return out


def well_formed(text: str) -> list[tuple[str, dict[str, Any]]]:
    events = [e for e in frames(text) if e[0] != "ping"]
    kinds = [k for k, _ in events]
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") >= 1
    return events


def _config(openai_url: str, anthropic_url: str, aliases: dict[str, str]) -> Any:
    base = gateway_config(openai_url, anthropic_url)
    providers = tuple(
        attrs.evolve(p, model_patterns=("claude-*",)) if p.name == "anthropic" else p
        for p in base.providers
    )
    keys = (AuthKeyConfig(key_env="GATEWAY_KEY", tenant="default"),)
    return attrs.evolve(
        base,
        providers=providers,
        aliases={**base.aliases, **aliases},
        auth=AuthConfig(enabled=True, keys=keys),
    )


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
async def test_native_replay(
    path: Path,
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    recorded = json.loads(path.read_text())
    # The run with ``--model gateway-model``: an operator's own name for an Anthropic model.
    aliases = {"gateway-model": "anthropic:gateway-model"}
    config = _config(fake_openai.base_url, fake_anthropic.base_url, aliases)
    gateway = await start_gateway(config, {"GATEWAY_KEY": GATEWAY_KEY})
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            response = await client.post(
                recorded["path"],
                headers=replay_headers(recorded),
                content=json.dumps(recorded["body"]).encode(),
            )
    assert response.status_code == 200, response.text
    assert response.headers["x-runestone-provider"] == "anthropic"
    well_formed(response.text)
    seen = fake_anthropic.last()
    assert seen.body == recorded["body"]  # unchanged, model included
    sent = dict(recorded["headers"])
    assert seen.headers["x-api-key"] == ANTHROPIC_KEY
    for name in ("anthropic-beta", "anthropic-version", "x-app", "x-claude-code-session-id"):
        assert seen.headers[name] == sent[name]
    assert "x-stainless-os" not in seen.headers  # the SDK's own telemetry stays here


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.stem)
@pytest.mark.parametrize("target", ["openai:gpt-4o-mini", "mock-1"])
async def test_translated_replay(
    path: Path,
    target: str,
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
) -> None:
    recorded = json.loads(path.read_text())
    aliases = {"claude-*": target, "gateway-model": target}
    config = _config(fake_openai.base_url, fake_anthropic.base_url, aliases)
    gateway = await start_gateway(config, {"GATEWAY_KEY": GATEWAY_KEY})
    with trio.fail_after(20):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            response = await client.post(
                recorded["path"],
                headers=replay_headers(recorded),
                content=json.dumps(recorded["body"]).encode(),
            )
    assert response.status_code == 200, response.text
    events = well_formed(response.text)
    blocks = [d["content_block"]["type"] for k, d in events if k == "content_block_start"]
    deltas = [d["delta"] for k, d in events if k == "content_block_delta"]
    # The mock calls the first tool it is offered; the fake OpenAI answers text.
    assert blocks == (["tool_use"] if target == "mock-1" else ["text"])
    assert "".join(d.get("text", d.get("partial_json", "")) for d in deltas)
    if target == "mock-1":
        return
    chat = fake_openai.last().body
    assert chat["model"] == "gpt-4o-mini"
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}
    roles = [m["role"] for m in chat["messages"]]
    assert roles[0] == "system"
    recorded_roles = [m["role"] for m in recorded["body"]["messages"]]
    if "system" in recorded_roles:  # the mid-conversation system message keeps its place
        assert roles[1:].count("system") == recorded_roles.count("system")
    assert len(chat["tools"]) == len(recorded["body"]["tools"])
    assert all(t["type"] == "function" for t in chat["tools"])
    assert "reasoning_effort" not in chat  # gpt-4o-mini's entry has no reasoning capability
    assert "context_management" not in chat
    assert "thinking" not in chat
