"""Reading a usage report's parameters: instants in every accepted form, group_by, the
granularity, filters, and a 400 naming the parameter for every bad value."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.usage_params import (
    MAX_BUCKETS,
    iso,
    parse_group_by,
    parse_instant,
    query_from_params,
)
from runestone_proxy.gateway.usage_report import UsageQuery

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1800000000", T0),
        ("1800000000.25", T0 + 0.25),
        ("2027-01-15T08:00:00Z", T0),
        ("2027-01-15t08:00:00z", T0),
        ("2027-01-15 08:00:00Z", T0),
        ("2027-01-15T10:00:00+02:00", T0),
        ("2027-01-15T08:00:00.5Z", T0 + 0.5),
        ("2027-01-15T08:00:00.123456789Z", T0 + 0.123456),
        ("2027-01-15", T0 - 8 * 3600),
    ],
)
def test_instants(text: str, expected: float) -> None:
    assert parse_instant(text, "from") == pytest.approx(expected, abs=1e-6)


def test_a_duration_ago_only_where_a_now_is_given() -> None:
    assert parse_instant("24h", "--since", now=T0) == T0 - 86400
    assert parse_instant("1h30m", "--since", now=T0) == T0 - 5400
    assert parse_instant("2w", "--since", now=T0) == T0 - 14 * 86400
    with pytest.raises(InvalidParam) as raised:
        parse_instant("24h", "from")
    assert raised.value.param == "from"


@pytest.mark.parametrize(
    "text",
    [
        "",
        "yesterday",
        "2027-01-15T08:00:00",  # no offset: RFC 3339 requires one
        "2027-02-30T00:00:00Z",
        "2027-01-15T25:00:00Z",
        "-5",
        "1e9",
        "nan",
        "99999999999999",
        "10000-01-01",
    ],
)
def test_bad_instants_name_their_parameter(text: str) -> None:
    with pytest.raises(InvalidParam) as raised:
        parse_instant(text, "to")
    assert raised.value.param == "to"
    assert raised.value.status == 400


@given(st.floats(min_value=0, max_value=253_402_300_799, allow_nan=False))
def test_iso_reads_back(t: float) -> None:
    t = round(t, 6)
    assert parse_instant(iso(t), "from") == pytest.approx(t, abs=2e-6)
    assert iso(t).endswith("Z")


def test_group_by_keeps_its_order_and_names_columns() -> None:
    assert parse_group_by("model, key,tenant") == ("model", "key_id", "tenant")
    assert parse_group_by("") == ()
    for bad in ("team", "tenant,tenant", "key_id"):
        with pytest.raises(InvalidParam) as raised:
            parse_group_by(bad)
        assert raised.value.param == "group_by"


def test_query_defaults_to_the_last_day_in_total() -> None:
    assert query_from_params({}, T0) == UsageQuery(T0 - 86400, T0)


def test_query_from_every_parameter() -> None:
    query = query_from_params(
        {
            "from": ["2027-01-14T00:00:00Z"],
            "to": ["1800000000"],
            "group_by": ["tenant", "model"],
            "granularity": ["day"],
            "tenant": ["acme"],
            "key": [""],
            "model": ["gpt"],
        },
        T0 + 99,
    )
    assert query == UsageQuery(
        datetime(2027, 1, 14, tzinfo=UTC).timestamp(),
        T0,
        ("tenant", "model"),
        "day",
        (("tenant", "acme"), ("key_id", ""), ("model", "gpt")),
    )


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"groupby": ["tenant"]}, "groupby"),
        ({"from": ["1", "2"]}, "from"),
        ({"granularity": ["week"]}, "granularity"),
        ({"from": ["1800000000"], "to": ["1800000000"]}, "from"),
        ({"from": ["1800000001"], "to": ["1800000000"]}, "from"),
        ({"from": ["0"], "granularity": ["hour"]}, "granularity"),
        ({"to": ["soon"]}, "to"),
    ],
)
def test_bad_queries(params: dict[str, list[str]], param: str) -> None:
    with pytest.raises(InvalidParam) as raised:
        query_from_params(params, T0)
    assert raised.value.param == param


def test_the_bucket_cap() -> None:
    hours = {"from": [str(T0 - MAX_BUCKETS * 3600)], "granularity": ["hour"]}
    assert query_from_params({**hours, "to": [str(T0)]}, T0).granularity == "hour"
    with pytest.raises(InvalidParam):
        query_from_params({**hours, "to": [str(T0 + 1)]}, T0)
