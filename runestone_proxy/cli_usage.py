"""``runestone-proxy [--config P] usage``: the usage ledger's totals as an aligned table (or
CSV) from a shell on the host, with the service's own config and environment and nothing
else.

It opens the store the config names, on either backend: the SQLite file (``[overflow]
database``, under ``$RUNESTONE_STATE_DIR`` when relative) read-only, or PostgreSQL
(``[overflow] url``, which ``$RUNESTONE_OVERFLOW_URL`` overrides as it does for the gateway)
on a connection of its own; and reads it in one read-only transaction
(``server/usage_report_sql.read``, as the gateway's route does): it works with the gateway
stopped, and while it runs (a reader sees one consistent snapshot and never blocks the
writer). It plans and sums exactly as ``GET /admin/usage`` does; the one difference is that
it cannot flush the running gateways' buffers, so records younger than ``[ledger]
flush_interval_s`` (1 s) may not be counted yet.

Exit status: 0 with the report, 2 for a bad option, 1 when the store cannot be read.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence

from runestone_proxy.api.admin_usage import report_csv
from runestone_proxy.config import Config
from runestone_proxy.errors import GatewayError, InvalidParam
from runestone_proxy.gateway.usage_params import (
    GRANULARITIES,
    GROUPS,
    iso,
    make_query,
    parse_granularity,
    parse_group_by,
    parse_instant,
)
from runestone_proxy.gateway.usage_report import UsageQuery, UsageReport
from runestone_proxy.server import usage_report_sql
from runestone_proxy.server.store import backend_from_config
from runestone_proxy.server.store_values import resolve_path

__all__ = ["HELP", "add_arguments", "read_report", "run", "table"]

HELP = "usage totals from the ledger: a table, or CSV"
_SUM_HEADS = ("requests", "errors", "prompt", "completion", "cached", "reasoning", "cost_usd")


class StoreUnreadable(Exception):
    """The store is missing, is not a ledger this code knows, or the database failed."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    when = "RFC 3339 (2027-01-15T08:00:00Z), unix seconds, or a duration ago (24h, 7d, 1h30m)"
    parser.add_argument("--since", default="24h", metavar="WHEN", help=f"{when}; default 24h")
    parser.add_argument("--until", metavar="WHEN", help=f"{when}; default now")
    parser.add_argument(
        "--by", default="", metavar="COLUMNS", help=f"group by a comma list of {','.join(GROUPS)}"
    )
    parser.add_argument(
        "--granularity", default="total", metavar="|".join(GRANULARITIES), help="default total"
    )
    for name in GROUPS:
        parser.add_argument(f"--{name}", metavar="VALUE", help=f"only this {name}")
    parser.add_argument("--csv", action="store_true", help="CSV (RFC 4180) instead of a table")


def main(argv: list[str], config: Config, env: Mapping[str, str]) -> int:
    """``runestone-proxy [--config P] usage ...`` (``__main__.COMMANDS``)."""
    parser = argparse.ArgumentParser(prog="runestone-proxy usage", description=HELP)
    add_arguments(parser)
    return run(config, parser.parse_args(argv), env)


def run(config: Config, args: argparse.Namespace, env: Mapping[str, str]) -> int:
    try:
        query = _query(args, time.time())
    except InvalidParam as exc:
        print(f"runestone-proxy usage: {exc.message}", file=sys.stderr)
        return 2
    try:
        report = read_report(config, env, query)
    except StoreUnreadable as exc:
        print(f"runestone-proxy usage: {exc}", file=sys.stderr)
        return 1
    sys.stdout.write(report_csv(report) if args.csv else table(report))
    return 0


def _query(args: argparse.Namespace, now: float) -> UsageQuery:
    end = now if args.until is None else parse_instant(args.until, "--until", now=now)
    return make_query(
        start=parse_instant(args.since, "--since", now=now),
        end=end,
        group_by=parse_group_by(args.by, "--by"),
        granularity=parse_granularity(args.granularity, "--granularity"),
        filters=tuple(
            (column, getattr(args, name))
            for name, column in GROUPS.items()
            if getattr(args, name) is not None
        ),
        params=("--since", "--until", "--granularity"),
    )


def read_report(
    config: Config,
    env: Mapping[str, str],
    query: UsageQuery,
    clock: Callable[[], float] = time.time,
) -> UsageReport:
    """``query`` answered from the store ``config`` names, in one read transaction."""
    if config.overflow.backend == "sqlite":
        path = resolve_path(config.overflow.database, env)
        if not path.is_file():
            raise StoreUnreadable(f"no store at {path} (the gateway creates it when it starts)")
    try:
        backend = backend_from_config(config.overflow, env)
        return usage_report_sql.read(backend, query, config.ledger, clock)
    except usage_report_sql.Unreadable as exc:
        raise StoreUnreadable(str(exc)) from exc
    except GatewayError as exc:  # the database cannot be opened (or its driver is missing)
        raise StoreUnreadable(exc.message) from exc


# --- the table -------------------------------------------------------------------------------


def table(report: UsageReport) -> str:
    """The report as aligned text: a line saying the range, the rows, a totals row."""
    query, plan = report.query, report.plan
    by = f", by {', '.join(query.group_by)}" if query.group_by else ""
    lines = [f"usage {iso(query.start)} to {iso(query.end)}, {query.granularity}{by}"]
    if plan.covered is None:
        lines.append("nothing is kept for this range (older than every retention)")
    elif not plan.exact:
        lines.append(
            f"covered {iso(plan.covered[0])} to {iso(plan.covered[1])} (raw records are gone"
            " for part of the range: rounded out to the rollups' hours or days)"
        )
    timed = query.bucket_s is not None
    labels = [*([query.granularity] if timed else []), *query.group_by]
    body: list[list[str]] = []
    for row in report.rows:
        start = [_bucket(row.bucket_start, query.granularity)] if timed else []
        body.append([*start, *row.group, *_numbers(row.sums.as_dict())])
    if not labels:  # one row, the same as the totals: show the totals alone
        labels, body = [""], []
    heads = [*labels, *_SUM_HEADS]
    total = ["total", *[""] * (len(labels) - 1), *_numbers(report.totals.as_dict())]
    widths = [max(len(row[i]) for row in [heads, *body, total]) for i in range(len(heads))]
    rule = "  ".join("-" * w for w in widths)

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.ljust(w) if i < len(labels) else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()

    lines += [line(heads), rule]
    if body:
        lines += [*(line(row) for row in body), rule]
    lines.append(line(total))
    return "\n".join(lines) + "\n"


def _bucket(start: float | None, granularity: str) -> str:
    text = iso(start or 0.0).replace("T", " ").removesuffix("Z")
    return text[:10] if granularity == "day" else text[:16]


def _numbers(sums: Mapping[str, int | float]) -> list[str]:
    counts = [f"{int(value):,}" for name, value in sums.items() if name != "cost_usd"]
    return [*counts, f"{float(sums['cost_usd']):,.6f}"]
