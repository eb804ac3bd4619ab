"""From raw runs to what a person reads: medians per (scenario, concurrency), the ratio to
the baseline, a text table, a JSON file and a PNG chart.

Each point is measured ``repeats`` times; we report the median req/s and the median of each
latency percentile across those repeats (a noisy shared machine makes single runs lie),
plus the min-max req/s spread so that noise is visible rather than averaged away.

Beside throughput, each row carries the server's CPU cost: CPU microseconds per request
and CPU utilisation during the measured window (from ``/proc/<pid>/stat``). Neighbours on
a shared machine steal wall time, not our process's CPU time, so ``us/req`` and the
``cost`` ratio to the baseline stay steady when req/s does not. ``cpu%`` well below 100
means the server was not the bottleneck: latency-bound at low concurrency, limited by the
load tool, or starved by neighbours, which ``others%`` (other processes' share of the
server's core during the run) tells apart.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from bench.load import LoadResult
from bench.scenarios import Scenario


@attrs.frozen
class Run:
    """One measurement: a result, or why there is none."""

    scenario: str
    concurrency: int
    repeat: int
    result: LoadResult | None = None
    error: str | None = None


@attrs.frozen
class Row:
    """One (scenario, concurrency) point, aggregated over its repeats (``runs`` 0: none)."""

    scenario: str
    protocol: str
    concurrency: int
    tools: tuple[str, ...] = ()
    runs: int = 0
    rps: float = 0.0
    rps_min: float = 0.0
    rps_max: float = 0.0
    p50_ms: float = 0.0
    p90_ms: float = 0.0
    p99_ms: float = 0.0
    errors: int = 0
    non_2xx: int = 0
    #: Median server CPU%: how busy the target's core was (100 = saturated).
    cpu_pct: float | None = None
    #: Median server CPU microseconds per request.
    cpu_us_per_req: float | None = None
    #: Median share of the server's core that other processes used meanwhile (noise).
    others_pct: float | None = None
    baseline: str | None = None
    #: req/s relative to the baseline at the same concurrency (higher is better).
    ratio: float | None = None
    #: CPU per request relative to the baseline's (lower is better; 1.0 = as cheap).
    cost: float | None = None
    note: str = ""
    #: Median p50 / p99 minus the baseline's at the same concurrency (the added latency).
    added_p50_ms: float | None = None
    added_p99_ms: float | None = None
    #: SSE chunk events per response (from the scenario), CPU per chunk, and CPU per chunk
    #: net of the ``net_of`` scenario's CPU per request.
    chunks: int = 0
    us_per_chunk: float | None = None
    net_of: str | None = None
    net_us_per_chunk: float | None = None
    #: Tool-specific figures (streamgen) across repeats: medians; counts summed; memory the
    #: largest.
    extra: dict[str, float] = attrs.Factory(dict)


def cpu_us_per_request(result: LoadResult) -> float:
    if result.server_cpu_s is None or not result.requests:
        return float("nan")
    return result.server_cpu_s * 1e6 / result.requests


def cpu_us_per_chunk(result: LoadResult) -> float:
    """Server CPU per data event received in the window (streamgen runs only)."""
    chunks = (result.extra or {}).get("chunks")
    if result.server_cpu_s is None or not chunks:
        return float("nan")
    return result.server_cpu_s * 1e6 / chunks


def _cpu_pct(result: LoadResult) -> float:
    if result.server_cpu_s is None or result.duration_s <= 0:
        return float("nan")
    return 100 * result.server_cpu_s / result.duration_s


def _others_pct(result: LoadResult) -> float:
    if result.others_cpu_s is None or not result.server_wall_s:
        return float("nan")
    return 100 * result.others_cpu_s / result.server_wall_s


def _median(values: list[float]) -> float | None:
    known = [v for v in values if v == v]  # drop NaN
    return statistics.median(known) if known else None


#: Streamgen figures summed over repeats (the rest are medians, or maxima below).
_SUMMED = ("stalls", "failures", "completed", "ttfc_measured", "chunks")
_MAXED = ("gap_max_ms",)
#: Memory figures all come from the repeat with the most KB per stream (the first, on a
#: fresh server: later repeats reuse the heap it grew).
_MEMORY = ("rss_before_kb", "rss_idle_kb", "rss_peak_kb", "kb_per_stream")


def _extras(results: Sequence[LoadResult]) -> dict[str, float]:
    keys = sorted({k for r in results for k in (r.extra or {})})
    out: dict[str, float] = {}
    for key in keys:
        values = [v for r in results if (v := (r.extra or {}).get(key)) is not None]
        if not values or key in _MEMORY:
            continue
        if key in _SUMMED:
            out[key] = sum(values)
        elif key in _MAXED:
            out[key] = max(values)
        else:
            out[key] = statistics.median(values)
    with_memory = [r.extra for r in results if r.extra and r.extra.get("kb_per_stream") is not None]
    if with_memory:
        worst = max(with_memory, key=lambda x: x["kb_per_stream"] or 0.0)
        out.update({k: v for k in _MEMORY if (v := worst.get(k)) is not None})
    return out


def aggregate(scenarios: Sequence[Scenario], runs: Sequence[Run]) -> list[Row]:
    rows: list[Row] = []
    for scenario in scenarios:
        for conc in scenario.concurrency:
            mine = [r for r in runs if r.scenario == scenario.name and r.concurrency == conc]
            ok = [r.result for r in mine if r.result is not None]
            failures = [r.error for r in mine if r.error]
            note = failures[-1] if failures else ""
            if not ok:
                rows.append(Row(scenario.name, scenario.protocol, conc, note=note or "not run"))
                continue
            rows.append(
                Row(
                    scenario=scenario.name,
                    protocol=scenario.protocol,
                    concurrency=conc,
                    tools=tuple(sorted({r.tool for r in ok})),
                    runs=len(ok),
                    rps=statistics.median(r.rps for r in ok),
                    rps_min=min(r.rps for r in ok),
                    rps_max=max(r.rps for r in ok),
                    p50_ms=statistics.median(r.p50_ms for r in ok),
                    p90_ms=statistics.median(r.p90_ms for r in ok),
                    p99_ms=statistics.median(r.p99_ms for r in ok),
                    errors=sum(r.errors for r in ok),
                    non_2xx=sum(r.non_2xx for r in ok),
                    cpu_pct=_median([_cpu_pct(r) for r in ok]),
                    cpu_us_per_req=_median([cpu_us_per_request(r) for r in ok]),
                    others_pct=_median([_others_pct(r) for r in ok]),
                    baseline=scenario.baseline,
                    note=note,
                    chunks=scenario.chunks,
                    net_of=scenario.net_of,
                    extra=_extras(ok),
                    us_per_chunk=_median([cpu_us_per_chunk(r) for r in ok]),
                )
            )
    by_key = {(row.scenario, row.concurrency): row for row in rows}
    out = []
    for row in rows:
        base = by_key.get((row.baseline or "", row.concurrency))
        if base is not None and base.rps > 0 and row.runs:
            row = attrs.evolve(
                row,
                ratio=row.rps / base.rps,
                added_p50_ms=row.p50_ms - base.p50_ms,
                added_p99_ms=row.p99_ms - base.p99_ms,
            )
            if row.cpu_us_per_req and base.cpu_us_per_req:
                row = attrs.evolve(row, cost=row.cpu_us_per_req / base.cpu_us_per_req)
        cpu = row.cpu_us_per_req
        if row.chunks and row.us_per_chunk is None and cpu is not None:
            row = attrs.evolve(row, us_per_chunk=cpu / row.chunks)
            net = by_key.get((row.net_of or "", row.concurrency))
            if net is not None and net.cpu_us_per_req is not None:
                per_chunk = (cpu - net.cpu_us_per_req) / row.chunks
                row = attrs.evolve(row, net_us_per_chunk=per_chunk)
        out.append(row)
    return out


# --- text ---------------------------------------------------------------------------------

_COLUMNS = (
    ("scenario", "<"),
    ("proto", "<"),
    ("conc", ">"),
    ("tool", "<"),
    ("req/s", ">"),
    ("min-max", ">"),
    ("ratio", ">"),
    ("p50 ms", ">"),
    ("p90 ms", ">"),
    ("p99 ms", ">"),
    ("cpu%", ">"),
    ("us/req", ">"),
    ("cost", ">"),
    ("others%", ">"),
    ("err", ">"),
    ("non2xx", ">"),
)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _cells(row: Row) -> list[str]:
    head = [row.scenario, row.protocol, str(row.concurrency)]
    if not row.runs:
        return head + ["-"] * (len(_COLUMNS) - len(head))
    return [
        *head,
        "+".join(row.tools),
        f"{row.rps:,.0f}",
        f"{row.rps_min:,.0f}-{row.rps_max:,.0f}",
        _fmt(row.ratio, ".2f", "x"),
        f"{row.p50_ms:.2f}",
        f"{row.p90_ms:.2f}",
        f"{row.p99_ms:.2f}",
        _fmt(row.cpu_pct, ".0f"),
        _fmt(row.cpu_us_per_req, ".0f"),
        _fmt(row.cost, ".2f", "x"),
        _fmt(row.others_pct, ".0f"),
        str(row.errors),
        str(row.non_2xx),
    ]


def table(rows: Sequence[Row]) -> str:
    """A plain-text table; rows that did not run are listed with their reason below it."""
    grid = [[name for name, _ in _COLUMNS], *(_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(_COLUMNS))]
    lines = []
    for n, cells in enumerate(grid):
        parts = [
            f"{cell:{align}{width}}"
            for cell, width, (_, align) in zip(cells, widths, _COLUMNS, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    bases = sorted({f"{r.scenario} vs {r.baseline}" for r in rows if r.baseline and r.runs})
    legend = (
        [
            "ratio: req/s / baseline req/s (higher is better); cost: CPU per request / baseline's"
            " (lower is better); both at the same concurrency: " + ", ".join(bases)
        ]
        if bases
        else []
    )
    notes = sorted({f"{r.scenario}: {r.note}" for r in rows if r.note})
    return "\n".join(lines + legend + [f"note: {line}" for line in notes] + derived(rows))


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:+.1f}%"


def derived(rows: Sequence[Row]) -> list[str]:
    """What the columns imply, one line per measured row that has something to add: the
    latency it adds to its baseline, what it costs per chunk, the streamgen figures."""
    out: list[str] = []
    for r in rows:
        if not r.runs:
            continue
        head = f"  {r.scenario} c={r.concurrency}:"
        if r.baseline is not None and r.added_p50_ms is not None:
            faster = None if r.ratio is None else (r.ratio - 1) * 100
            dearer = None if r.cost is None else (r.cost - 1) * 100
            out.append(
                f"{head} vs {r.baseline}: added latency p50 {r.added_p50_ms:+.3f} ms,"
                f" p99 {r.added_p99_ms:+.3f} ms; throughput {_pct(faster)},"
                f" CPU/req {_pct(dearer)}"
            )
        if r.cpu_us_per_req and not r.extra:
            out.append(
                f"{head} {r.cpu_us_per_req:.0f} us CPU/req -> {1e6 / r.cpu_us_per_req:,.0f} req/s"
                " if it had a whole core to itself"
            )
        if r.us_per_chunk is not None:
            how = "CPU / chunks received" if r.extra else f"CPU/request / {r.chunks}"
            line = f"{head} {r.us_per_chunk:.1f} us CPU/chunk ({how})"
            if r.net_us_per_chunk is not None:
                line += f"; net of {r.net_of}'s CPU/request: {r.net_us_per_chunk:.1f} us/chunk"
            out.append(line)
        x = r.extra
        if x:
            out.append(
                f"{head} TTFC p50 {r.p50_ms:.2f} p99 {r.p99_ms:.2f} ms; gaps p50"
                f" {x.get('gap_p50_ms', 0):.1f} p99 {x.get('gap_p99_ms', 0):.1f} max"
                f" {x.get('gap_max_ms', 0):.0f} ms; stalls {x.get('stalls', 0):.0f};"
                f" failures {x.get('failures', 0):.0f}; active {x.get('active_mean', 0):.0f};"
                f" {x.get('chunks_per_s', 0):,.0f} chunks/s"
            )
            if "rss_peak_kb" in x:
                out.append(
                    f"{head} RSS before {x.get('rss_before_kb', 0) / 1024:.1f} MB, idle conns"
                    f" {x.get('rss_idle_kb', 0) / 1024:.1f} MB, peak"
                    f" {x['rss_peak_kb'] / 1024:.1f} MB -> {x.get('kb_per_stream', 0):.1f}"
                    " KB per active stream (the repeat with the most)"
                )
            out.append(
                f"{head} generator CPU {x.get('gen_cpu_pct', 0):.0f}%, loop lag p50"
                f" {x.get('gen_lag_p50_ms', 0):.1f} p99 {x.get('gen_lag_p99_ms', 0):.1f} ms"
                " (near 100% or tens of ms: the generator is the bottleneck)"
            )
    return ["derived:", *out] if out else []


# --- files --------------------------------------------------------------------------------


def write_json(path: Path, meta: dict[str, Any], rows: Sequence[Row], runs: Sequence[Run]) -> None:
    data = {
        "meta": meta,
        "rows": [attrs.asdict(r) for r in rows],
        "runs": [
            {
                "scenario": r.scenario,
                "concurrency": r.concurrency,
                "repeat": r.repeat,
                "error": r.error,
                "result": r.result.to_dict() if r.result else None,
            }
            for r in runs
        ],
    }
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_chart(path: Path, rows: Sequence[Row], title: str) -> None:
    """Grouped bars: req/s (ratio to baseline on top) and p50/p99 latency per concurrency."""
    import matplotlib  # lazily: the harness runs without it when no chart is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in rows if r.runs]
    names = list(dict.fromkeys(r.scenario for r in measured))
    levels = sorted({r.concurrency for r in measured})
    if not names:
        return
    fig, (ax_rps, ax_lat) = plt.subplots(1, 2, figsize=(13, 5))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        mine = {r.concurrency: r for r in measured if r.scenario == name}
        xs = [j + (i - (len(names) - 1) / 2) * width for j, c in enumerate(levels) if c in mine]
        got = [mine[c] for c in levels if c in mine]
        bars = ax_rps.bar(xs, [r.rps for r in got], width, label=name)
        ax_rps.errorbar(
            xs,
            [r.rps for r in got],
            yerr=[[r.rps - r.rps_min for r in got], [r.rps_max - r.rps for r in got]],
            fmt="none",
            ecolor="black",
            capsize=2,
            linewidth=0.8,
        )
        for bar, r in zip(bars, got, strict=True):
            if r.ratio is not None:
                ax_rps.annotate(
                    f"{r.ratio:.2f}x",
                    (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    xytext=(0, 3),
                    textcoords="offset points",
                )
        ax_lat.bar(
            xs,
            [r.p99_ms for r in got],
            width,
            label=f"{name} p99",
            color=bars[0].get_facecolor(),
            alpha=0.45,
        )
        ax_lat.scatter(xs, [r.p50_ms for r in got], marker="_", s=200, color="black", zorder=3)
    for ax, label in (
        (ax_rps, "req/s (median, min-max bars)"),
        (ax_lat, "latency ms (bar: p99, tick: p50)"),
    ):
        ax.set_xticks(range(len(levels)), [f"c={c}" for c in levels])
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    ax_rps.legend(fontsize=8)
    ax_lat.set_yscale("log")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    """Re-print the table (and derived lines) of a run from its results.json."""
    import argparse

    from bench.scenarios import SCENARIOS

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("results", type=Path)
    args = parser.parse_args()
    data = json.loads(args.results.read_text())
    runs = [
        Run(
            r["scenario"],
            r["concurrency"],
            r["repeat"],
            LoadResult.from_dict(r["result"]) if r["result"] else None,
            r["error"],
        )
        for r in data["runs"]
    ]
    names = list(dict.fromkeys(r.scenario for r in runs))
    levels = {n: tuple(sorted({r.concurrency for r in runs if r.scenario == n})) for n in names}
    scenarios = [attrs.evolve(SCENARIOS[n], concurrency=levels[n]) for n in names]
    print(table(aggregate(scenarios, runs)))


if __name__ == "__main__":
    main()
