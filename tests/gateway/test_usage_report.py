"""The usage report's plan (which table answers which part of the range) and its adding up.

The central property: whatever the range, granularity and retentions, the plan read against
what the ledger still keeps (raw records after their horizon, rollup buckets after theirs)
sums exactly what all the records ever written sum to over the plan's covered range, bucket
by bucket; and the covered range is the one asked for while the raw records are kept.
Records are drawn on a millisecond grid (as ``time.time()`` gives them, and clear of the
sub-microsecond rounding of ``floor(at / 3600)``).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config.stores import LedgerConfig
from runestone_proxy.gateway.usage_report import (
    DAY_S,
    HOUR_S,
    Horizons,
    Plan,
    Segment,
    UsageQuery,
    combine,
    plan,
)

T0 = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC, on the hour
DAY0 = math.floor(T0 / DAY_S) * DAY_S  # 2027-01-15 00:00 UTC
FAR = Horizons(0.0, 0.0, 0.0)  # everything kept


def segments(p: Plan) -> list[tuple[str, float, float]]:
    return [(s.table, s.start, s.end) for s in p.segments]


# --- examples ---------------------------------------------------------------------------------


def test_a_range_inside_one_hour_is_read_from_raw_records() -> None:
    p = plan(UsageQuery(T0 + 60, T0 + 120), FAR)
    assert segments(p) == [("usage", T0 + 60, T0 + 120)]
    assert p.covered == (T0 + 60, T0 + 120)
    assert p.exact


def test_whole_days_hours_and_raw_edges() -> None:
    start, end = DAY0 + 5.5 * HOUR_S, DAY0 + 2 * DAY_S + 3.25 * HOUR_S
    p = plan(UsageQuery(start, end, granularity="total"), FAR)
    assert segments(p) == [
        ("usage", start, DAY0 + 6 * HOUR_S),
        ("usage_hourly", DAY0 + 6 * HOUR_S, DAY0 + DAY_S),
        ("usage_daily", DAY0 + DAY_S, DAY0 + 2 * DAY_S),
        ("usage_hourly", DAY0 + 2 * DAY_S, DAY0 + 2 * DAY_S + 3 * HOUR_S),
        ("usage", DAY0 + 2 * DAY_S + 3 * HOUR_S, end),
    ]
    assert p.exact


def test_granularity_hour_never_reads_the_daily_rollup() -> None:
    start, end = DAY0 + 0.5 * HOUR_S, DAY0 + 3 * DAY_S
    p = plan(UsageQuery(start, end, granularity="hour"), FAR)
    assert segments(p) == [
        ("usage", start, DAY0 + HOUR_S),
        ("usage_hourly", DAY0 + HOUR_S, end),
    ]


def test_beyond_raw_retention_the_edges_round_out_to_the_hour() -> None:
    now = T0
    config = LedgerConfig(retention_days=1, hourly_retention_days=10, daily_retention_days=20)
    h = Horizons.at(now, config)
    start, end = now - 3 * DAY_S + 90, now - 2 * DAY_S + 30 * 60
    p = plan(UsageQuery(start, end, granularity="hour"), h)
    assert p.covered == (now - 3 * DAY_S, now - 2 * DAY_S + HOUR_S)
    assert not p.exact
    assert {s.table for s in p.segments} == {"usage_hourly"}


def test_beyond_hourly_retention_the_edges_round_out_to_the_day() -> None:
    config = LedgerConfig(retention_days=1, hourly_retention_days=2, daily_retention_days=20)
    h = Horizons.at(T0, config)
    start, end = DAY0 - 5 * DAY_S + 90, DAY0 - 4 * DAY_S + 7 * HOUR_S
    p = plan(UsageQuery(start, end, granularity="day"), h)
    assert segments(p) == [("usage_daily", DAY0 - 5 * DAY_S, DAY0 - 3 * DAY_S)]
    # No hourly rows that old and hourly granularity: nothing to answer with.
    assert plan(UsageQuery(start, end, granularity="hour"), h) == Plan((), None, exact=False)


def test_where_nothing_is_kept_the_answer_starts_later() -> None:
    config = LedgerConfig(retention_days=1, hourly_retention_days=2, daily_retention_days=3)
    h = Horizons.at(T0, config)
    p = plan(UsageQuery(T0 - 10 * DAY_S, T0), h)
    assert p.covered is not None
    assert p.covered[0] == DAY0 - 2 * DAY_S  # the first daily bucket kept
    assert p.covered[1] == T0
    assert not p.exact


def test_a_bucket_or_record_on_its_horizon_is_gone() -> None:
    """The sweep deletes ``<=`` its cut-off: what sits exactly on a horizon is not read."""
    h = Horizons(raw=DAY0 + 30, hourly=DAY0 + HOUR_S, daily=DAY0)
    p = plan(UsageQuery(DAY0, DAY0 + 2 * DAY_S, granularity="day"), h)
    after_raw = math.nextafter(DAY0 + 30, math.inf)
    assert segments(p) == [
        ("usage", after_raw, DAY0 + 2 * HOUR_S),  # the hour on its horizon: raw records
        ("usage_hourly", DAY0 + 2 * HOUR_S, DAY0 + DAY_S),
        ("usage_daily", DAY0 + DAY_S, DAY0 + 2 * DAY_S),  # the day on its horizon: not read
    ]
    assert p.covered == (after_raw, DAY0 + 2 * DAY_S)


def test_a_partial_hour_is_read_as_its_hour_minus_the_rest() -> None:
    now = T0 + 10 * 60  # 08:10, the default range: the last 24 hours
    p = plan(UsageQuery(now - DAY_S, now), Horizons.at(now, LedgerConfig()))
    start = now - DAY_S
    assert segments(p) == [
        ("usage", start, T0 - DAY_S + HOUR_S),  # 50 minutes: read as the hour minus 10
        ("usage_hourly", T0 - DAY_S + HOUR_S, T0),
        ("usage", T0, now),  # the hour so far: read as the hour minus what is after now
    ]
    assert [(r.table, r.start, r.end, r.sign) for r in p.reads] == [
        ("usage_hourly", T0 - DAY_S, T0 - DAY_S + HOUR_S, 1),
        ("usage", T0 - DAY_S, start, -1),
        ("usage_hourly", T0 - DAY_S + HOUR_S, T0, 1),
        ("usage_hourly", T0, T0 + HOUR_S, 1),
        ("usage", now, T0 + HOUR_S, -1),
    ]
    # A range that ends ten minutes into a past hour reads those ten minutes as they are.
    p = plan(UsageQuery(T0 - 3 * HOUR_S, T0 + 600), Horizons.at(T0 + DAY_S, LedgerConfig()))
    assert p.reads[-1] == Segment("usage", T0, T0 + 600)


def test_combine_adds_rows_per_bucket_and_group_in_order() -> None:
    query = UsageQuery(T0, T0 + 2 * HOUR_S + 60, ("tenant",), "hour")
    p = plan(query, FAR)
    hourly, raw = p.segments

    def row(tenant: str, n: int, cost: float, **extra: Any) -> dict[str, Any]:
        return {
            "tenant": tenant,
            "requests": n,
            "errors": 0,
            "prompt_tokens": 10 * n,
            "completion_tokens": n,
            "cached_tokens": 0,
            "reasoning_tokens": 0,
            "cost_usd": cost,
            **extra,
        }

    parts = [
        (hourly, [row("b", 1, 0.1, bucket_start=T0), row("a", 2, 0.2, bucket_start=T0 + 3600)]),
        (raw, [row("a", 3, 0.3), row("z", 0, 0.0)]),
    ]
    report = combine(query, p, parts)
    assert [(r.bucket_start, r.group, r.sums.requests) for r in report.rows] == [
        (T0, ("b",), 1),
        (T0 + 3600, ("a",), 2),
        (T0 + 7200, ("a",), 3),
    ]
    assert report.totals.requests == 6
    assert report.totals.prompt_tokens == 60
    assert report.totals.cost_usd == pytest.approx(0.6, abs=1e-15)


# --- properties -------------------------------------------------------------------------------

Record = tuple[float, int]  # (at, tokens)
#: Up to 12 days: whole hours (spread evenly), plus milliseconds (on the hour a tenth of
#: the time).
hours_and_ms = st.tuples(
    st.integers(0, 12 * 24), st.one_of(st.just(0), st.integers(0, 3_599_999))
).map(lambda t: t[0] * HOUR_S + t[1] / 1000)


@st.composite
def cases(draw: st.DrawFn) -> tuple[UsageQuery, Horizons, list[Record]]:
    now = T0 + draw(hours_and_ms)
    retention = draw(
        st.tuples(st.integers(1, 6), st.integers(1, 8), st.integers(1, 10)).map(
            lambda t: LedgerConfig(
                retention_days=t[0], hourly_retention_days=t[1], daily_retention_days=t[2]
            )
        )
    )
    horizons = Horizons.at(now, retention)
    near = st.sampled_from([now, horizons.raw, horizons.hourly, horizons.daily])
    start = draw(
        st.one_of(  # anywhere, or within an hour of a retention horizon
            st.builds(lambda x: now - x, hours_and_ms),
            st.builds(
                lambda t, ms: max(0.0, t + ms / 1000), near, st.integers(-3_600_000, 3_600_000)
            ),
        )
    )
    end = start + max(draw(hours_and_ms), 0.001)
    granularity = draw(st.sampled_from(["hour", "day", "total"]))
    span = (math.floor((start - 2 * DAY_S) * 1000), math.ceil((end + 2 * DAY_S) * 1000))
    records = draw(
        st.lists(st.tuples(st.integers(*span).map(lambda ms: ms / 1000), st.integers(1, 9)))
    )
    # Records on the range's own edges and on bucket boundaries, where off-by-ones live.
    records += [
        (start, 1),
        (math.nextafter(end, -math.inf), 1),
        (math.floor(start / 3600) * 3600, 1),
    ]
    return UsageQuery(start, end, granularity=granularity), horizons, records


def bucket(t: float, size: float) -> float:
    return math.floor(t / size) * size


def kept_reader(records: list[Record], h: Horizons) -> Any:
    """What the ledger keeps after its sweeps, read as the SQL reads it: a segment's rows."""
    hourly: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    daily: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    for at, tokens in records:
        for table, size in ((hourly, HOUR_S), (daily, DAY_S)):
            sums = table[bucket(at, size)]
            sums[0] += 1
            sums[1] += tokens
    hourly = defaultdict(lambda: [0, 0], {b: s for b, s in hourly.items() if b > h.hourly})
    daily = defaultdict(lambda: [0, 0], {b: s for b, s in daily.items() if b > h.daily})
    raw = [(at, tokens) for at, tokens in records if at > h.raw]

    def rows(segment: Segment) -> list[dict[str, Any]]:
        def row(n: int, tokens: int, **extra: Any) -> dict[str, Any]:
            return {
                "requests": n,
                "errors": 0,
                "prompt_tokens": tokens,
                "completion_tokens": 0,
                "cached_tokens": 0,
                "reasoning_tokens": 0,
                "cost_usd": tokens / 1000,
                **extra,
            }

        if segment.table == "usage":
            inside = [t for at, t in raw if segment.start <= at < segment.end]
            return [row(len(inside), sum(inside))]
        table = hourly if segment.table == "usage_hourly" else daily
        return [
            row(s[0], s[1], bucket_start=b)
            for b, s in table.items()
            if segment.start <= b < segment.end
        ]

    return rows


@settings(max_examples=300, deadline=None)
@given(cases())
def test_the_plan_sums_every_record_in_its_covered_range(
    case: tuple[UsageQuery, Horizons, list[Record]],
) -> None:
    query, h, records = case
    p = plan(query, h)
    _check_shape(query, h, p)
    rows = kept_reader(records, h)
    report = combine(query, p, [(s, rows(s)) for s in p.reads])
    expected: dict[float | None, list[int]] = defaultdict(lambda: [0, 0])
    if p.covered is not None:
        for at, tokens in records:
            if p.covered[0] <= at < p.covered[1]:
                key = None if query.bucket_s is None else bucket(at, query.bucket_s)
                expected[key][0] += 1
                expected[key][1] += tokens
    got = {r.bucket_start: [r.sums.requests, r.sums.prompt_tokens] for r in report.rows}
    assert got == dict(expected)
    assert report.totals.requests == sum(v[0] for v in expected.values())
    assert report.totals.cost_usd == pytest.approx(sum(v[1] for v in expected.values()) / 1000)


def _check_shape(query: UsageQuery, h: Horizons, p: Plan) -> None:
    segs = p.segments
    assert len(segs) <= 5 + 2 * 24 * 12  # raw kept past the hourly rollup: raw per hour/day
    if h.raw >= h.hourly >= h.daily:  # the shipped shape: raw kept least, daily most
        assert len(segs) <= 7
        assert len(p.reads) <= 9
        # A raw read whose hour is kept whole reads at most half an hour (up to now).
        for r in p.reads:
            hour = bucket(r.start, HOUR_S)
            if r.table == "usage" and hour > h.hourly and hour > h.raw:
                assert min(r.end, h.now) - r.start <= 1800
    for r in p.reads:
        assert r.table == "usage" or r.sign == 1  # only raw records are taken away
        assert r.sign == 1 or r.start > h.raw
    for before, after in itertools.pairwise(segs):
        assert before.end == after.start  # contiguous: no hole, no overlap
    for s in segs:
        assert s.start < s.end
        if s.table == "usage":
            assert s.start > h.raw
            if query.bucket_s is not None:  # one bucket of the report
                assert bucket(s.start, query.bucket_s) == bucket(
                    math.nextafter(s.end, -math.inf), query.bucket_s
                )
        else:
            size, horizon = (HOUR_S, h.hourly) if s.table == "usage_hourly" else (DAY_S, h.daily)
            assert s.start % size == 0
            assert s.end % size == 0
            assert s.start > horizon
            assert not (s.table == "usage_daily" and query.granularity == "hour")
    if p.covered is None:
        assert not segs
        return
    first, last = p.covered
    assert (first, last) == (segs[0].start, segs[-1].end)
    assert p.exact == ((first, last) == (query.start, query.end))
    if query.start > h.raw:  # raw records kept from the start on: exact
        assert p.exact
    assert query.end <= last < query.end + DAY_S  # rounded out by at most a bucket
    assert first < query.end
    if first > query.start:  # nothing kept just before the covered range
        t = math.nextafter(first, -math.inf)
        assert t <= h.raw
        assert bucket(t, HOUR_S) <= h.hourly
        assert query.granularity == "hour" or bucket(t, DAY_S) <= h.daily
    else:
        assert query.start - first < DAY_S
