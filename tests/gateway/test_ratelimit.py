"""Per-key rate limits as plain data: fixed times, no event loop; property tests for the
window guarantee ("never more than the limit in any interval of the window's length")."""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy import telemetry
from runestone_proxy.config import AuthKeyConfig
from runestone_proxy.errors import RateLimited
from runestone_proxy.gateway.rate_wire import TokensRateLimited, duration, headers_for
from runestone_proxy.gateway.ratelimit import (
    NO_RESERVATION,
    Denied,
    KeyLimits,
    KeyState,
    Quota,
    RateLimiter,
    Reservation,
    reconcile,
    reserve,
)
from runestone_proxy.gateway.token_estimate import estimate_tokens, usage_tokens

T0 = 999_960.0  # a monotonic clock is far from zero; start on a minute boundary


@pytest.fixture
def recorder() -> Iterator[telemetry.Recorder]:
    rec = telemetry.Recorder()
    remove = telemetry.add_handler(rec)
    yield rec
    remove()


def ok(result: Reservation | Denied) -> Reservation:
    assert isinstance(result, Reservation), result
    return result


def denied(result: Reservation | Denied) -> Denied:
    assert isinstance(result, Denied), result
    return result


# --- the duration format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.02, "20ms"),
        (0.0001, "1ms"),  # rounded up: never tell a client to come back too early
        (0.999, "999ms"),
        (1, "1s"),
        (8.64, "8.64s"),
        (20, "20s"),
        (60, "1m0s"),
        (179.56, "2m59.56s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
    ],
)
def test_duration_in_openai_format(seconds: float, text: str) -> None:
    assert duration(seconds) == text


# --- requests ------------------------------------------------------------------------------------


def test_rpm_admits_up_to_the_limit_then_says_when() -> None:
    state, limits = KeyState(), KeyLimits(rpm=3)
    for i in range(3):
        ok(reserve(state, limits, T0 + i))
    no = denied(reserve(state, limits, T0 + 10))
    assert (no.which, no.limit, no.used, no.requested) == ("rpm", 3, 3, 1)
    # The first request (bucket T0) leaves the window when bucket T0 + 61 begins.
    assert no.retry_after_s == pytest.approx(51.0)
    assert denied(reserve(state, limits, T0 + 60.999)).retry_after_s == pytest.approx(0.001)
    ok(reserve(state, limits, T0 + 61))


def test_a_denied_request_is_not_counted() -> None:
    state, limits = KeyState(), KeyLimits(rpm=1)
    ok(reserve(state, limits, T0))
    for i in range(10):
        denied(reserve(state, limits, T0 + 1 + i))
    ok(reserve(state, limits, T0 + 61))


def test_headers_after_a_request() -> None:
    state = KeyState()
    r = ok(reserve(state, KeyLimits(rpm=3), T0 + 0.5))
    assert r.quota == Quota(3, 2, 60.5)
    assert headers_for(r.quota) == (
        (b"x-ratelimit-limit-requests", b"3"),
        (b"x-ratelimit-remaining-requests", b"2"),
        (b"x-ratelimit-reset-requests", b"1m0.5s"),
    )


def test_the_more_binding_of_rpm_and_rph_is_reported() -> None:
    state, limits = KeyState(), KeyLimits(rpm=10, rph=12)
    r = ok(reserve(state, limits, T0))
    assert (r.quota.limit_requests, r.quota.remaining_requests) == (10, 9)
    for i in range(9):
        ok(reserve(state, limits, T0 + 1 + i))
    r = ok(reserve(state, limits, T0 + 120))  # the minute window is empty again
    assert (r.quota.limit_requests, r.quota.remaining_requests) == (12, 1)
    ok(reserve(state, limits, T0 + 180))
    no = denied(reserve(state, limits, T0 + 240))
    assert (no.which, no.limit, no.used) == ("rph", 12, 12)
    assert no.retry_after_s == pytest.approx(3660 - 240)  # 60 one-minute buckets + 1


def test_unlimited_keys_have_no_state_and_no_headers() -> None:
    limiter = RateLimiter()
    reservation, headers = limiter.check("k", KeyLimits(), T0)
    assert reservation is NO_RESERVATION
    assert headers == ()
    assert limiter.keys == {}
    limiter.reconcile(reservation, 100, T0)


# --- tokens --------------------------------------------------------------------------------------


def test_tokens_are_reserved_and_refunded() -> None:
    state, limits = KeyState(), KeyLimits(tpm=1000)
    first = ok(reserve(state, limits, T0, est_tokens=600))
    assert (first.quota.limit_tokens, first.quota.remaining_tokens) == (1000, 400)
    assert first.quota.limit_requests is None
    no = denied(reserve(state, limits, T0 + 1, est_tokens=600))
    assert (no.which, no.used, no.requested) == ("tpm", 600, 600)
    reconcile(first, 100, T0 + 2)  # the answer was short: 500 back
    second = ok(reserve(state, limits, T0 + 3, est_tokens=600))
    assert second.quota.remaining_tokens == 300
    reconcile(first, 0, T0 + 4)  # settled once only
    assert state.tpm is not None
    assert state.tpm.total == 700


def test_extra_tokens_are_charged_now() -> None:
    state, limits = KeyState(), KeyLimits(tpm=1000)
    r = ok(reserve(state, limits, T0, est_tokens=100))
    reconcile(r, 1100, T0 + 30)
    assert state.tpm is not None
    assert state.tpm.total == 1100
    no = denied(reserve(state, limits, T0 + 31, est_tokens=1))
    # The 100 leave at T0 + 61, the 1000 charged at T0 + 30 at T0 + 91.
    assert no.retry_after_s == pytest.approx(60)


def test_unknown_usage_keeps_the_reservation() -> None:
    state = KeyState()
    r = ok(reserve(state, KeyLimits(tpm=1000), T0, est_tokens=400))
    reconcile(r, None, T0 + 1)
    assert state.tpm is not None
    assert state.tpm.total == 400


def test_a_refund_after_the_window_moved_on_changes_nothing() -> None:
    state, limits = KeyState(), KeyLimits(tpm=1000)
    r = ok(reserve(state, limits, T0, est_tokens=900))
    ok(reserve(state, limits, T0 + 70, est_tokens=900))
    reconcile(r, 0, T0 + 71)  # its bucket already left the window
    assert state.tpm is not None
    assert state.tpm.total == 900


def test_a_request_larger_than_the_limit_can_never_run() -> None:
    limiter = RateLimiter()
    with pytest.raises(TokensRateLimited) as info:
        limiter.check("k", KeyLimits(tpm=1000), T0, 2000, key_mask="sk-...abcd")
    error = info.value
    assert error.retry_after_s is None
    assert error.envelope()["error"] == {
        "message": "Request too large for key sk-...abcd on tokens per min (TPM): Limit 1000, "
        "Requested 2000. The input or output tokens must be reduced in order to run "
        "successfully.",
        "type": "tokens",
        "param": None,
        "code": "rate_limit_exceeded",
    }


# --- the wrapper ---------------------------------------------------------------------------------


def test_check_raises_openais_429(recorder: telemetry.Recorder) -> None:
    limiter = RateLimiter()
    limits = KeyLimits(rpm=3, tpm=10_000)
    for i in range(3):
        _, headers = limiter.check("k", limits, T0 + i, 10, tenant="t", request_id=f"r{i}")
    assert dict(headers)[b"x-ratelimit-remaining-requests"] == b"0"
    assert dict(headers)[b"x-ratelimit-remaining-tokens"] == b"9970"
    with pytest.raises(RateLimited) as info:
        limiter.check(
            "k", limits, T0 + 40.5, 10, tenant="t", key_mask="sk-...wxyz", request_id="r3"
        )
    error = info.value
    assert type(error) is RateLimited
    assert error.http_status == 429
    assert error.envelope()["error"] == {
        "message": "Rate limit reached for key sk-...wxyz on requests per min (RPM): Limit 3, "
        "Used 3, Requested 1. Please try again in 20.5s.",
        "type": "requests",
        "param": None,
        "code": "rate_limit_exceeded",
    }
    headers = dict(error.headers)
    assert headers[b"retry-after"] == b"21"
    assert headers[b"x-ratelimit-limit-requests"] == b"3"
    assert headers[b"x-ratelimit-remaining-requests"] == b"0"
    assert headers[b"x-ratelimit-reset-requests"] == b"22.5s"
    assert headers[b"x-ratelimit-limit-tokens"] == b"10000"
    checks = recorder.named("ratelimit.check")
    assert [c["remaining_requests"] for c in checks] == [2, 1, 0]
    assert checks[0] == {
        "tenant": "t",
        "key_mask": "-",
        "request_id": "r0",
        "remaining_requests": 2,
        "remaining_tokens": 9990,
    }
    assert recorder.named("ratelimit.block") == [
        {
            "tenant": "t",
            "key_mask": "sk-...wxyz",
            "request_id": "r3",
            "limit": "rpm",
            "retry_after_s": pytest.approx(20.5),
        }
    ]


def test_tokens_429_has_type_tokens() -> None:
    limiter = RateLimiter()
    limiter.check("k", KeyLimits(tpm=100), T0, 90)
    with pytest.raises(TokensRateLimited) as info:
        limiter.check("k", KeyLimits(tpm=100), T0 + 1, 20)
    assert info.value.envelope()["error"]["type"] == "tokens"  # type: ignore[index]
    assert "tokens per min (TPM): Limit 100, Used 90, Requested 20" in info.value.message
    assert dict(info.value.headers)[b"retry-after"] == b"60"


def test_keys_are_independent() -> None:
    limiter = RateLimiter()
    limiter.check("a", KeyLimits(rpm=1), T0)
    limiter.check("b", KeyLimits(rpm=1), T0)
    with pytest.raises(RateLimited):
        limiter.check("a", KeyLimits(rpm=1), T0)


def test_idle_keys_are_swept() -> None:
    limiter = RateLimiter()
    limiter.check("idle", KeyLimits(rpm=5), T0)
    limiter.check("busy", KeyLimits(rph=5), T0)
    limiter.check("busy", KeyLimits(rph=5), T0 + 30)
    assert set(limiter.keys) == {"idle", "busy"}
    limiter.check("other", KeyLimits(rpm=5), T0 + 200)
    assert set(limiter.keys) == {"busy", "other"}
    limiter.check("other", KeyLimits(rpm=5), T0 + 4000)
    assert set(limiter.keys) == {"other"}


def test_a_long_stream_keeps_its_extra_charge_past_a_sweep() -> None:
    limiter = RateLimiter()
    reservation, _ = limiter.check("k", KeyLimits(tpm=1000), T0, 10)
    limiter.check("x", KeyLimits(rpm=1), T0 + 300)  # sweeps "k"
    assert "k" not in limiter.keys
    limiter.reconcile(reservation, 990, T0 + 301)
    with pytest.raises(TokensRateLimited):
        limiter.check("k", KeyLimits(tpm=1000), T0 + 302, 100)


def test_limits_from_config() -> None:
    key = AuthKeyConfig(key_env="K", rpm=1, rph=2, tpm=3)
    assert KeyLimits.from_config(key) == KeyLimits(1, 2, 3)
    assert KeyLimits.from_config(AuthKeyConfig(key_env="K")).unlimited


# --- estimates -----------------------------------------------------------------------------------


def test_estimate_counts_prompt_characters_and_the_output_budget() -> None:
    body = {"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 50}
    assert estimate_tokens(body, 256) == math.ceil((40 + 4) / 4) + 50
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 8}]}]}
    assert estimate_tokens(parts, 100) == math.ceil((4 + 4 + 8) / 4) + 100
    assert estimate_tokens({"prompt": "z" * 10, "max_completion_tokens": 5}, 9) == 3 + 5
    assert estimate_tokens({"input": [1, 2, 3]}, 0) == 3


def test_usage_tokens_from_a_body_without_parsing_it() -> None:
    body = b'{"id":"x","usage":{"prompt_tokens":9,"completion_tokens":12,"total_tokens": 21}}'
    assert usage_tokens(body) == 21
    assert usage_tokens(b'{"choices":[]}') is None
    assert usage_tokens(b'{"total_tokens":null}') is None


# --- properties ----------------------------------------------------------------------------------


gaps = st.lists(
    st.one_of(st.floats(0, 2), st.floats(0, 90), st.sampled_from([0.0, 1.0, 60.0])),
    min_size=1,
    max_size=300,
)


def admitted_times(limits: KeyLimits, steps: list[float]) -> list[float]:
    state, now, times = KeyState(), T0, []
    for gap in steps:
        now += gap
        if isinstance(reserve(state, limits, now), Reservation):
            times.append(now)
    return times


def most_in_any_window(times: list[float], span: float) -> int:
    # The busiest closed interval of length ``span`` starts at some admitted time.
    return max((sum(1 for u in times if t <= u <= t + span) for t in times), default=0)


@given(limit=st.integers(1, 20), steps=gaps)
@settings(derandomize=True, max_examples=300)
def test_never_more_than_rpm_in_any_minute(limit: int, steps: list[float]) -> None:
    times = admitted_times(KeyLimits(rpm=limit), steps)
    assert most_in_any_window(times, 60.0) <= limit


@given(limit=st.integers(1, 20), steps=st.lists(st.floats(0, 900), min_size=1, max_size=200))
@settings(derandomize=True, max_examples=200)
def test_never_more_than_rph_in_any_hour(limit: int, steps: list[float]) -> None:
    times = admitted_times(KeyLimits(rph=limit), steps)
    assert most_in_any_window(times, 3600.0) <= limit


@given(limit=st.integers(1, 20), steps=gaps)
@settings(derandomize=True, max_examples=200)
def test_retry_after_is_exact(limit: int, steps: list[float]) -> None:
    """A denied request fits at ``now + retry_after`` and not a millisecond before."""
    state, limits, now = KeyState(), KeyLimits(rpm=limit), T0
    for gap in steps:
        now += gap
        result = reserve(state, limits, now)
        if isinstance(result, Denied):
            wait = result.retry_after_s
            early, late = copy.deepcopy(state), copy.deepcopy(state)
            assert isinstance(reserve(late, limits, now + wait + 1e-6), Reservation)
            if wait > 0.002:
                assert isinstance(reserve(early, limits, now + wait - 0.002), Denied)


@given(
    limit=st.integers(100, 5000),
    ops=st.lists(
        st.tuples(st.floats(0, 20), st.integers(1, 2000), st.floats(0, 1), st.floats(0, 120)),
        min_size=1,
        max_size=150,
    ),
)
@settings(derandomize=True, max_examples=200)
def test_tokens_used_never_exceed_tpm_in_any_minute(
    limit: int, ops: list[tuple[float, int, float, float]]
) -> None:
    """Reserve estimates; settle each with actual <= estimate some time later. The tokens
    really used, counted at admission time, never pass the limit in any minute."""
    state, limits, now = KeyState(), KeyLimits(tpm=limit), T0
    pending: list[tuple[float, Reservation, int]] = []
    used: list[tuple[float, int]] = []
    for gap, est, fraction, lasts in ops:
        now += gap
        for item in [p for p in pending if p[0] <= now]:
            pending.remove(item)
            reconcile(item[1], item[2], now)
        result = reserve(state, limits, now, est_tokens=est)
        if isinstance(result, Reservation):
            actual = int(est * fraction)
            pending.append((now + lasts, result, actual))
            used.append((now, actual))
    for start, _ in used:
        assert sum(n for t, n in used if start <= t <= start + 60.0) <= limit
