"""``POST /v1/responses`` through the official ``openai`` SDK (``client.responses``), whole
and streamed, on every path the gateway serves it by:

    native       gpt-4o-mini / openai:<model>   FakeOpenAI's own ``/v1/responses``
                                                 (flavor openai: ``responses_api`` default)
    chat         compat:<model>                 FakeOpenAI's ``/v1/chat/completions``, as an
                                                 OpenAI-compatible chat-only server
                                                 (``responses_api = false``)
    anthropic    claude-sonnet / anthropic:<m>  FakeAnthropic's ``/v1/messages`` (through
                                                 the Anthropic chat translator)
    mock         mock-1                         the in-process mock

What an SDK user sees: the answer parses into the SDK's ``Response`` (``output_text``,
output items, status, usage); a stream's events come in the Responses grammar with
``sequence_number`` 0, 1, 2, ... and the SDK's accumulated final response has the whole
answer's content; function-call argument deltas add up to the call's arguments.

The other ``test_e2e_responses_*`` modules import the config and helpers defined here.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; the SDK's sync
client runs in a worker thread (``in_thread``); nothing sleeps.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import CLAUDE_UPSTREAM, Gateway, gateway_config, in_thread
from fakes import ARGUMENTS, RESPONSE_USAGE, TEXT, USAGE, FakeAnthropic, FakeOpenAI

from runestone_proxy.config import Config, ProviderConfig

TIMEOUT_S = 15
#: path -> (the model the client names, the text the answer holds).
TEXT_MODELS = {
    "native": "gpt-4o-mini",
    "chat": "compat:gpt-4o-mini",
    "anthropic": "claude-sonnet",
    "mock": "mock-1",
}
#: path -> the model that answers with a get_weather call (on the mock: any, given tools).
TOOL_MODELS = {
    "native": "openai:tools",
    "chat": "compat:tools",
    "anthropic": "anthropic:claude-tools",
    "mock": "mock-1",
}
#: path -> the usage the provider reports, in the Responses shape (input, output, total).
FAKE_USAGE = {
    "native": (RESPONSE_USAGE["input_tokens"], RESPONSE_USAGE["output_tokens"], 13),
    "chat": (USAGE["prompt_tokens"], USAGE["completion_tokens"], USAGE["total_tokens"]),
    "anthropic": (12, 5, 17),
}
PROMPT = "What's the weather in Paris?"
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
#: Terminal events of a Responses stream.
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def responses_config(
    fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, *extra: ProviderConfig
) -> Config:
    """The e2e gateway (``gateway_config``) plus ``compat``: an OpenAI-compatible chat
    server (the same FakeOpenAI) that does not serve ``/responses``."""
    compat = ProviderConfig(
        "compat",
        "openai",
        base_url=fake_openai.base_url,
        api_key_env="FAKE_OPENAI_KEY",
        responses_api=False,
    )
    return gateway_config(
        fake_openai.base_url, fake_anthropic.base_url, extra_providers=(compat, *extra)
    )


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> Gateway:
    """This module's gateway: conftest's, with the ``compat`` provider."""
    return await start_gateway(responses_config(fake_openai, fake_anthropic))


@contextmanager
def sdk_client(gateway: Gateway, api_key: str = "sk-unused") -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=10)
    try:
        yield client
    finally:
        client.close()


def plain(obj: Any) -> Any:
    """An SDK model as data (what the JSON said, without the SDK's unset fields)."""
    return obj.model_dump(mode="json", exclude_none=True, exclude_unset=True)


def content_of(response: Any) -> list[dict[str, Any]]:
    """A Response's output without the ids and statuses that differ between two answers:
    what the model said."""
    out = []
    for item in response.output:
        data = plain(item)
        data.pop("id", None)
        data.pop("status", None)
        if data["type"] == "function_call":
            data.pop("call_id", None)  # the mock's ids are per answer
            # Anthropic's whole answer holds the input as an object, its stream the JSON text
            data["arguments"] = json.loads(data["arguments"])
        out.append(data)
    return out


def has_text(path: str, text: str, prompt: str = PROMPT) -> bool:
    """The text is the answer on ``path`` (the mock's says which prompt it answered)."""
    if path == "mock":
        return text.startswith("Mock reply #") and text.endswith(f"to: {prompt[:40]}")
    return text == TEXT


def stream_events(client: openai.OpenAI, **kwargs: Any) -> tuple[list[Any], Any]:
    """``client.responses.stream(...)``: every event, and the SDK's accumulated final
    response."""
    with client.responses.stream(**kwargs) as stream:
        events = list(stream)
        final = stream.get_final_response()
    return events, final


def check_grammar(events: Sequence[Any]) -> None:
    """The Responses stream grammar: ``sequence_number`` 0, 1, 2, ...; created, in_progress,
    then per output item: added, its parts and deltas, done (items in output_index order,
    never two open at once); one terminal event, last."""
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    assert kinds[:2] == ["response.created", "response.in_progress"], kinds
    assert kinds[-1] in TERMINAL, kinds
    assert sum(kind in TERMINAL for kind in kinds) == 1, kinds
    open_item: int | None = None
    next_index = 0
    for event in events[2:-1]:
        if event.type == "response.output_item.added":
            assert open_item is None, kinds
            assert event.output_index == next_index, kinds
            open_item = event.output_index
        elif event.type == "response.output_item.done":
            assert event.output_index == open_item, kinds
            open_item, next_index = None, next_index + 1
        else:
            assert open_item is not None, f"{event.type} outside an item: {kinds}"
            assert event.output_index == open_item, kinds
    assert open_item is None, kinds
    final = events[-1].response
    assert len(final.output) == next_index


def arguments_by_item(events: Sequence[Any]) -> dict[str, tuple[str, str]]:
    """Per function-call item: its argument deltas joined, and its .done arguments."""
    deltas: dict[str, list[str]] = {}
    done: dict[str, str] = {}
    for event in events:
        if event.type == "response.function_call_arguments.delta":
            deltas.setdefault(event.item_id, []).append(event.delta)
        elif event.type == "response.function_call_arguments.done":
            done[event.item_id] = event.arguments
    assert deltas.keys() == done.keys()
    return {item: ("".join(pieces), done[item]) for item, pieces in deltas.items()}


# --- whole answers ---------------------------------------------------------------------------


async def test_native_whole_answer_passes_the_clients_body(
    gateway: Gateway, fake_openai: FakeOpenAI
) -> None:
    request: dict[str, Any] = {
        "model": "gpt-4o-mini",
        "instructions": "Be brief.",
        "input": [{"role": "user", "content": PROMPT}],
        "max_output_tokens": 64,
        "metadata": {"trace": "e2e"},
        "reasoning": {"summary": "auto"},
    }
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        raw = await in_thread(client.responses.with_raw_response.create, **request)
    response = raw.parse()
    assert raw.headers["x-runestone-provider"] == "openai"
    assert response.output_text == TEXT
    assert response.status == "completed"
    assert [(i.type, i.role) for i in response.output] == [("message", "assistant")]  # type: ignore[union-attr]
    assert response.usage is not None
    usage = (response.usage.input_tokens, response.usage.output_tokens)
    assert (*usage, response.usage.total_tokens) == FAKE_USAGE["native"]
    seen = fake_openai.last()
    assert seen.path == "/v1/responses"
    assert seen.body == request  # the client's body, unchanged


@pytest.mark.parametrize("path", ["chat", "anthropic", "mock"])
async def test_translated_whole_answer(
    gateway: Gateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, path: str
) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        raw = await in_thread(
            client.responses.with_raw_response.create,
            model=TEXT_MODELS[path],
            instructions="Be brief.",
            input=PROMPT,
            metadata={"trace": "e2e"},
        )
    response = raw.parse()
    assert raw.headers["x-runestone-provider"] == {"chat": "compat"}.get(path, path)
    assert response.object == "response"
    assert response.id.startswith("resp_")
    assert len(response.id) >= len("resp_") + 24
    assert response.status == "completed"
    assert response.instructions == "Be brief."
    assert response.metadata == {"trace": "e2e"}
    (item,) = response.output
    assert item.type == "message"
    assert item.role == "assistant"
    assert item.id.startswith("msg_")
    assert [part.type for part in item.content] == ["output_text"]
    assert has_text(path, response.output_text)
    assert response.usage is not None
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    if path in FAKE_USAGE:
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == FAKE_USAGE[path]
    if path == "chat":
        seen = fake_openai.last()
        assert seen.path == "/v1/chat/completions"
        assert seen.body["model"] == "gpt-4o-mini"
        assert seen.body["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": PROMPT},
        ]
        assert "metadata" not in seen.body
    if path == "anthropic":
        seen = fake_anthropic.last()
        assert seen.path == "/v1/messages"
        assert seen.body["model"] == CLAUDE_UPSTREAM
        assert seen.body["system"] in ("Be brief.", [{"type": "text", "text": "Be brief."}])
        assert [m["role"] for m in seen.body["messages"]] == ["user"]


# --- streams ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(TEXT_MODELS))
async def test_stream_accumulates_to_the_whole_answer(gateway: Gateway, path: str) -> None:
    model = TEXT_MODELS[path]
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        whole = await in_thread(client.responses.create, model=model, input=PROMPT)
        events, final = await in_thread(stream_events, client, model=model, input=PROMPT)
        stored = await in_thread(client.responses.retrieve, final.id)
    check_grammar(events)
    assert events[-1].type == "response.completed"
    completed = events[-1].response
    assert final.id == completed.id == events[0].response.id
    assert final.status == "completed"
    assert final.output_text == whole.output_text
    assert content_of(final) == content_of(whole) == content_of(completed)
    # kept as the stream ended: the same item ids as the stream's events
    assert [plain(i) for i in stored.output] == [plain(i) for i in completed.output]
    assert {e.item_id for e in events if hasattr(e, "item_id")} <= {i.id for i in stored.output}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text
    (done,) = [e for e in events if e.type == "response.output_text.done"]
    assert done.text == whole.output_text
    assert final.usage is not None
    assert whole.usage is not None
    if path in FAKE_USAGE:
        usage = final.usage
        assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == FAKE_USAGE[path]


@pytest.mark.parametrize("path", list(TOOL_MODELS))
async def test_streamed_function_call_arguments_assemble(gateway: Gateway, path: str) -> None:
    model = TOOL_MODELS[path]

    def run(client: openai.OpenAI) -> tuple[list[Any], Any, Any]:
        whole = client.responses.create(model=model, input=PROMPT, tools=[WEATHER_TOOL])
        stream = client.responses.create(
            model=model, input=PROMPT, tools=[WEATHER_TOOL], stream=True
        )
        with stream:
            events = list(stream)
        return events, whole, events[-1].response

    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        events, whole, completed = await in_thread(run, client)
    check_grammar(events)
    calls = [item for item in completed.output if item.type == "function_call"]
    assert [c.name for c in calls] == ["get_weather"]
    (call,) = calls
    assert call.id.startswith("fc_")
    assert call.call_id
    assembled = arguments_by_item(events)
    assert assembled[call.id] == (call.arguments, call.arguments)
    (whole_call,) = [item for item in whole.output if item.type == "function_call"]
    assert content_of(completed) == content_of(whole)
    if path != "mock":
        assert json.loads(call.arguments) == json.loads(ARGUMENTS)
        assert whole_call.call_id == call.call_id
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [i.type for i in added] == [i.type for i in completed.output]
