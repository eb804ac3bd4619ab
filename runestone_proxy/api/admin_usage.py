"""``GET /admin/usage``: totals from the usage ledger, as JSON or CSV, for admin keys only.

The parameters (``from``, ``to``, ``group_by``, ``granularity``, the ``tenant`` / ``key`` /
``model`` / ``provider`` filters) are read by ``gateway/usage_params.py`` (400 naming the
parameter for a bad one); the report is planned and summed by ``gateway/usage_report.py``
and run by the store, which writes the records it still buffers first, so a report right
after a request counts it.

``format=csv`` (or ``Accept: text/csv`` preferred to JSON) answers RFC 4180 CSV (``csv``
module quoting, CRLF lines, a header row) for spreadsheets: one line per row and no totals
line (a spreadsheet sums its own columns). A text cell that a spreadsheet would run as a
formula (starting ``=``, ``+``, ``-``, ``@``, tab or CR: a model name is the client's
choice) is prefixed with ``'`` (OWASP's advice against CSV injection).

Both forms carry the range the answer covers in ``x-runestone-usage-covered``
(``<from>/<to>``, RFC 3339) and whether it is the range asked for in
``x-runestone-usage-exact`` (see "beyond retention" in the README).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Iterable
from typing import Any, Literal
from urllib.parse import parse_qs

from runestone_proxy.api.admin_auth import AdminAuth
from runestone_proxy.api.http import JSON_HEADERS, Request, Responder
from runestone_proxy.api.router import Router
from runestone_proxy.errors import InvalidParam
from runestone_proxy.gateway.usage_params import iso, query_from_params
from runestone_proxy.gateway.usage_report import SUMS, Segment, UsageReport, UsageReports

__all__ = ["add_usage_routes", "report_csv", "report_view", "wants_csv"]

CSV_HEADERS = ((b"content-type", b"text/csv; charset=utf-8"),)
#: Cost to 10 decimals: below any price's precision, above float noise (0.1 + 0.2).
COST_DIGITS = 10


def add_usage_routes(
    routers: Iterable[Router],
    admin: AdminAuth,
    reports: UsageReports,
    clock: Callable[[], float],
) -> None:
    """Register ``GET /admin/usage`` on each router, behind ``admin.guard``. ``clock`` is
    the ledger's (the default range ends at its now)."""

    async def usage(request: Request, responder: Responder) -> None:
        params = parse_qs(request.query, keep_blank_values=True)
        csv_form = wants_csv(params.pop("format", None), request.header(b"accept"))
        report = await reports.usage_report(query_from_params(params, clock()))
        covered = report.plan.covered
        headers = [
            (b"x-runestone-usage-covered", _interval(covered).encode()),
            (b"x-runestone-usage-exact", b"true" if report.plan.exact else b"false"),
            (b"cache-control", b"no-store"),
        ]
        if csv_form:
            name = f"usage-{iso(report.query.start)}-{iso(report.query.end)}.csv"
            disposition = f'attachment; filename="{name.replace(":", "")}"'
            headers += [*CSV_HEADERS, (b"content-disposition", disposition.encode())]
            body = report_csv(report).encode()
        else:
            headers += JSON_HEADERS
            body = json.dumps(report_view(report), separators=(",", ":")).encode()
        await responder.respond(200, headers, body)

    guarded = admin.guard(usage)
    for router in routers:
        router.add("GET", "/admin/usage", guarded)


def wants_csv(format_values: list[str] | None, accept: bytes | None) -> bool:
    """``format=csv|json`` decides; without it, ``Accept`` (CSV when ``text/csv`` has a
    higher quality than JSON; JSON on a tie and by default)."""
    if format_values is not None:
        if len(format_values) != 1 or format_values[0] not in ("json", "csv"):
            raise InvalidParam(
                f"format: expected json or csv, got {','.join(format_values)[:32]!r}.",
                param="format",
            )
        return format_values[0] == "csv"
    if not accept:
        return False
    best: dict[str, float] = {"csv": 0.0, "json": 0.0}
    for item in accept.decode("latin-1").split(","):
        media, *options = (part.strip().lower() for part in item.split(";"))
        kind = _KINDS.get(media)
        if kind is not None:
            best[kind] = max(best[kind], _quality(options))
    return best["csv"] > best["json"]


_KINDS: dict[str, Literal["csv", "json"]] = {
    "text/csv": "csv",
    "application/json": "json",
    "application/*": "json",
    "*/*": "json",
}


def _quality(options: list[str]) -> float:
    for option in options:
        name, _, value = option.partition("=")
        if name.strip() == "q":
            try:
                return min(max(float(value), 0.0), 1.0)
            except ValueError:
                return 0.0
    return 1.0


def _interval(covered: tuple[float, float] | None) -> str:
    return "" if covered is None else f"{iso(covered[0])}/{iso(covered[1])}"


def _sums(values: dict[str, int | float]) -> dict[str, int | float]:
    return {**values, "cost_usd": round(values["cost_usd"], COST_DIGITS)}


def report_view(report: UsageReport) -> dict[str, Any]:
    """The JSON answer: the range asked for and the one covered (with the tables read for
    it), the rows, and their totals."""
    query, plan = report.query, report.plan
    rows = []
    for row in report.rows:
        fields: dict[str, Any] = {}
        if row.bucket_start is not None:
            fields["bucket_start"] = iso(row.bucket_start)
        fields.update(zip(query.group_by, row.group, strict=True))
        rows.append({**fields, **_sums(row.sums.as_dict())})
    return {
        "object": "runestone.usage_report",
        "from": iso(query.start),
        "to": iso(query.end),
        "granularity": query.granularity,
        "group_by": list(query.group_by),
        "filters": dict(query.filters),
        "covered": None
        if plan.covered is None
        else {"from": iso(plan.covered[0]), "to": iso(plan.covered[1]), "exact": plan.exact},
        "sources": [_source(s) for s in plan.reads],
        "rows": rows,
        "totals": _sums(report.totals.as_dict()),
    }


def _source(read: Segment) -> dict[str, Any]:
    source: dict[str, Any] = {"table": read.table, "from": iso(read.start), "to": iso(read.end)}
    if read.sign < 0:
        source["subtract"] = True
    return source


def report_csv(report: UsageReport) -> str:
    """The rows as CSV (RFC 4180: CRLF, quoted as needed), with a header row."""
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator="\r\n")
    timed = report.query.granularity != "total"
    writer.writerow([*(["bucket_start"] if timed else []), *report.query.group_by, *SUMS])
    for row in report.rows:
        sums = _sums(row.sums.as_dict())
        start = [iso(row.bucket_start)] if row.bucket_start is not None else []
        group = [_inert(value) for value in row.group]
        writer.writerow([*start, *group, *(sums[name] for name in SUMS)])
    return out.getvalue()


def _inert(text: str) -> str:
    """``text``, unable to start a spreadsheet formula."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
