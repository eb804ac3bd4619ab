"""Failures on ``/v1/responses`` as the official ``openai`` SDK sees them.

Before a stream starts, every failure is an HTTP error in OpenAI's envelope, so the SDK
raises its matching exception: a native provider's own error relayed as it was, a
translated provider's (chat or Anthropic) mapped into OpenAI's words, an unknown model 404.
After a stream started, the stream ends with the Responses ``error`` event (its
``sequence_number`` the next in the stream) and no terminal event, so the SDK's stream
helper has no final response.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; the SDK's sync
client runs in a worker thread (``in_thread``); nothing sleeps.
"""

from __future__ import annotations

from typing import Any

import openai
import pytest
import trio
from e2e_helpers import Gateway, in_thread
from fakes import (
    OPENAI_ERRORS,
    RESPONSES_ERROR,
    RESPONSES_FAILED,
    TEXT_PIECES,
    FakeAnthropic,
    FakeOpenAI,
)
from test_e2e_responses import PROMPT, TERMINAL, TIMEOUT_S, gateway, sdk_client

__all__ = ["gateway"]  # the fixture, imported to be used here


def create(client: openai.OpenAI, stream: bool, **kwargs: Any) -> Any:
    """A whole answer, or a stream read to its end (its events)."""
    if not stream:
        return client.responses.create(**kwargs)
    with client.responses.create(stream=True, **kwargs) as events:
        return list(events)


def error_body(exc: openai.APIStatusError) -> dict[str, Any]:
    body = exc.body
    assert isinstance(body, dict), body
    return body


# --- before the answer -----------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
async def test_a_native_providers_400_is_relayed(
    gateway: Gateway, fake_openai: FakeOpenAI, stream: bool
) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        with pytest.raises(openai.BadRequestError) as info:
            await in_thread(
                create, client, stream, model="openai:resp-error", input=PROMPT, temperature=0.5
            )
    assert error_body(info.value) == RESPONSES_ERROR
    assert fake_openai.last().path == "/v1/responses"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    ("model", "code"),
    [
        ("compat:err-429", "rate_limit_exceeded"),
        ("compat:first-err-429", "rate_limit_exceeded"),  # a 200 stream's first event
        ("anthropic:claude-err-429", None),
    ],
)
async def test_a_translated_providers_error_in_openais_words(
    gateway: Gateway, model: str, code: str | None, stream: bool
) -> None:
    if model.startswith("compat:first-") and not stream:
        model = "compat:err-429"
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        with pytest.raises(openai.RateLimitError) as info:
            await in_thread(create, client, stream, model=model, input=PROMPT)
    body = error_body(info.value)
    assert set(body) == {"message", "type", "param", "code"}
    if model.startswith("compat:"):
        assert body["message"] == OPENAI_ERRORS["err-429"][1]["message"]
    else:
        assert "rate limit" in body["message"]
    if code is not None:
        assert body["code"] == code


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["no-such-model", "nowhere:gpt-4o-mini"])
async def test_an_unknown_model_is_404(
    gateway: Gateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    model: str,
    stream: bool,
) -> None:
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        with pytest.raises(openai.NotFoundError) as info:
            await in_thread(create, client, stream, model=model, input=PROMPT)
    body = error_body(info.value)
    assert body["type"] == "invalid_request_error"
    assert model in body["message"]
    assert not fake_openai.requests
    assert not fake_anthropic.requests


@pytest.mark.parametrize(
    ("fields", "param", "error"),
    [
        ({"input": []}, "input", openai.BadRequestError),
        ({"input": [{"type": "no_such_item"}]}, "input[0].type", openai.BadRequestError),
        ({"previous_response_id": ""}, "previous_response_id", openai.BadRequestError),
        (
            {"previous_response_id": "resp_" + "0" * 24},
            "previous_response_id",
            openai.NotFoundError,
        ),
    ],
    ids=["empty-input", "unknown-item", "empty-previous", "unknown-previous"],
)
async def test_a_bad_request_names_its_param(
    gateway: Gateway,
    fake_openai: FakeOpenAI,
    fields: dict[str, Any],
    param: str,
    error: type[openai.APIStatusError],
) -> None:
    request = {"model": "compat:gpt-4o-mini", "input": PROMPT, **fields}
    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        with pytest.raises(error) as info:
            await in_thread(client.responses.create, **request)
    assert error_body(info.value)["param"] == param
    assert not fake_openai.requests


# --- after the stream started ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        ("openai:resp-fail-mid", "server_error", RESPONSES_FAILED),
        ("compat:mid-err-500", None, OPENAI_ERRORS["err-500"][1]["message"]),
        ("anthropic:claude-overloaded-mid", "overloaded_error", "Overloaded"),
    ],
)
async def test_a_failure_mid_stream_ends_it_with_an_error_event(
    gateway: Gateway, model: str, code: str | None, message: str
) -> None:
    def helper(client: openai.OpenAI) -> list[Any]:
        with client.responses.stream(model=model, input=PROMPT) as stream:
            events = list(stream)
            with pytest.raises(RuntimeError, match=r"response\.completed"):
                stream.get_final_response()
        return events

    with trio.fail_after(TIMEOUT_S), sdk_client(gateway) as client:
        events = await in_thread(create, client, True, model=model, input=PROMPT)
        through_helper = await in_thread(helper, client)
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events))), kinds
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert "response.output_text.delta" in kinds
    assert not set(kinds) & set(TERMINAL), kinds
    last = events[-1]
    assert last.type == "error", kinds
    assert last.message == message
    if code is not None:
        assert last.code == code
    assert [e.type for e in through_helper] == kinds
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text in ("".join(TEXT_PIECES[:n]) for n in range(1, len(TEXT_PIECES) + 1))
