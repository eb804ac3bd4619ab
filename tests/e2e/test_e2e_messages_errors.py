"""``/v1/messages`` failures as the official ``anthropic`` SDK raises them, on both paths.

Before a stream starts every failure is Anthropic's envelope (``{"type": "error", "error":
{"type", "message"}}``) with Anthropic's status, so the SDK raises its own class
(AuthenticationError, RateLimitError, NotFoundError, BadRequestError, OverloadedError on
529, InternalServerError); after it started, an ``event: error`` frame ends the stream and
the SDK raises an ``APIStatusError`` carrying the error's type.
"""

from __future__ import annotations

from typing import Any

import anthropic
import attrs
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import GATEWAY_KEY, Gateway, gateway_config, in_thread
from fakes import TEXT, FakeAnthropic, FakeOpenAI
from test_e2e_messages_native import MESSAGES, sdk_client

from runestone_proxy.config import AuthConfig, AuthKeyConfig


def create(claude: anthropic.Anthropic, model: str, stream: bool, **fields: Any) -> object:
    """One request, read to its end (a stream's events are consumed)."""
    kwargs: dict[str, Any] = {"model": model, "max_tokens": 64, "messages": MESSAGES, **fields}
    if stream:
        return list(claude.messages.create(stream=True, **kwargs))
    return claude.messages.create(**kwargs)


def envelope(error: anthropic.APIStatusError) -> str:
    """The Anthropic error type in the body; checks the envelope's shape."""
    body = error.body
    assert isinstance(body, dict), body
    assert body["type"] == "error", body
    assert set(body["error"]) >= {"type", "message"}, body
    assert error.response.headers["x-request-id"]
    return str(body["error"]["type"])


@pytest.mark.parametrize(
    ("model", "exception", "status", "kind"),
    [
        ("no-such-model", anthropic.NotFoundError, 404, "not_found_error"),
        ("anthropic:claude-err-401", anthropic.AuthenticationError, 401, "authentication_error"),
        ("openai:err-401", anthropic.AuthenticationError, 401, "authentication_error"),
        ("anthropic:claude-err-429", anthropic.RateLimitError, 429, "rate_limit_error"),
        ("openai:err-429", anthropic.RateLimitError, 429, "rate_limit_error"),
        ("anthropic:claude-err-529", anthropic.OverloadedError, 529, "overloaded_error"),
        ("openai:err-503", anthropic.OverloadedError, 529, "overloaded_error"),
        ("openai:err-500", anthropic.InternalServerError, 500, "api_error"),
        ("anthropic:claude-error-api_error", anthropic.InternalServerError, 500, "api_error"),
        ("anthropic:claude-error-invalid_request_error", anthropic.BadRequestError, 400, None),
        ("anthropic:claude-error-permission_error", anthropic.PermissionDeniedError, 403, None),
        ("anthropic:claude-error-billing_error", anthropic.PaymentRequiredError, 402, None),
        ("anthropic:claude-error-rate_limit_error-first", anthropic.RateLimitError, 429, None),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_errors_raise_the_sdk_class(
    gateway: Gateway,
    model: str,
    exception: type[anthropic.APIStatusError],
    status: int,
    kind: str | None,
    stream: bool,
) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        with pytest.raises(exception) as caught:
            await in_thread(create, claude, model, stream)
    error = caught.value
    assert error.status_code == status
    expected = kind or model.removeprefix("anthropic:claude-error-").removesuffix("-first")
    assert envelope(error) == expected
    if model.endswith("claude-err-429"):
        assert int(error.response.headers["retry-after"]) >= 9
    if model == "openai:err-429":
        assert int(error.response.headers["retry-after"]) >= 7


@pytest.mark.parametrize("model", ["claude-sonnet", "fast", "mock-1"])
async def test_missing_max_tokens(
    gateway: Gateway, fake_anthropic: FakeAnthropic, model: str
) -> None:
    with trio.fail_after(10), sdk_client(gateway) as claude:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await in_thread(
                claude.messages.create,
                model=model,
                max_tokens=anthropic.NOT_GIVEN,  # type: ignore[arg-type]
                messages=MESSAGES,
            )
    assert envelope(caught.value) == "invalid_request_error"
    assert "max_tokens" in caught.value.message
    assert fake_anthropic.requests == []  # refused before any provider call


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("anthropic:claude-error-overloaded_error-mid", "overloaded_error"),
        ("anthropic:claude-overloaded-mid", "overloaded_error"),
        ("anthropic:claude-error-api_error-mid", "api_error"),
        ("openai:mid-err-500", "api_error"),
        ("openai:mid-err-429", "rate_limit_error"),
    ],
)
async def test_mid_stream_error(gateway: Gateway, model: str, kind: str) -> None:
    """The stream started (200, text arrived): the error is an ``event: error``, which the
    SDK raises as an APIStatusError while iterating."""

    def run(claude: anthropic.Anthropic) -> list[str]:
        seen: list[str] = []
        with claude.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
            for event in stream:
                seen.append(event.type)
        return seen

    with trio.fail_after(10), sdk_client(gateway) as claude:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await in_thread(run, claude)
    error = caught.value
    assert error.response.status_code == 200  # raised from inside the stream
    assert envelope(error) == kind


@pytest.mark.parametrize(
    ("model", "kind"),
    [
        ("anthropic:claude-no-stop", None),  # ended after message_delta: message_stop added
        ("openai:no-done", None),  # finish_reason came, no [DONE]: a clean end
        ("anthropic:claude-cut", "api_error"),  # ended inside a block
        ("openai:cut", "api_error"),
        ("openai:cut-hard", "api_error"),  # connection dropped mid-body
    ],
)
async def test_stream_endings(gateway: Gateway, model: str, kind: str | None) -> None:
    """How an upstream stream that ends early reaches the SDK: a whole message where
    nothing was lost, else an error event (never a silently truncated message)."""

    def run(claude: anthropic.Anthropic) -> Any:
        with claude.messages.stream(model=model, max_tokens=64, messages=MESSAGES) as stream:
            return stream.get_final_message()

    with trio.fail_after(10), sdk_client(gateway) as claude:
        if kind is None:
            message = await in_thread(run, claude)
            assert message.content[0].text == TEXT
            assert message.stop_reason == "end_turn"
            return
        with pytest.raises(anthropic.APIStatusError) as caught:
            await in_thread(run, claude)
    assert caught.value.response.status_code == 200
    assert envelope(caught.value) == kind


async def test_gateway_key(start_gateway: StartGateway) -> None:
    with trio.fail_after(10):
        gateway = await start_gateway(env={"RUNESTONE_API_KEYS": GATEWAY_KEY})
        with sdk_client(gateway, GATEWAY_KEY) as good, sdk_client(gateway, "sk-wrong-12345") as bad:
            message = await in_thread(create, good, "mock-1", False)
            assert message.content[0].type == "text"  # type: ignore[attr-defined]
            for call in (
                lambda: create(bad, "mock-1", False),
                lambda: create(bad, "claude-sonnet", True),
                lambda: bad.messages.count_tokens(model="claude-sonnet", messages=MESSAGES),
            ):
                with pytest.raises(anthropic.AuthenticationError) as caught:
                    await in_thread(call)
                assert envelope(caught.value) == "authentication_error"
                assert "sk-wrong-12345" not in caught.value.message
        # Claude Code's other way to send a key: Authorization: Bearer.
        bearer = anthropic.Anthropic(
            base_url=gateway.url, auth_token=GATEWAY_KEY, max_retries=0, timeout=10
        )
        try:
            message = await in_thread(create, bearer, "mock-1", False)
        finally:
            bearer.close()
        assert message.content[0].type == "text"  # type: ignore[attr-defined]


async def test_runestone_rate_limit(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> None:
    """Runestone's own rpm: the SDK's RateLimitError, with retry-after and Anthropic's
    ``anthropic-ratelimit-requests-*`` headers (and on success, the same headers)."""
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    key = AuthKeyConfig(key_env="E2E_KEY", tenant="acme", rpm=2)
    config = attrs.evolve(base, auth=AuthConfig(keys=(key,)))
    with trio.fail_after(10):
        gateway = await start_gateway(config, env={"E2E_KEY": GATEWAY_KEY})
        with sdk_client(gateway, GATEWAY_KEY) as claude:
            ok = await in_thread(
                claude.messages.with_raw_response.create,
                model="mock-1",
                max_tokens=64,
                messages=MESSAGES,
            )
            assert ok.headers["anthropic-ratelimit-requests-limit"] == "2"
            assert ok.headers["anthropic-ratelimit-requests-remaining"] == "1"
            assert ok.headers["anthropic-ratelimit-requests-reset"].endswith("Z")
            await in_thread(create, claude, "claude-sonnet", True)
            for model, stream in (("mock-1", False), ("claude-sonnet", True)):
                with pytest.raises(anthropic.RateLimitError) as caught:
                    await in_thread(create, claude, model, stream)
                error = caught.value
                assert envelope(error) == "rate_limit_error"
                headers = error.response.headers
                assert int(headers["retry-after"]) >= 1
                assert headers["anthropic-ratelimit-requests-limit"] == "2"
                assert headers["anthropic-ratelimit-requests-remaining"] == "0"
