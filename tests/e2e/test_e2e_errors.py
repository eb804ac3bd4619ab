"""Provider errors as the official openai SDK meets them, over real sockets.

The fakes answer every documented error (``fakes.ANTHROPIC_ERROR_TYPES``, ``fakes.OPENAI_ERRORS``)
as an HTTP error, as the first event of a stream and mid-stream; the SDK must raise the
exception class its status calls for, with ``code``/``type`` carrying the provider's meaning
(``providers/provider_errors.py``) and ``retry-after`` relayed. The SDK runs with
``max_retries=0`` so each call is one request.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import openai
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import Gateway, in_thread
from fakes import ANTHROPIC_ERROR_TYPES, OPENAI_ERRORS

MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]

#: Anthropic type -> (the SDK's exception class, status, OpenAI type, code).
ANTHROPIC_CASES: list[tuple[str, type[openai.APIStatusError], int, str, str]] = [
    (
        "invalid_request_error",
        openai.BadRequestError,
        400,
        "invalid_request_error",
        "invalid_request_error",
    ),
    (
        "authentication_error",
        openai.AuthenticationError,
        401,
        "invalid_request_error",
        "invalid_api_key",
    ),
    ("billing_error", openai.APIStatusError, 402, "insufficient_quota", "billing_error"),
    (
        "permission_error",
        openai.PermissionDeniedError,
        403,
        "invalid_request_error",
        "permission_error",
    ),
    ("not_found_error", openai.NotFoundError, 404, "invalid_request_error", "not_found_error"),
    ("conflict_error", openai.ConflictError, 409, "invalid_request_error", "conflict_error"),
    (
        "request_too_large",
        openai.APIStatusError,
        413,
        "invalid_request_error",
        "request_too_large",
    ),
    ("rate_limit_error", openai.RateLimitError, 429, "requests", "rate_limit_exceeded"),
    ("api_error", openai.InternalServerError, 500, "server_error", "api_error"),
    ("timeout_error", openai.InternalServerError, 504, "server_error", "timeout_error"),
    ("overloaded_error", openai.InternalServerError, 503, "server_error", "overloaded_error"),
]

#: The fake OpenAI's documented errors -> the SDK's exception class, and the status when the
#: error is a 200 stream's first event (no status of its own); type/code pass unchanged.
OPENAI_CASES: list[tuple[str, type[openai.APIStatusError], int]] = [
    ("err-400", openai.BadRequestError, 400),
    ("err-401", openai.AuthenticationError, 401),
    ("err-403", openai.PermissionDeniedError, 403),
    ("err-404", openai.NotFoundError, 404),
    ("err-429", openai.RateLimitError, 429),
    ("err-429-tokens", openai.RateLimitError, 429),
    ("err-429-quota", openai.RateLimitError, 429),
    ("err-500", openai.InternalServerError, 502),
    ("err-503", openai.InternalServerError, 502),
]


def _fields(error: openai.APIError) -> tuple[str | None, str | None, str]:
    """``type``, ``code`` and the provider's own ``message`` (the SDK prefixes its message
    attribute with the status)."""
    assert isinstance(error.body, dict)
    return error.type, error.code, error.body["message"]


async def _raises(
    cls: type[openai.APIError], call: Any, *args: Any, **kwargs: Any
) -> openai.APIError:
    with pytest.raises(openai.APIError) as caught:
        await in_thread(call, *args, **kwargs)
    assert type(caught.value) is cls, caught.value
    return caught.value


def _drain(sdk: openai.OpenAI, model: str) -> None:
    """Read a stream to its end (the SDK raises on an in-band error event). Blocking."""
    for _ in sdk.chat.completions.create(model=model, messages=MESSAGES, stream=True):
        pass


@contextlib.contextmanager
def _client(gateway: Gateway) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key="sk-unused", max_retries=0, timeout=10
    )
    with client:
        yield client


@pytest.mark.parametrize(("kind", "cls", "status", "openai_type", "code"), ANTHROPIC_CASES)
async def test_anthropic_errors_reach_the_sdk(
    start_gateway: StartGateway,
    kind: str,
    cls: type[openai.APIStatusError],
    status: int,
    openai_type: str,
    code: str,
) -> None:
    _, message, headers = ANTHROPIC_ERROR_TYPES[kind]
    model = f"anthropic:claude-error-{kind}"
    with trio.fail_after(10):
        # Two gateways: a 429's retry-after pauses the deployment it came from, so the
        # requests after it would wait that long.
        one, two = await start_gateway(), await start_gateway()
        with _client(one) as sdk, _client(two) as other:
            create = sdk.chat.completions.create
            # A 200 stream whose first event is the error: nothing was relayed yet, so the
            # client still gets the error's status.
            first = await _raises(
                cls, create, model=f"{model}-first", messages=MESSAGES, stream=True
            )
            # After text was relayed, the stream ends with the error as an in-band event.
            mid = await _raises(openai.APIError, _drain, sdk, f"{model}-mid")
            whole = await _raises(cls, create, model=model, messages=MESSAGES)
            streamed = await _raises(
                cls, other.chat.completions.create, model=model, messages=MESSAGES, stream=True
            )
    for error in (whole, streamed, first, mid):
        assert _fields(error) == (openai_type, code, message)
    for error in (whole, streamed, first):
        assert isinstance(error, openai.APIStatusError)
        assert error.status_code == status
    for error in (whole, streamed):
        assert isinstance(error, openai.APIStatusError)
        assert error.response.headers.get("retry-after") == dict(headers).get("retry-after")


@pytest.mark.parametrize(("model", "cls", "in_band"), OPENAI_CASES)
async def test_openai_errors_reach_the_sdk_unchanged(
    sdk: openai.OpenAI, model: str, cls: type[openai.APIStatusError], in_band: int
) -> None:
    status, fields, headers = OPENAI_ERRORS[model]
    create = sdk.chat.completions.create
    with trio.fail_after(10):
        first = await _raises(
            cls, create, model=f"openai:first-{model}", messages=MESSAGES, stream=True
        )
        mid = await _raises(openai.APIError, _drain, sdk, f"openai:mid-{model}")
        whole = await _raises(cls, create, model=f"openai:{model}", messages=MESSAGES)
    assert isinstance(whole, openai.APIStatusError)
    assert isinstance(first, openai.APIStatusError)
    assert (whole.status_code, first.status_code) == (status, in_band)
    assert whole.response.headers.get("retry-after") == dict(headers).get("retry-after")
    for error in (whole, first, mid):
        assert _fields(error) == (fields["type"], fields["code"], fields["message"])
