"""The request-body bounds as a pure decision: per read, and a minimum rate after a grace."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.protocol.slowclient import BodyPace

PACE = BodyPace(read_timeout_s=10, grace_s=20, min_bytes_per_s=500)


def test_a_fresh_body_gets_the_per_read_timeout() -> None:
    assert PACE.deadline(now=100, started=100, received=0) == 110


def test_after_the_grace_period_the_rate_bounds_the_read() -> None:
    # 15 s in with 1,000 bytes: credit until 100 + 20 + 2 = 122, earlier than 115 + 10.
    assert PACE.deadline(now=115, started=100, received=1000) == 122
    assert PACE.too_slow(now=122, started=100, received=1000)
    assert not PACE.too_slow(now=121.9, started=100, received=1000)


def test_bytes_received_extend_the_credit_however_large_the_body() -> None:
    # 8 MiB at 1 MB/s is far above the rate: only the per-read timeout applies.
    assert PACE.deadline(now=108, started=100, received=8_000_000) == 118


def test_a_stalled_body_is_not_too_slow_only_stalled() -> None:
    assert not PACE.too_slow(now=110, started=100, received=0)


@given(
    started=st.floats(0, 1e6),
    elapsed=st.floats(0, 1e5),
    received=st.integers(0, 1 << 24),
    more=st.integers(0, 1 << 24),
)
def test_the_deadline_never_passes_a_bound_and_grows_with_data(
    started: float, elapsed: float, received: int, more: int
) -> None:
    now = started + elapsed
    due = PACE.deadline(now, started, received)
    assert due <= now + PACE.read_timeout_s
    assert due <= started + PACE.grace_s + received / PACE.min_bytes_per_s
    assert PACE.deadline(now, started, received + more) >= due
    # A read that timed out at its deadline was too slow exactly when the rate set it.
    rate_bound = started + PACE.grace_s + received / PACE.min_bytes_per_s
    assert PACE.too_slow(due, started, received) == (due >= rate_bound)
