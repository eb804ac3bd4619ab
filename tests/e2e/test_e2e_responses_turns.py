"""Conversations over ``/v1/responses`` through the official ``openai`` SDK: function tools
across turns, ``previous_response_id`` chains (on one provider and across providers),
tenants, ``store: false``, and the hosted tools a translated path cannot run.

The gateway keeps the conversation (``gateway/conversation.py``): a turn naming
``previous_response_id`` reaches the provider as the whole history, the stored turn's input
and output first. What each provider received is read from the fakes' recordings: on the
chat path the assistant's ``tool_calls`` then the ``tool`` message, on Anthropic the
``tool_use`` block then the ``tool_result``.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; the SDK's sync
client runs in a worker thread (``in_thread``); nothing sleeps.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import Gateway, in_thread
from fakes import ARGUMENTS, TEXT, FakeAnthropic, FakeOpenAI
from test_e2e_responses import (
    PROMPT,
    TIMEOUT_S,
    WEATHER_TOOL,
    gateway,
    has_text,
    plain,
    responses_config,
    sdk_client,
    stream_events,
)

from runestone_proxy.config import AuthConfig, AuthKeyConfig

__all__ = ["gateway"]  # the fixture, imported to be used here

WEATHER = "18°C and sunny"
KEYS = {"acme": "sk-acme-responses-0123456789ab", "globex": "sk-globex-responses-0123456789"}


def tool_output(call_id: str) -> dict[str, Any]:
    return {"type": "function_call_output", "call_id": call_id, "output": WEATHER}


def user_text(message: dict[str, Any]) -> str:
    """A chat message's text (a string, or its text parts joined)."""
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(part["text"] for part in content if part.get("type") == "text")


def call_with(client: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    """One turn, whole or streamed: the Response."""
    if stream:
        return stream_events(client, **kwargs)[1]
    return client.responses.create(**kwargs)


# --- function tools --------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip_on_a_chat_provider(
    gateway: Gateway, fake_openai: FakeOpenAI, stream: bool
) -> None:
    model = "compat:tool-turns"
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        first = await in_thread(
            call_with, client, stream, model=model, input=PROMPT, tools=[WEATHER_TOOL]
        )
        (call,) = first.output
        assert call.type == "function_call"
        assert (call.name, json.loads(call.arguments)) == ("get_weather", json.loads(ARGUMENTS))
        second = await in_thread(
            call_with,
            client,
            stream,
            model=model,
            previous_response_id=first.id,
            input=[tool_output(call.call_id)],
            tools=[WEATHER_TOOL],
        )
    assert second.output_text == TEXT
    assert second.status == "completed"
    assert second.id != first.id
    sent = fake_openai.last()
    assert sent.path == "/v1/chat/completions"
    assert sent.body["model"] == "tool-turns"
    user, assistant, tool = sent.body["messages"]
    assert (user["role"], user_text(user)) == ("user", PROMPT)
    assert assistant["role"] == "assistant"
    assert not assistant.get("content")
    (sent_call,) = assistant["tool_calls"]
    assert sent_call["id"] == call.call_id
    assert sent_call["function"]["name"] == "get_weather"
    assert json.loads(sent_call["function"]["arguments"]) == json.loads(ARGUMENTS)
    assert tool == {"role": "tool", "tool_call_id": call.call_id, "content": WEATHER}
    assert [t["function"]["name"] for t in sent.body["tools"]] == ["get_weather"]


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip_on_anthropic(
    gateway: Gateway, fake_anthropic: FakeAnthropic, stream: bool
) -> None:
    model = "anthropic:claude-tool-turns"
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        first = await in_thread(
            call_with, client, stream, model=model, input=PROMPT, tools=[WEATHER_TOOL]
        )
        text, call = first.output
        assert (text.type, first.output_text) == ("message", "Let me check.")
        assert call.type == "function_call"
        assert call.call_id == "toolu_01fake"
        second = await in_thread(
            call_with,
            client,
            stream,
            model=model,
            previous_response_id=first.id,
            input=[tool_output(call.call_id)],
            tools=[WEATHER_TOOL],
        )
    assert second.output_text == TEXT
    sent = fake_anthropic.last()
    assert sent.path == "/v1/messages"
    user, assistant, result = sent.body["messages"]
    assert user["role"] == "user"
    assert assistant["role"] == "assistant"
    blocks = assistant["content"]
    assert [b["type"] for b in blocks] == ["text", "tool_use"]
    assert blocks[0]["text"] == "Let me check."
    assert {k: blocks[1][k] for k in ("id", "name", "input")} == {
        "id": "toolu_01fake",
        "name": "get_weather",
        "input": json.loads(ARGUMENTS),
    }
    assert result["role"] == "user"
    (block,) = result["content"]
    assert block["type"] == "tool_result"
    assert block["tool_use_id"] == "toolu_01fake"
    assert block["content"] in (WEATHER, [{"type": "text", "text": WEATHER}])
    assert [t["name"] for t in sent.body["tools"]] == ["get_weather"]


# --- previous_response_id --------------------------------------------------------------------


async def test_a_chain_of_three_turns_on_a_chat_provider(
    gateway: Gateway, fake_openai: FakeOpenAI
) -> None:
    model = "compat:gpt-4o-mini"
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        first = await in_thread(
            client.responses.create, model=model, instructions="Be brief.", input="I am Ada."
        )
        second = await in_thread(
            client.responses.create, model=model, previous_response_id=first.id, input="Who?"
        )
        sent_second = fake_openai.last().body["messages"]
        third = await in_thread(
            client.responses.create,
            model=model,
            instructions="Be terse.",
            previous_response_id=second.id,
            input=[{"role": "user", "content": "Again?"}],
        )
        sent_third = fake_openai.last().body["messages"]
        stored = await in_thread(client.responses.retrieve, third.id)
        items = await in_thread(client.responses.input_items.list, third.id, order="asc")
    assert len({first.id, second.id, third.id}) == 3
    # instructions are never carried over from a previous response
    assert [(m["role"], user_text(m)) for m in sent_second] == [
        ("user", "I am Ada."),
        ("assistant", TEXT),
        ("user", "Who?"),
    ]
    assert [(m["role"], user_text(m)) for m in sent_third] == [
        ("system", "Be terse."),
        ("user", "I am Ada."),
        ("assistant", TEXT),
        ("user", "Who?"),
        ("assistant", TEXT),
        ("user", "Again?"),
    ]
    assert (stored.id, stored.output_text) == (third.id, TEXT)
    assert len(items.data) == 5
    assert [(i.type, i.role) for i in items.data[:4]] == [  # type: ignore[union-attr]
        ("message", "user"),
        ("message", "assistant"),
        ("message", "user"),
        ("message", "assistant"),
    ]
    assert len({i.id for i in items.data}) == 5


async def test_input_items_list_a_short_form_message_as_a_message_item(
    gateway: Gateway,
) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        response = await in_thread(
            client.responses.create,
            model="mock-1",
            input=[{"role": "user", "content": "Short form."}],
        )
        items = await in_thread(client.responses.input_items.list, response.id)
    (item,) = items.data
    assert item.type == "message"
    assert [plain(part) for part in item.content] == [  # type: ignore[union-attr]
        {"type": "input_text", "text": "Short form."}
    ]


async def test_a_continued_response_names_its_previous(gateway: Gateway) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        first = await in_thread(client.responses.create, model="mock-1", input="one")
        second = await in_thread(
            client.responses.create, model="mock-1", previous_response_id=first.id, input="two"
        )
    assert second.previous_response_id == first.id


async def test_a_conversation_moves_between_providers(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Chat provider, then Anthropic, then the mock, then the native Responses provider:
    each turn reaches its provider with the whole history in that provider's shape."""
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        first = await in_thread(client.responses.create, model="compat:gpt-4o-mini", input="A")
        second = await in_thread(
            client.responses.create, model="claude-sonnet", previous_response_id=first.id, input="B"
        )
        third = await in_thread(  # streamed: the stream's final Response is what is kept
            call_with, client, True, model="mock-1", previous_response_id=second.id, input="C"
        )
        fourth = await in_thread(
            client.responses.create, model="gpt-4o-mini", previous_response_id=third.id, input="D"
        )
    sent = fake_anthropic.last().body["messages"]
    assert [(m["role"], user_text(m)) for m in sent] == [
        ("user", "A"),
        ("assistant", TEXT),
        ("user", "B"),
    ]
    assert has_text("mock", third.output_text, "C")
    native = fake_openai.last()
    assert native.path == "/v1/responses"
    assert "previous_response_id" not in native.body
    texts = [
        (item["role"], "".join(part["text"] for part in item["content"]))
        for item in native.body["input"]
    ]
    assert texts == [
        ("user", "A"),
        ("assistant", TEXT),
        ("user", "B"),
        ("assistant", TEXT),
        ("user", "C"),
        ("assistant", third.output_text),
        ("user", "D"),
    ]
    assert fourth.output_text == TEXT


async def test_store_false_is_not_kept(gateway: Gateway) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        kept = await in_thread(client.responses.create, model="mock-1", input="keep")
        forgotten = await in_thread(
            client.responses.create, model="mock-1", input="forget", store=False
        )
        assert forgotten.output_text
        with pytest.raises(openai.NotFoundError) as info:
            await in_thread(
                client.responses.create,
                model="mock-1",
                previous_response_id=forgotten.id,
                input="next",
            )
        with pytest.raises(openai.NotFoundError):
            await in_thread(client.responses.retrieve, forgotten.id)
        assert (await in_thread(client.responses.retrieve, kept.id)).id == kept.id
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]


async def test_another_tenants_response_is_not_found(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    keys = tuple(AuthKeyConfig(key_env=f"KEY_{tenant.upper()}", tenant=tenant) for tenant in KEYS)
    config = attrs.evolve(responses_config(fake_openai, fake_anthropic), auth=AuthConfig(keys=keys))
    env = {f"KEY_{tenant.upper()}": key for tenant, key in KEYS.items()}
    gw = await start_gateway(config, env)
    model = "compat:gpt-4o-mini"
    with trio.fail_after(TIMEOUT_S), sdk_client(gw, KEYS["acme"]) as acme:
        with sdk_client(gw, KEYS["globex"]) as globex:
            first = await in_thread(acme.responses.create, model=model, input="acme's secret")
            calls = len(fake_openai.requests)
            with pytest.raises(openai.NotFoundError) as info:
                await in_thread(
                    globex.responses.create,
                    model=model,
                    previous_response_id=first.id,
                    input="tell me",
                )
            assert len(fake_openai.requests) == calls  # refused before any provider
            with pytest.raises(openai.NotFoundError):
                await in_thread(globex.responses.retrieve, first.id)
            mine = await in_thread(
                acme.responses.create, model=model, previous_response_id=first.id, input="more"
            )
    assert mine.output_text == TEXT
    assert "acme's secret" not in json.dumps(info.value.body)
    assert info.value.body["code"] == "previous_response_not_found"  # type: ignore[index]


# --- hosted tools ----------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["compat:gpt-4o-mini", "claude-sonnet", "mock-1"])
@pytest.mark.parametrize(
    "tool",
    [{"type": "web_search"}, {"type": "file_search", "vector_store_ids": ["vs_1"]}],
    ids=lambda tool: tool["type"],
)
async def test_hosted_tools_are_refused_on_a_translated_path(
    gateway: Gateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    model: str,
    tool: dict[str, Any],
) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await in_thread(
                client.responses.create, model=model, input=PROMPT, tools=[WEATHER_TOOL, tool]
            )
    body = info.value.body
    assert isinstance(body, dict)
    assert tool["type"] in body["message"]
    assert body["param"] == "tools[1]" or body["param"].startswith("tools[1]")
    assert not fake_openai.requests
    assert not fake_anthropic.requests


async def test_hosted_tools_pass_through_to_a_native_provider(
    gateway: Gateway, fake_openai: FakeOpenAI
) -> None:
    tools = [WEATHER_TOOL, {"type": "web_search"}]
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        response = await in_thread(
            client.responses.create, model="gpt-4o-mini", input=PROMPT, tools=tools
        )
    assert response.output_text == TEXT
    assert fake_openai.last().body["tools"] == tools
