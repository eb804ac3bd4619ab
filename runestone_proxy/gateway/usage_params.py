"""A usage report's parameters, read strictly: ``GET /admin/usage``'s query string and the
``runestone-proxy usage`` options become one :class:`~.usage_report.UsageQuery`, and every bad
value is an :class:`~runestone_proxy.errors.InvalidParam` (400) that names its parameter.

* Instants: RFC 3339 (``2027-01-15T08:00:00Z``, an offset, fractions; a bare date is that
  day's UTC midnight) or unix seconds. The command line also takes a duration ago
  (``24h``, ``7d``, ``1h30m``; units s, m, h, d, w).
* ``group_by``: a comma list of ``tenant``, ``key`` (the key's id), ``model``,
  ``provider``, each at most once, kept in the given order.
* ``granularity``: ``hour``, ``day`` or ``total`` (the default); at most
  :data:`MAX_BUCKETS` hours or days in one report.
* Filters: ``tenant``, ``key``, ``model``, ``provider`` (exact values).
* Unknown parameters are refused, not ignored: a typo (``groupby``) must not quietly give
  another report than the one asked for.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import cast

from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.usage_report import DAY_S, Granularity, UsageQuery

__all__ = [
    "DEFAULT_RANGE_S",
    "GROUPS",
    "MAX_BUCKETS",
    "iso",
    "make_query",
    "parse_group_by",
    "parse_instant",
    "query_from_params",
]

#: The range when none is given: the last 24 hours.
DEFAULT_RANGE_S = DAY_S
#: Most hour or day buckets in one report (10,000 hours is about 14 months).
MAX_BUCKETS = 10_000
#: The latest instant accepted: 9999-12-31T23:59:59Z.
MAX_TIME = 253_402_300_799.0
#: Public name -> ledger column, for ``group_by`` and the filters.
GROUPS = {"tenant": "tenant", "key": "key_id", "model": "model", "provider": "provider"}
GRANULARITIES = ("hour", "day", "total")

_RFC3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}(?:[Tt ]\d{2}:\d{2}:\d{2}(?:\.\d{1,9})?(?:[Zz]|[+-]\d{2}:\d{2}))?"
)
_UNIX = re.compile(r"\d{1,12}(?:\.\d{1,9})?")
_DURATION = re.compile(r"(?:\d{1,9}(?:\.\d{1,6})?[smhdw])+")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": DAY_S, "w": 7 * DAY_S}


def parse_instant(text: str, param: str, *, now: float | None = None) -> float:
    """``text`` as unix seconds: RFC 3339 or unix seconds, or (given ``now``) a duration
    before ``now``."""
    text = text.strip()
    value: float | None = None
    if _UNIX.fullmatch(text):
        value = float(text)
    elif _RFC3339.fullmatch(text):
        value = _rfc3339(text)
    elif now is not None and _DURATION.fullmatch(text):
        value = now - _duration_s(text)
    if value is None or not 0 <= value <= MAX_TIME:
        ago = " or a duration ago (24h, 7d, 1h30m)" if now is not None else ""
        raise InvalidParam(
            f"{param}: expected an RFC 3339 time (2027-01-15T08:00:00Z) or unix seconds{ago}"
            f" from 1970 to 9999, got {text[:64]!r}.",
            param=param,
        )
    return value


def _rfc3339(text: str) -> float | None:
    if len(text) == 10:  # a full-date: that day's UTC midnight
        text += "T00:00:00Z"
    text = text.upper().replace(" ", "T")
    if "." in text:  # fromisoformat takes at most microseconds
        head, _, rest = text.partition(".")
        digits = re.match(r"\d+", rest)
        assert digits is not None
        text = f"{head}.{digits.group()[:6].ljust(6, '0')}{rest[digits.end() :]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except (ValueError, OverflowError):  # 2027-02-30, hour 25, ...
        return None


def _duration_s(text: str) -> float:
    return sum(float(n) * _UNIT_S[u] for n, u in re.findall(r"([\d.]+)([smhdw])", text))


def parse_group_by(text: str, param: str = "group_by") -> tuple[str, ...]:
    """``tenant,key,model`` -> the ledger columns, in the given order."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in GROUPS]
    if unknown:
        raise InvalidParam(
            f"{param}: cannot group usage by {unknown[0][:64]!r}; use any of {', '.join(GROUPS)}.",
            param=param,
        )
    if len(set(names)) < len(names):
        raise InvalidParam(f"{param}: a column is named twice: {text[:100]!r}.", param=param)
    return tuple(GROUPS[name] for name in names)


def parse_granularity(text: str, param: str = "granularity") -> Granularity:
    if text not in GRANULARITIES:
        raise InvalidParam(
            f"{param}: expected one of {', '.join(GRANULARITIES)}, got {text[:32]!r}.",
            param=param,
        )
    return cast(Granularity, text)


def make_query(
    *,
    start: float,
    end: float,
    group_by: tuple[str, ...] = (),
    granularity: Granularity = "total",
    filters: tuple[tuple[str, str], ...] = (),
    params: tuple[str, str, str] = ("from", "to", "granularity"),
) -> UsageQuery:
    """The query, once its range is checked: ``start`` before ``end``, and at most
    :data:`MAX_BUCKETS` buckets (``params`` names the start, end and granularity
    parameters in the messages)."""
    if start >= end:
        raise InvalidParam(
            f"{params[0]}: the range is empty: {iso(start)} is not before {iso(end)}.",
            param=params[0],
        )
    size = {"hour": 3600.0, "day": DAY_S}.get(granularity)
    if size is not None:
        buckets = math.ceil(end / size) - math.floor(start / size)
        if buckets > MAX_BUCKETS:
            raise InvalidParam(
                f"{params[2]}: {buckets} {granularity}s in the range; at most {MAX_BUCKETS}"
                " per report (a coarser granularity or a shorter range).",
                param=params[2],
            )
    return UsageQuery(start, end, group_by, granularity, filters)


def query_from_params(params: Mapping[str, Sequence[str]], now: float) -> UsageQuery:
    """``GET /admin/usage``'s query (``parse_qs`` output, ``format`` already taken)."""
    unknown = sorted(set(params) - {"from", "to", "group_by", "granularity", *GROUPS})
    if unknown:
        raise InvalidParam(
            f"{unknown[0][:64]}: unknown parameter; use from, to, group_by, granularity,"
            f" format, or a filter ({', '.join(GROUPS)}).",
            param=unknown[0][:64],
        )
    one = {name: _one(params, name) for name in params if name != "group_by"}
    end = parse_instant(one["to"], "to") if "to" in one else now
    start = parse_instant(one["from"], "from") if "from" in one else end - DEFAULT_RANGE_S
    group_by = parse_group_by(",".join(params.get("group_by", ())))
    granularity = parse_granularity(one.get("granularity", "total"))
    filters = tuple((GROUPS[name], one[name]) for name in GROUPS if name in one)
    return make_query(
        start=start, end=end, group_by=group_by, granularity=granularity, filters=filters
    )


def _one(params: Mapping[str, Sequence[str]], name: str) -> str:
    values = params[name]
    if len(values) != 1:
        raise InvalidParam(f"{name}: given {len(values)} times; give it once.", param=name)
    return values[0]


def iso(t: float) -> str:
    """``t`` in RFC 3339, UTC (``Z``), with microseconds only when it has a fraction."""
    moment = datetime.fromtimestamp(t, UTC)
    spec = "microseconds" if moment.microsecond else "seconds"
    return moment.isoformat(timespec=spec).replace("+00:00", "Z")
