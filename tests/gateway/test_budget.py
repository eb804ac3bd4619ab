"""Budgets as plain data (gateway/budget.py): UTC periods, the estimate, the decision, the
reservation arithmetic and the wire. Fixed times, no event loop; property tests for the
periods and for the overshoot bound."""

from __future__ import annotations

import calendar
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runestone_proxy.config import AuthKeyConfig, ModelConfig, TenantConfig
from runestone_proxy.gateway.budget import (
    NO_BUDGETS,
    Account,
    Budgets,
    Estimate,
    Limit,
    admit,
    day_bounds,
    decide,
    estimate,
    month_bounds,
)
from runestone_proxy.gateway.budget_wire import budget_headers, refusal_message, rfc3339, usd


def utc(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")))


def account(period: str = "day", *, scope: str = "key", start: float = 0.0) -> Account:
    end = start + 86400 if period == "day" else start + 31 * 86400
    return Account(scope, "k1", "acme", "k1", period, start, end)  # type: ignore[arg-type]


# --- periods ----------------------------------------------------------------------------------


def test_a_day_is_the_utc_calendar_day() -> None:
    assert day_bounds(utc("2026-12-05T17:48:09Z")) == (
        utc("2026-12-05T00:00:00Z"),
        utc("2026-12-06T00:00:00Z"),
    )
    midnight = utc("2026-12-06T00:00:00Z")
    assert day_bounds(midnight)[0] == midnight  # a day includes its start ...
    assert day_bounds(midnight - 0.001)[1] == midnight  # ... and not its end


@pytest.mark.parametrize(
    ("now", "start", "end"),
    [
        ("2026-12-31T23:59:59Z", "2026-12-01T00:00:00Z", "2027-01-01T00:00:00Z"),
        ("2027-01-01T00:00:00Z", "2027-01-01T00:00:00Z", "2027-02-01T00:00:00Z"),
        ("2028-02-29T12:00:00Z", "2028-02-01T00:00:00Z", "2028-03-01T00:00:00Z"),
        ("2027-02-28T12:00:00Z", "2027-02-01T00:00:00Z", "2027-03-01T00:00:00Z"),
    ],
)
def test_a_month_is_the_utc_calendar_month(now: str, start: str, end: str) -> None:
    assert month_bounds(utc(now)) == (utc(start), utc(end))


@settings(max_examples=300, derandomize=True)
@given(st.floats(min_value=0, max_value=4_102_444_800, allow_nan=False))
def test_periods_hold_their_instant_and_tile_time(now: float) -> None:
    for bounds in (day_bounds, month_bounds):
        start, end = bounds(now)
        assert start <= now < end
        assert bounds(end)[0] == end  # the next period starts where this one ends
        assert time.gmtime(start)[3:6] == (0, 0, 0)  # at midnight UTC
    assert time.gmtime(month_bounds(now)[0]).tm_mday == 1


def test_rfc3339() -> None:
    assert rfc3339(utc("2027-01-01T00:00:00Z")) == "2027-01-01T00:00:00Z"


# --- budgets from the config ------------------------------------------------------------------


def test_budgets_from_config() -> None:
    key = AuthKeyConfig(key_env="K", budget_usd_day=5.0, budget_tokens_day=1000)
    budgets = Budgets.from_config(key)
    assert budgets.limits == (Limit("day", "usd", 5.0), Limit("day", "tokens", 1000.0))
    assert [limit.name for limit in budgets.limits] == ["usd_day", "tokens_day"]
    assert Budgets.from_config(AuthKeyConfig(key_env="K")) is NO_BUDGETS
    assert Budgets.from_config(TenantConfig(budget_usd_month=20.0)).limits == (
        Limit("month", "usd", 20.0),
    )


# --- the estimate -----------------------------------------------------------------------------

CHEAP = ModelConfig("cheap", "p", input_cost_per_1k=1.0, output_cost_per_1k=2.0)
DEAR = ModelConfig("dear", "q", input_cost_per_1k=3.0, output_cost_per_1k=15.0)
BODY = {"messages": [{"role": "user", "content": "x" * 36}]}  # 40 characters: 10 tokens


def test_the_estimate_prices_the_most_expensive_candidate() -> None:
    body = {**BODY, "max_tokens": 100}
    assert estimate(body, 4096, [CHEAP, DEAR, None]) == Estimate((10 * 3 + 100 * 15) / 1000, 110)
    assert estimate(body, 4096, [None]) == Estimate(0.0, 110)  # no price: no cost


@pytest.mark.parametrize(
    ("fields", "output"),
    [
        ({}, 4096),
        ({"max_tokens": 7}, 7),
        ({"max_completion_tokens": 8, "max_tokens": 7}, 8),
        ({"max_output_tokens": 9}, 9),  # the Responses dialect's name
        ({"max_tokens": True}, 4096),
        ({"max_tokens": 0}, 4096),
    ],
)
def test_the_estimate_reads_the_output_cap(fields: dict[str, object], output: int) -> None:
    assert estimate({**BODY, **fields}, 4096, [CHEAP]).tokens == 10 + output


def test_cached_input_priced_above_input_stays_an_upper_bound() -> None:
    odd = ModelConfig(
        "odd", "p", input_cost_per_1k=1.0, output_cost_per_1k=0.0, cached_input_cost_per_1k=5.0
    )
    assert estimate(BODY, 0, [odd]).usd == 10 * 5.0 / 1000


# --- the decision ----------------------------------------------------------------------------


def test_within_the_limit_is_admitted_and_at_it_refused() -> None:
    acct = account()
    acct.seed(4.0, 0)
    limit = Limit("day", "usd", 5.0)
    assert decide([(acct, limit)], Estimate(1.0, 0)) is None  # 4 + 1 <= 5
    refusal = decide([(acct, limit)], Estimate(1.01, 0))
    assert refusal is not None
    assert (refusal.spent, refusal.held, refusal.estimate) == (4.0, 0.0, 1.01)
    acct.hold(Estimate(0.5, 0))
    assert decide([(acct, limit)], Estimate(0.6, 0)) is not None  # what is in flight counts
    acct.seed(5.0, 0)
    acct.release(Estimate(0.5, 0))
    assert decide([(acct, limit)], Estimate(0.0, 0)) is not None  # spent: even free is refused


def test_tokens_budgets_count_tokens() -> None:
    acct = account()
    acct.seed(0.0, 900)
    limit = Limit("day", "tokens", 1000)
    assert decide([(acct, limit)], Estimate(99.0, 100)) is None
    assert decide([(acct, limit)], Estimate(0.0, 101)) is not None


def test_the_refusal_reported_lasts_longest() -> None:
    day, month = account("day"), account("month")
    day.seed(10.0, 0)
    month.seed(10.0, 0)
    checks = [(day, Limit("day", "usd", 10.0)), (month, Limit("month", "usd", 10.0))]
    refusal = decide(checks, Estimate(0.1, 0))
    assert refusal is not None
    assert refusal.account is month  # waiting for the day's reset would not help
    # A request larger than a budget can never run: that refusal wins.
    small = (day, Limit("day", "usd", 0.05))
    refusal = decide([*checks, small], Estimate(0.1, 0))
    assert refusal is not None
    assert refusal.too_large
    assert refusal.limit.amount == 0.05


def test_release_and_charge() -> None:
    acct = account()
    acct.seed(1.0, 10)
    est = Estimate(0.3, 30)
    acct.hold(est)
    acct.hold(est)
    assert (acct.held_usd, acct.held_tokens, acct.holds) == (0.6, 60, 2)
    acct.release(est)
    acct.charge(0.25, 20)
    assert (acct.spent_usd, acct.spent_tokens) == (1.25, 30)
    acct.release(est)
    assert (acct.held_usd, acct.held_tokens) == (0.0, 0)  # exactly zero with nothing held
    unseeded = account()
    unseeded.charge(0.5, 5)
    assert (unseeded.spent_usd, unseeded.late_usd, unseeded.charges) == (0.0, 0.5, 1)


@settings(max_examples=300, derandomize=True)
@given(
    limit=st.floats(min_value=0.01, max_value=10.0),
    ops=st.lists(
        st.tuples(
            st.floats(min_value=0.0, max_value=2.0),  # the estimate
            st.floats(min_value=0.0, max_value=3.0),  # the real cost
            st.integers(min_value=0, max_value=3),  # requests that end before the next
        ),
        max_size=40,
    ),
)
def test_spend_passes_a_limit_only_by_what_requests_cost_beyond_their_estimates(
    limit: float, ops: list[tuple[float, float, int]]
) -> None:
    """Admission keeps ``spent + held <= limit``; ending a request moves its estimate out of
    ``held`` and its cost into ``spent``. So the spend passes the limit by at most the sum
    of (cost - estimate) over the requests admitted, and never when estimates are upper
    bounds."""
    acct = account()
    acct.seed(0.0, 0)
    budget = Limit("day", "usd", limit)
    open_: list[tuple[Estimate, float]] = []
    excess = 0.0
    for est_usd, cost, ending in ops:
        est = Estimate(est_usd, 0)
        if decide([(acct, budget)], est) is None:
            assert acct.spent_usd + acct.held_usd + est_usd <= limit + 1e-9
            acct.hold(est)
            open_.append((est, cost))
            excess += max(0.0, cost - est_usd)
        for _ in range(min(ending, len(open_))):
            done, real = open_.pop(0)
            acct.release(done)
            acct.charge(real, 0)
        assert acct.spent_usd <= limit + excess + 1e-9
    capped = [min(c, e.usd) for e, c in open_]
    assert acct.held_usd == pytest.approx(sum(e.usd for e, _ in open_), abs=1e-9)
    assert acct.spent_usd + sum(capped) <= limit + excess + 1e-9


# --- the wire ---------------------------------------------------------------------------------


def test_usd_text() -> None:
    assert [usd(x) for x in (25.0, 0.000342, 0.0, 1e-9, 12.5)] == [
        "25",
        "0.000342",
        "0",
        "0",
        "12.5",
    ]


def test_headers_report_the_most_binding_budget_of_each_unit() -> None:
    start = utc("2026-12-05T00:00:00Z")
    day, month = account("day", start=start), account("month", scope="tenant", start=start)
    day.seed(4.0, 100)
    month.seed(7.0, 0)
    day.hold(Estimate(0.5, 50))
    checks = [
        (day, Limit("day", "usd", 10.0)),  # 5.5 left
        (month, Limit("month", "usd", 10.0)),  # 3 left: binds
        (day, Limit("day", "tokens", 1000)),
    ]
    assert dict(budget_headers(checks)) == {
        b"x-runestone-budget-limit-usd": b"10",
        b"x-runestone-budget-remaining-usd": b"3",
        b"x-runestone-budget-reset": b"2027-01-05T00:00:00Z",
        b"x-runestone-budget-limit-tokens": b"1000",
        b"x-runestone-budget-remaining-tokens": b"850",
        b"x-runestone-budget-reset-tokens": b"2026-12-06T00:00:00Z",
    }
    # A refusal reports its own budget for its unit.
    refusal = decide(checks[:1], Estimate(6.0, 0))
    assert refusal is not None
    headers = dict(budget_headers(checks[:1], refusal))
    assert headers[b"x-runestone-budget-remaining-usd"] == b"5.5"
    assert headers[b"x-runestone-budget-reset"] == b"2026-12-06T00:00:00Z"
    assert budget_headers([]) == ()


def test_the_message_names_the_budget_and_its_reset() -> None:
    start = utc("2026-12-05T00:00:00Z")
    acct = account("day", start=start)
    acct.seed(5.0, 0)
    refusal = decide([(acct, Limit("day", "usd", 5.0))], Estimate(0.01, 0))
    assert refusal is not None
    message = refusal_message(refusal, "sk-...abcd")
    assert "daily USD budget of key sk-...abcd ($5 per UTC day)" in message
    assert "$5 spent" in message
    assert message.endswith("It resets at 2026-12-06T00:00:00Z.")
    tenant = account("month", scope="tenant", start=start)
    tenant.seed(0.0, 0)
    refusal = decide([(tenant, Limit("month", "usd", 1.0))], Estimate(2.0, 0))
    assert refusal is not None
    assert refusal.too_large
    message = refusal_message(refusal, "-")
    assert "monthly USD budget of tenant 'acme'" in message
    assert "Lower max_tokens" in message


@settings(max_examples=300, derandomize=True)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["usd_day", "usd_month", "tokens_day"]),
            st.floats(min_value=0.01, max_value=10.0),  # the limit
            st.floats(min_value=0.0, max_value=10.0),  # spent
            st.floats(min_value=0.0, max_value=5.0),  # held
        ),
        max_size=4,
    ),
    st.floats(min_value=0.0, max_value=5.0),
    st.integers(min_value=0, max_value=5),
)
def test_the_fast_path_agrees_with_the_decision(
    budgets: list[tuple[str, float, float, float]], est_usd: float, est_tokens: int
) -> None:
    """``admit`` (every request) refuses exactly when ``decide`` (refusals) finds a reason,
    and its headers are :func:`budget_headers` once the request holds its estimate."""
    checks = []
    for index, (name, amount, spent, held) in enumerate(budgets):
        unit, period = name.split("_")
        acct = account(period, start=index * 86400.0)
        acct.seed(spent, int(spent))
        acct.hold(Estimate(held, int(held)))
        checks.append((acct, Limit(period, unit, amount)))  # type: ignore[arg-type]
    est = Estimate(est_usd, est_tokens)
    headers = admit(checks, est)
    assert (headers is None) == (decide(checks, est) is not None)
    if headers is not None:
        for acct in dict.fromkeys(a for a, _ in checks):
            acct.hold(est)
        assert headers == budget_headers(checks)
