"""The OpenAI Agents SDK (``openai-agents``) through the gateway's ``/v1/responses``.

An ``agents.Agent`` with one ``@function_tool`` (get_weather), its model an
``OpenAIResponsesModel`` over ``AsyncOpenAI(base_url=<gateway>/v1)``, run by ``Runner``:
the model calls the tool, the SDK runs it and sends the result back, the model answers.
Each fake calls the tool on the first turn and answers text once the tool's result is in
the input (``tool-turns`` on FakeOpenAI's Responses and chat APIs, ``claude-tool-turns`` on
FakeAnthropic), so the run takes two model calls on every path:

    native      openai:tool-turns              FakeOpenAI /v1/responses (passed through)
    chat        compat:tool-turns              FakeOpenAI /v1/chat/completions (translated)
    anthropic   anthropic:claude-tool-turns    FakeAnthropic /v1/messages (translated)

The Agents SDK is asyncio-based: each run is ``asyncio.run`` in a worker thread, its client
made and closed inside that loop; tracing is off (``set_tracing_disabled``), so nothing
leaves 127.0.0.1.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; nothing sleeps.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import agents
import openai
import pytest
import trio
from e2e_helpers import Gateway
from fakes import ARGUMENTS, TEXT, FakeAnthropic, FakeOpenAI, Recorded
from test_e2e_responses import TIMEOUT_S, gateway, sdk_client

__all__ = ["gateway"]  # the fixture, imported to be used here

T = TypeVar("T")
WEATHER = "18°C and sunny"
PATHS = {
    "native": "openai:tool-turns",
    "chat": "compat:tool-turns",
    "anthropic": "anthropic:claude-tool-turns",
}
QUESTION = "What's the weather in Paris?"


@pytest.fixture(autouse=True)
def _no_tracing() -> None:
    """The Agents SDK would export traces to OpenAI: off (for the rest of the process too)."""
    agents.set_tracing_disabled(True)


def weather_agent(client: openai.AsyncOpenAI, model: str) -> tuple[agents.Agent[Any], list[str]]:
    """An agent whose only tool records the cities it is asked about."""
    cities: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The weather in a city.

        Args:
            city: The city's name.
        """
        cities.append(city)
        return WEATHER

    agent: agents.Agent[Any] = agents.Agent(
        name="Weather",
        instructions="Answer with the weather.",
        tools=[get_weather],
        model=agents.OpenAIResponsesModel(model=model, openai_client=client),
    )
    return agent, cities


async def run_agent(
    gateway: Gateway, main: Callable[[openai.AsyncOpenAI], Awaitable[T]]
) -> tuple[T, list[dict[str, Any]]]:
    """``main(client)`` under ``asyncio.run`` in a worker thread, and the bodies the SDK
    sent; the client is the gateway's, made and closed in that loop."""
    sent: list[dict[str, Any]] = []

    async def record(request: Any) -> None:
        sent.append(json.loads(request.content))

    async def with_client() -> T:
        client = openai.AsyncOpenAI(
            base_url=f"{gateway.url}/v1",
            api_key="sk-unused",
            max_retries=0,
            timeout=10,
            http_client=openai.DefaultAsyncHttpxClient(event_hooks={"request": [record]}),
        )
        try:
            return await main(client)
        finally:
            await client.close()

    result = await trio.to_thread.run_sync(lambda: asyncio.run(with_client()))
    return result, sent


def upstream_calls(
    path: str, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> list[Recorded]:
    if path == "anthropic":
        return [r for r in fake_anthropic.requests if r.path == "/v1/messages"]
    want = "/v1/responses" if path == "native" else "/v1/chat/completions"
    return [r for r in fake_openai.requests if r.path == want]


def check_second_call(path: str, second: Recorded) -> None:
    """The model's second call carries the tool's call and its result, in its own shape."""
    body = second.body
    if path == "native":
        kinds = [item.get("type") for item in body["input"]]
        assert kinds[-2:] == ["function_call", "function_call_output"], kinds
        assert body["input"][-1]["output"] == WEATHER
        assert body["input"][-1]["call_id"] == body["input"][-2]["call_id"]
    elif path == "chat":
        roles = [m["role"] for m in body["messages"]]
        assert roles == ["system", "user", "assistant", "tool"], roles
        (call,) = body["messages"][2]["tool_calls"]
        assert json.loads(call["function"]["arguments"]) == json.loads(ARGUMENTS)
        assert body["messages"][3] == {
            "role": "tool",
            "tool_call_id": call["id"],
            "content": WEATHER,
        }
    else:
        assert body["system"] in (
            "Answer with the weather.",
            [{"type": "text", "text": "Answer with the weather."}],
        )
        last = body["messages"][-1]
        (result,) = [b for b in last["content"] if b["type"] == "tool_result"]
        assert result["tool_use_id"] == "toolu_01fake"
        assert result["content"] in (WEATHER, [{"type": "text", "text": WEATHER}])
        used = [b for m in body["messages"] for b in m["content"] if isinstance(b, dict)]
        assert "tool_use" in [b["type"] for b in used]


@pytest.mark.parametrize("path", list(PATHS))
async def test_an_agent_runs_its_tool_and_answers(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, path: str
) -> None:
    async def main(client: openai.AsyncOpenAI) -> tuple[Any, list[str]]:
        agent, cities = weather_agent(client, PATHS[path])
        result = await agents.Runner.run(agent, QUESTION)
        return result, cities

    with trio.fail_after(TIMEOUT_S):
        (result, cities), sent = await run_agent(gateway, main)
    assert cities == ["Paris"]
    assert result.final_output == TEXT
    assert len(sent) == 2
    assert not any("previous_response_id" in body for body in sent)
    kinds = [item.type for item in result.new_items]
    assert "tool_call_item" in kinds
    assert "tool_call_output_item" in kinds
    assert kinds[-1] == "message_output_item"
    calls = upstream_calls(path, fake_openai, fake_anthropic)
    assert len(calls) == 2
    check_second_call(path, calls[1])
    if path == "native":  # the SDK's bodies, only the model replaced by the routed one
        assert [c.body for c in calls] == [{**body, "model": "tool-turns"} for body in sent]
    usage = result.context_wrapper.usage
    assert usage.requests == 2
    assert usage.input_tokens > 0
    assert usage.output_tokens > 0


@pytest.mark.parametrize("path", list(PATHS))
async def test_a_streamed_agent_run(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, path: str
) -> None:
    async def main(client: openai.AsyncOpenAI) -> tuple[Any, list[str], list[str]]:
        agent, cities = weather_agent(client, PATHS[path])
        run = agents.Runner.run_streamed(agent, QUESTION)
        deltas = [
            event.data.delta
            async for event in run.stream_events()
            if event.type == "raw_response_event"
            and event.data.type == "response.output_text.delta"
        ]
        return run, cities, deltas

    with trio.fail_after(TIMEOUT_S):
        (run, cities, deltas), _ = await run_agent(gateway, main)
    assert cities == ["Paris"]
    assert run.final_output == TEXT
    assert "".join(deltas).endswith(TEXT)
    calls = upstream_calls(path, fake_openai, fake_anthropic)
    assert len(calls) == 2
    assert all(call.body.get("stream") is True for call in calls)
    check_second_call(path, calls[1])


@pytest.mark.parametrize("path", ["chat", "anthropic"])
async def test_an_agent_continues_with_previous_response_id(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, path: str
) -> None:
    """``auto_previous_response_id``: the SDK sends only the new items and names the last
    response; the gateway supplies the history, so the provider still sees the whole turn."""

    async def main(client: openai.AsyncOpenAI) -> tuple[Any, list[str]]:
        agent, cities = weather_agent(client, PATHS[path])
        result = await agents.Runner.run(agent, QUESTION, auto_previous_response_id=True)
        return result, cities

    with trio.fail_after(TIMEOUT_S):
        (result, cities), sent = await run_agent(gateway, main)
        with sdk_client(gateway) as sync_client:
            stored = await trio.to_thread.run_sync(
                sync_client.responses.retrieve, result.last_response_id
            )
    assert cities == ["Paris"]
    assert result.final_output == TEXT
    assert stored.output_text == TEXT
    first, second = sent
    assert "previous_response_id" not in first
    assert second["previous_response_id"] == result.raw_responses[0].response_id
    assert [item["type"] for item in second["input"]] == ["function_call_output"]
    calls = upstream_calls(path, fake_openai, fake_anthropic)
    assert len(calls) == 2
    check_second_call(path, calls[1])
