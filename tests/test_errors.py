"""The error tree: every class answers through the base class's status/type/envelope."""

from __future__ import annotations

import json

from runestone_proxy.errors import (
    GatewayError,
    InvalidParam,
    ProviderError,
    RateLimited,
    UpstreamError,
    UpstreamTimeout,
)


def test_a_provider_error_answers_with_the_provider_s_own_status_type_and_retryability() -> None:
    exc = ProviderError(
        "slow down", status=429, error_type="rate_limit_error", retryable=True, retry_after_s=2.5
    )
    assert isinstance(exc, UpstreamError)
    assert (exc.http_status, exc.is_retryable, exc.code) == (429, True, None)
    assert exc.envelope() == {
        "error": {"message": "slow down", "type": "rate_limit_error", "param": None, "code": None}
    }
    assert json.loads(exc.body()) == exc.envelope()
    assert exc.headers == ((b"retry-after", b"3"),)
    assert repr(exc) == "ProviderError('slow down', status=429)"
    # The instance's values are its own: the classes keep their defaults.
    assert (ProviderError.status, ProviderError.error_type) == (502, "server_error")
    assert ProviderError.retryable is True


def test_every_other_class_answers_with_its_class_attributes() -> None:
    for exc, status, kind, retryable in [
        (GatewayError("x"), 500, "server_error", False),
        (InvalidParam("x", param="p"), 400, "invalid_request_error", False),
        (RateLimited("x", retry_after_s=1), 429, "requests", True),
        (UpstreamTimeout("x"), 504, "server_error", True),
    ]:
        assert (exc.http_status, exc.is_retryable) == (status, retryable)
        assert exc.envelope()["error"]["type"] == kind  # type: ignore[index]
