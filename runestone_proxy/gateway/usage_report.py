"""Usage reports over the ledger: the question (:class:`UsageQuery`), the plan that answers
it from the ledger's three tables (:func:`plan`), and how the parts add up
(:func:`combine`). Pure: the SQL that runs a plan is ``server/usage_report_sql.py``; the
parameters are read by :mod:`.usage_params`; ``GET /admin/usage`` and ``runestone-proxy
usage`` show the result.

How a report is planned
-----------------------
The ledger keeps raw records (``usage``, ``retention_days``) and two rollups,
``usage_hourly`` and ``usage_daily``, that equal the raw rows' sums bucket for bucket (they
are written in the raw insert's transaction). A range ``[start, end)`` is cut from left to
right into segments, each the coarsest piece that fits there:

1. whole UTC days from the daily rollup (never for ``granularity=hour``: a day row has no
   hours);
2. whole hours from the hourly rollup;
3. the partial hours at the edges from the raw records (a raw segment never crosses a
   boundary of the report's buckets, so its rows belong to one bucket).

So while the raw records are kept, the answer is exactly what the raw records in
``[start, end)`` sum to. What is read (:attr:`Plan.reads`) is cheaper still: a partial
hour is read as its whole hourly row *minus* the raw records of the rest of that hour
when the rest is shorter (the rollup equals its records, so the difference is exact). The
last hour of a report that ends now is then one rollup row minus nothing, and no edge
reads more than half an hour of raw records (reading raw records is what a report's time
goes on: about 4 us a record, 180,000 for half an hour at 100 requests a second).

Beyond a table's retention its data is gone, and the plan says so rather than guess: where
the raw records of an edge are swept, the edge is rounded *outward* to the enclosing hour
(hourly rollup), or day (daily rollup) once the hour is swept too; where nothing is kept
the answer starts later. :attr:`Plan.covered` is the range the answer sums and
:attr:`Plan.exact` whether it is the range asked for. Every table keeps a suffix of time
(older data goes first), so the covered range has no holes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal, Protocol

import attrs

from runestone_proxy.config.stores import LedgerConfig

__all__ = [
    "DAY_S",
    "HOUR_S",
    "SUMS",
    "Granularity",
    "Horizons",
    "Plan",
    "Segment",
    "Sums",
    "UsageQuery",
    "UsageReport",
    "UsageReports",
    "UsageRow",
    "combine",
    "plan",
]

HOUR_S = 3600.0
DAY_S = 86400.0

Granularity = Literal["hour", "day", "total"]
Table = Literal["usage", "usage_hourly", "usage_daily"]

#: The columns a report may group by and filter on (``key_id``: the key's id, never a key).
GROUP_COLUMNS = ("tenant", "key_id", "model", "provider")
#: What every row sums: requests, errors (outcome ``error``), the four token counts, USD.
SUMS = (
    "requests",
    "errors",
    "prompt_tokens",
    "completion_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "cost_usd",
)


@attrs.frozen
class UsageQuery:
    """Usage in ``[start, end)`` (unix seconds), per ``granularity`` bucket and per
    ``group_by`` columns (in that order), of the records matching every ``filters``
    ``(column, value)`` pair."""

    start: float
    end: float
    group_by: tuple[str, ...] = ()
    granularity: Granularity = "total"
    filters: tuple[tuple[str, str], ...] = ()

    @property
    def bucket_s(self) -> float | None:
        return {"hour": HOUR_S, "day": DAY_S, "total": None}[self.granularity]

    def one_bucket(self, start: float, end: float) -> bool:
        """``[start, end)`` lies in one bucket of the report (all of it, for ``total``):
        its rows need no ``bucket_start`` of their own."""
        size = self.bucket_s
        return size is None or _floor(start, size) == _floor(math.nextafter(end, -math.inf), size)


@attrs.frozen
class Horizons:
    """What each table still holds: raw records later than ``raw``, rollup buckets
    starting later than ``hourly`` / ``daily`` (the retention sweep deletes ``<=`` its
    cut-off, taken at a time no later than ``now``)."""

    raw: float
    hourly: float
    daily: float
    #: No record is later than this (what a raw read costs is what it holds up to now).
    now: float = math.inf

    @classmethod
    def at(cls, now: float, config: LedgerConfig) -> Horizons:
        return cls(
            now - config.retention_days * DAY_S,
            now - config.hourly_retention_days * DAY_S,
            now - config.daily_retention_days * DAY_S,
            now,
        )


@attrs.frozen
class Segment:
    """Read ``table`` over ``[start, end)`` (raw records by ``at``, rollups by
    ``bucket_start``), and add what it holds (``sign`` 1) or take it away (-1)."""

    table: Table
    start: float
    end: float
    sign: int = 1


@attrs.frozen
class Plan:
    #: The covered range cut into contiguous pieces, each from one table.
    segments: tuple[Segment, ...]
    #: The range the segments sum, or None when nothing in the range is kept.
    covered: tuple[float, float] | None
    #: The covered range is the one asked for.
    exact: bool
    #: What is read to sum the segments (a partial hour may be its hour minus the rest).
    reads: tuple[Segment, ...] = ()


def _floor(t: float, size: float) -> float:
    """The bucket of ``t``, as the ledger's rollups compute it (``store_ledger_sql``)."""
    return math.floor(t / size) * size


def _next(t: float, size: float) -> float:
    """The first boundary of ``size`` after ``t`` (strictly)."""
    return _floor(t, size) + size


def plan(query: UsageQuery, horizons: Horizons) -> Plan:
    """The segments that answer ``query`` (see the module docstring)."""
    t, end = query.start, query.end
    segments: list[Segment] = []
    while t < end:
        segment = _step(t, end, query.granularity, horizons)
        if segment is None:
            t = _skip(t, query.granularity, horizons)
            continue
        last = segments[-1] if segments else None
        if (
            last
            and last.table == segment.table != "usage"
            and last.end == segment.start
            # Days summed from hours: one read per day, summed in SQL.
            and not (segment.table == "usage_hourly" and query.granularity == "day")
        ):
            segments[-1] = Segment(segment.table, last.start, segment.end)
        else:
            segments.append(segment)
        t = segment.end
    if not segments:
        return Plan((), None, exact=False)
    covered = (segments[0].start, segments[-1].end)
    exact = covered == (query.start, query.end)
    return Plan(tuple(segments), covered, exact, _reads(segments, horizons))


def _step(t: float, end: float, granularity: Granularity, h: Horizons) -> Segment | None:
    """The coarsest kept piece starting at ``t`` (or, beyond the raw records' retention,
    the kept bucket holding ``t``); None if nothing holds ``t``."""
    days = granularity != "hour"
    if days and t % DAY_S == 0 and t > h.daily and t + DAY_S <= end:
        return Segment("usage_daily", t, t + _floor(end - t, DAY_S))
    if t % HOUR_S == 0 and t > h.hourly and t + HOUR_S <= end:
        stop = _floor(end, HOUR_S)
        if days:  # give way to the daily rollup at the next day boundary
            stop = min(stop, _next(t, DAY_S))
        return Segment("usage_hourly", t, stop)
    if t > h.raw:
        stop = _next(t, HOUR_S)
        if stop <= h.hourly and granularity != "hour":
            # No hourly rollup to take over (raw kept longer than it): stay on raw
            # records up to where it starts, within one report bucket.
            stop = max(stop, _next(h.hourly, HOUR_S))
            if granularity == "day":
                stop = min(stop, _next(t, DAY_S))
        return Segment("usage", t, min(stop, end))
    if _floor(t, HOUR_S) > h.hourly:
        return Segment("usage_hourly", _floor(t, HOUR_S), _next(t, HOUR_S))
    if days and _floor(t, DAY_S) > h.daily:
        return Segment("usage_daily", _floor(t, DAY_S), _next(t, DAY_S))
    return None


def _skip(t: float, granularity: Granularity, h: Horizons) -> float:
    """Where something is kept again after ``t`` (nothing holds ``t``)."""
    later = [math.nextafter(h.raw, math.inf), _next(h.hourly, HOUR_S)]
    if granularity != "hour":
        later.append(_next(h.daily, DAY_S))
    return min(x for x in later if x > t)


def _reads(segments: list[Segment], h: Horizons) -> tuple[Segment, ...]:
    """The segments as read: a raw piece inside one hour becomes that hour's rollup row
    minus the raw records of the rest of the hour, when the rest holds less time (up to
    ``now``) and both are kept."""
    reads: list[Segment] = []
    for s in segments:
        hour = _floor(s.start, HOUR_S)
        end = hour + HOUR_S
        if s.table == "usage" and s.end <= end and hour > h.hourly and hour > h.raw:
            inside = min(s.end, h.now) - s.start
            outside = (s.start - hour) + max(0.0, min(end, h.now) - s.end)
            if outside < inside:
                reads.append(Segment("usage_hourly", hour, end))
                if s.start > hour:
                    reads.append(Segment("usage", hour, s.start, -1))
                if s.end < end:
                    reads.append(Segment("usage", s.end, end, -1))
                continue
        reads.append(s)
    return tuple(reads)


# --- adding up -------------------------------------------------------------------------------


@attrs.frozen
class Sums:
    requests: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0

    def as_dict(self) -> dict[str, int | float]:
        return {name: getattr(self, name) for name in SUMS}


@attrs.frozen
class UsageRow:
    #: The hour or day (UTC, unix seconds); None for ``granularity=total``.
    bucket_start: float | None
    #: The values of the query's ``group_by`` columns, in its order.
    group: tuple[str, ...]
    sums: Sums


@attrs.frozen
class UsageReport:
    query: UsageQuery
    plan: Plan
    rows: tuple[UsageRow, ...]
    totals: Sums


class UsageReports(Protocol):
    """Who answers a report (the durable store, which flushes its buffered records
    first, so a report right after a request sees it)."""

    async def usage_report(self, query: UsageQuery) -> UsageReport: ...


class _Acc:
    """One row's running sums (costs kept apart for one exact ``fsum``)."""

    __slots__ = ("costs", "counts")

    def __init__(self) -> None:
        self.counts = [0] * (len(SUMS) - 1)
        self.costs: list[float] = []

    def add(self, row: Mapping[str, Any], sign: int) -> None:
        for i, name in enumerate(SUMS[:-1]):
            self.counts[i] += sign * int(row[name] or 0)
        self.costs.append(sign * float(row["cost_usd"] or 0.0))

    def merge(self, other: _Acc) -> None:
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.costs.extend(other.costs)

    def sums(self) -> Sums:
        c = self.counts
        return Sums(c[0], c[1], c[2], c[3], c[4], c[5], math.fsum(self.costs))


def combine(
    query: UsageQuery,
    report_plan: Plan,
    parts: Iterable[tuple[Segment, Iterable[Mapping[str, Any]]]],
) -> UsageReport:
    """Add up the rows of each of the plan's reads (dicts with the ``group_by`` columns,
    the :data:`SUMS`, and ``bucket_start`` where the read spans more than one bucket of the
    report: :meth:`UsageQuery.one_bucket`) into the report's rows, ordered by bucket then
    group, and its totals. A row left with no request (all taken away again) is dropped."""
    size = query.bucket_s
    rows: dict[tuple[float | None, tuple[str, ...]], _Acc] = {}
    for segment, segment_rows in parts:
        for row in segment_rows:
            bucket = None
            if size is not None:
                bucket = _floor(float(row.get("bucket_start", segment.start)), size)
            key = (bucket, tuple(str(row[c]) for c in query.group_by))
            acc = rows.get(key)
            if acc is None:
                acc = rows[key] = _Acc()
            acc.add(row, segment.sign)
    total = _Acc()
    ordered = []
    for (bucket, group), acc in sorted(rows.items(), key=lambda kv: (kv[0][0] or 0.0, kv[0][1])):
        if not acc.counts[0]:
            continue
        total.merge(acc)
        ordered.append(UsageRow(bucket, group, acc.sums()))
    return UsageReport(query, report_plan, tuple(ordered), total.sums())
