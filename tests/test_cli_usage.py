"""``runestone-proxy usage`` (``runestone_proxy/cli_usage.py``): the store read directly,
read-only, while a gateway's store has it open; the aligned table; the reasons it cannot
read, with their exit status; and the subcommand through ``__main__`` with ``--config``
before or after it. (End to end, against a running gateway: tests/e2e/test_e2e_admin_usage.)
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from helpers import usage_record

from runestone_proxy import cli_usage
from runestone_proxy.__main__ import main
from runestone_proxy.config import Config, OverflowConfig
from runestone_proxy.gateway.usage_report import DAY_S, UsageQuery
from runestone_proxy.server import store_ledger_sql, store_schema
from runestone_proxy.server.store import Store
from runestone_proxy.server.store_sqlite import SqliteDb

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


async def test_the_cli_reads_the_store_of_a_running_gateway(
    tmp_path: Path, nursery: trio.Nursery
) -> None:
    now = T0 + 10
    config = Config(overflow=OverflowConfig(database="ledger.sqlite3"))
    env = {"RUNESTONE_STATE_DIR": str(tmp_path / "state")}
    store = Store.from_config(config, env)
    store.clock = lambda: now
    await nursery.start(store.run)
    with trio.fail_after(10):
        for r in (
            usage_record(T0 - 60, "acme", model="gpt", cost_usd=0.0105),
            usage_record(T0 - 30, "acme", model="gpt", cost_usd=0.02),
            usage_record(T0 - 7200, "beta", model='claude,"x"', cost_usd=1.5, outcome="error"),
            usage_record(T0 - 2 * DAY_S, "beta"),  # before the range
        ):
            store.record(r)
        await store.sync_ledger()
    query = UsageQuery(now - DAY_S, now, ("tenant", "model"))
    report = cli_usage.read_report(config, env, query, clock=lambda: now)
    assert report.plan.exact
    lines = cli_usage.table(report).splitlines()
    assert lines[0] == "usage 2027-01-14T08:00:10Z to 2027-01-15T08:00:10Z, total, by tenant, model"
    assert lines[1].split() == [
        "tenant", "model", "requests", "errors", "prompt", "completion", "cached",
        "reasoning", "cost_usd",
    ]  # fmt: skip
    assert lines[3].split() == ["acme", "gpt", "2", "0", "20", "10", "4", "2", "0.030500"]
    assert lines[4].split() == ["beta", 'claude,"x"', "1", "1", "10", "5", "2", "1", "1.500000"]
    assert lines[-1].split() == ["total", "3", "1", "30", "15", "6", "3", "1.530500"]
    assert set(lines[2]) == {"-", " "}
    assert lines[5] == lines[2]
    assert len({len(line) for line in lines[1:]}) == 1  # aligned: numbers end in one column


def test_a_report_with_no_grouping_is_its_totals() -> None:
    query = UsageQuery(T0 - DAY_S, T0, granularity="day")
    conn = sqlite3.connect(":memory:", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    conn.execute("BEGIN")
    store_ledger_sql.write(conn, [usage_record(T0 - 60, "a"), usage_record(T0 - 9 * 3600, "b")])
    conn.execute("COMMIT")
    from runestone_proxy.server import usage_report_sql

    report = usage_report_sql.report(conn, query, T0, Config().ledger)
    lines = cli_usage.table(report).splitlines()
    assert lines[1].split()[:2] == ["day", "requests"]
    assert lines[3].split()[:3] == ["2027-01-14", "1", "0"]
    assert lines[4].split()[:3] == ["2027-01-15", "1", "0"]
    assert lines[-1].split()[:2] == ["total", "2"]


def cli_args(**kw: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli_usage.add_arguments(parser)
    return parser.parse_args([f"--{k}={v}" for k, v in kw.items()])


def test_the_cli_says_why_it_cannot_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = Config(overflow=OverflowConfig(database=str(tmp_path / "none.sqlite3")))
    assert cli_usage.run(config, cli_args(), {}) == 1
    assert "no store at" in capsys.readouterr().err
    assert not (tmp_path / "none.sqlite3").exists()  # read-only: nothing created
    old = tmp_path / "old.sqlite3"
    conn = sqlite3.connect(old)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (4)")
    conn.commit()
    conn.close()
    config = Config(overflow=OverflowConfig(database=str(old)))
    assert cli_usage.run(config, cli_args(), {}) == 1
    assert "no usage ledger yet" in capsys.readouterr().err
    # PostgreSQL where nothing listens (port 1 on loopback: refused at once).
    postgres = OverflowConfig(backend="postgres", url="postgresql://u:secret@127.0.0.1:1/r")
    assert cli_usage.run(Config(overflow=postgres), cli_args(), {}) == 1
    err = capsys.readouterr().err
    assert "postgresql://u@127.0.0.1:1/r cannot be read" in err
    assert "secret" not in err
    assert cli_usage.run(config, cli_args(by="team"), {}) == 2
    assert "--by: cannot group usage by 'team'" in capsys.readouterr().err
    assert cli_usage.run(config, cli_args(since="1h", until="2h"), {}) == 2
    assert "--since: the range is empty" in capsys.readouterr().err


def test_the_usage_command_from_main(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``runestone-proxy usage`` through ``__main__``: ``--config`` before or after the
    command, the store under ``$RUNESTONE_STATE_DIR``, no gateway running."""
    conn = sqlite3.connect(tmp_path / "r.sqlite3", isolation_level=None, factory=SqliteDb)
    store_schema.migrate(conn)
    conn.execute("BEGIN")
    now = time.time()
    store_ledger_sql.write(
        conn, [usage_record(now - 60, "acme"), usage_record(now - 120, "beta", cost_usd=2.5)]
    )
    conn.execute("COMMIT")
    conn.close()
    path = tmp_path / "c.toml"
    path.write_text('[overflow]\ndatabase = "r.sqlite3"\n')
    monkeypatch.setenv("RUNESTONE_STATE_DIR", str(tmp_path))
    for argv in (
        ["--config", str(path), "usage", "--by", "tenant", "--csv"],
        ["usage", "--by", "tenant", "--csv", "--config", str(path)],
    ):
        assert main(argv) == 0
        assert capsys.readouterr().out.splitlines() == [
            "tenant,requests,errors,prompt_tokens,completion_tokens,cached_tokens,"
            "reasoning_tokens,cost_usd",
            "acme,1,0,10,5,2,1,0.00123",
            "beta,1,0,10,5,2,1,2.5",
        ]
    assert main(["--config", str(path), "usage", "--granularity", "week"]) == 2
    assert "--granularity: expected one of hour, day, total" in capsys.readouterr().err
