"""The one retry backoff (gateway/backoff.py), with plain numbers: full jitter under an
exponential ceiling, as failover (provider retries) and overflow (jobs, webhooks) use it."""

from __future__ import annotations

import random

import pytest

from runestone_proxy.gateway.backoff import backoff_s


def top() -> float:
    """Full jitter at its top: the backoff is exactly its ceiling."""
    return 1.0


def test_backoff_is_full_jitter_under_an_exponential_ceiling() -> None:
    rng = random.Random(1234)
    for attempt in range(1, 12):
        ceiling = min(60.0, 1.0 * 2 ** (attempt - 1))
        delays = [backoff_s(attempt, 1.0, 60.0, rng.random) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > 0.8 * ceiling  # the whole range is used: full jitter
    assert backoff_s(3, 1.0, 60.0, top) == 4.0
    assert backoff_s(10_000, 1.0, 60.0, top) == 60.0  # no overflow


def test_backoff_is_full_jitter_capped() -> None:
    rng = random.Random(7)
    delays = [backoff_s(failed, 0.1, 1.0, rng.random) for failed in range(1, 13) for _ in range(50)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert max(delays) > 0.9  # the cap is reached, the floor is zero
    assert backoff_s(4, 0.1, 1.0, top) == pytest.approx(0.8)
    assert backoff_s(10, 0.1, 1.0, top) == 1.0


def test_backoff_floor_is_zero_and_the_first_ceiling_is_base() -> None:
    assert backoff_s(1, 0.25, 10.0, lambda: 0.0) == 0.0
    assert backoff_s(1, 0.25, 10.0, top) == 0.25
    assert backoff_s(0, 0.25, 10.0, top) == 0.25  # "no failure yet" is treated as the first


def test_backoff_is_reproducible_with_a_seed() -> None:
    first = [backoff_s(a, 0.5, 30.0, random.Random(7).random) for a in range(1, 6)]
    again = [backoff_s(a, 0.5, 30.0, random.Random(7).random) for a in range(1, 6)]
    assert first == again
