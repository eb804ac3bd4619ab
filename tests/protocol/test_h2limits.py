"""FrameGuard: HTTP/2 flood accounting over frame headers, fed bytes cut anywhere. No I/O."""

from __future__ import annotations

import itertools

from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
    WindowUpdateFrame,
)
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.protocol.h2limits import (
    ENHANCE_YOUR_CALM,
    PREFACE,
    PROTOCOL_ERROR,
    FrameGuard,
    RollingCounter,
    Violation,
)

START = PREFACE + SettingsFrame(0).serialize()


def guard(**overrides: int) -> FrameGuard:
    limits = {
        "max_resets_per_s": 10,
        "max_control_frames_per_s": 10,
        "max_continuation_frames": 4,
        "max_header_list_bytes": 1000,
    }
    return FrameGuard.from_limits(**{**limits, **overrides})


def feed_all(g: FrameGuard, data: bytes, cuts: list[int] | None = None, now: float = 0.0):
    """Feed ``data`` split at ``cuts``; the first violation, or None."""
    bounds = [0, *sorted(set(cuts or [])), len(data)]
    for start, end in itertools.pairwise(bounds):
        found = g.feed(data[start:end], now)
        if found is not None:
            return found
    return None


def continuations(count: int, size: int = 1) -> bytes:
    frames = [HeadersFrame(1, data=b"\x82" * size)]
    frames += [ContinuationFrame(1, data=b"\x84" * size) for _ in range(count)]
    frames[-1].flags.add("END_HEADERS")
    return b"".join(frame.serialize() for frame in frames)


def test_normal_traffic_passes() -> None:
    data = START + b"".join(
        frame.serialize()
        for frame in [
            HeadersFrame(1, data=b"\x82" * 50, flags=["END_HEADERS"]),
            DataFrame(1, data=b"x" * 16384),
            DataFrame(1, data=b"", flags=["END_STREAM"]),
            WindowUpdateFrame(0, window_increment=100),
        ]
    )
    assert feed_all(guard(), data) is None


@given(st.lists(st.integers(min_value=1, max_value=200), max_size=20))
def test_cuts_anywhere_do_not_change_the_verdict(cuts: list[int]) -> None:
    data = START + continuations(5) + DataFrame(3, data=b"y" * 100).serialize()
    assert feed_all(guard(), data) == feed_all(guard(), data, cuts)
    assert feed_all(guard(), data, cuts) == Violation(ENHANCE_YOUR_CALM, "CONTINUATION flood")


def test_continuations_up_to_the_limit_pass() -> None:
    assert feed_all(guard(), START + continuations(4)) is None


def test_header_block_over_the_byte_limit() -> None:
    found = feed_all(guard(), START + continuations(3, size=300))
    assert found == Violation(ENHANCE_YOUR_CALM, "header block too large")
    single = HeadersFrame(1, data=b"\x82" * 1001, flags=["END_HEADERS"]).serialize()
    assert feed_all(guard(), START + single) == Violation(
        ENHANCE_YOUR_CALM, "header block too large"
    )


def test_frame_inside_a_header_block_is_a_protocol_error() -> None:
    data = START + HeadersFrame(1, data=b"\x82").serialize() + PingFrame(0).serialize()
    assert feed_all(guard(), data) == Violation(
        PROTOCOL_ERROR, "frame interleaved in a header block"
    )


def test_preface_must_be_followed_by_settings() -> None:
    assert feed_all(guard(), PREFACE + PingFrame(0).serialize()) == Violation(
        PROTOCOL_ERROR, "connection preface without SETTINGS"
    )
    ack = SettingsFrame(0, flags=["ACK"]).serialize()
    assert feed_all(guard(), PREFACE + ack) is not None


def test_resets_per_rolling_second() -> None:
    g = guard()
    assert g.feed(START, 0.0) is None
    resets = b"".join(RstStreamFrame(n * 2 + 1).serialize() for n in range(10))
    assert g.feed(resets, 0.0) is None
    assert g.feed(RstStreamFrame(99).serialize(), 0.5) == Violation(
        ENHANCE_YOUR_CALM, "rapid reset"
    )
    g = guard()
    assert g.feed(START + resets, 0.0) is None
    assert g.feed(resets, 1.0) is None  # the first ten left the window


def test_refusals_count_as_resets() -> None:
    g = guard(max_resets_per_s=2)
    assert g.note_reset(0.0) is None
    assert g.note_reset(0.1) is None
    assert g.note_reset(0.2) is not None


def test_control_frames_and_empty_data_count() -> None:
    # The opening SETTINGS counts too: 1 + 9 = 10 is still within the limit.
    pings = b"".join(PingFrame(0).serialize() for _ in range(9))
    g = guard()
    assert g.feed(START + pings, 0.0) is None
    assert g.feed(DataFrame(1).serialize(), 0.0) == Violation(
        ENHANCE_YOUR_CALM, "control frame flood"
    )
    g = guard()
    assert g.feed(START + pings, 0.0) is None
    assert g.feed(DataFrame(1, flags=["END_STREAM"]).serialize(), 0.0) is None


def test_rolling_counter() -> None:
    counter = RollingCounter(2)
    assert not counter.hit(0.0)
    assert not counter.hit(0.5)
    assert counter.hit(0.9)
    assert not RollingCounter(2).hit(5.0)
    counter = RollingCounter(2)
    for now in (0.0, 0.5, 1.0, 1.5, 2.0):  # at most two in any second
        assert not counter.hit(now)
