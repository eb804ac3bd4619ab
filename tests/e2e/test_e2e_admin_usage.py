"""``GET /admin/usage`` and ``runestone-proxy usage`` end to end (issue 14, point 3).

A gateway loaded from a TOML file (the CLI reads the same file), with an admin key, two
tenants' client keys and the two fake providers priced; a few requests on both tenants and
both models (whole and streamed, the chat and Messages dialects, httpx and the official
OpenAI SDK); then the report, at once (the records are still in the store's buffer: the
route flushes it), in JSON and CSV, grouped and bucketed several ways, equal token for
token and cent for cent to what the fakes reported and to what the raw records sum to; the
admin key's guard; bad parameters; and the CLI as a subprocess against the same store. The
report and the CLI run on both store backends: the SQLite file in the state dir, and a real
PostgreSQL server (one per module, a database per test), its URL given to the gateway and
the CLI by ``$RUNESTONE_OVERFLOW_URL``.
"""

from __future__ import annotations

import csv
import io
import math
import os
import sqlite3
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import openai
import pg_server
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import CLAUDE_UPSTREAM, ENV, Gateway, chat_body, in_thread
from fakes import USAGE, FakeAnthropic, FakeOpenAI

from runestone_proxy import config as config_module

ADMIN = "sk-admin-usage-0123456789abcdef"
KEYS = {"acme": "sk-acme-usage-0123456789", "beta": "sk-beta-usage-0123456789"}
#: Prices per 1k tokens (input, output), and the tokens each fake reports per request.
PRICES = {"gpt-4o-mini": (0.15, 0.6), "claude-sonnet": (3.0, 15.0)}
TOKENS = {
    "gpt-4o-mini": (USAGE["prompt_tokens"], USAGE["completion_tokens"]),
    "claude-sonnet": (12, 5),
}
#: (tenant, model) -> requests made in the test.
MADE = {("acme", "gpt-4o-mini"): 3, ("acme", "claude-sonnet"): 1, ("beta", "claude-sonnet"): 2,
        ("beta", "gpt-4o-mini"): 1}  # fmt: skip
MSG = {"anthropic-version": "2023-06-01"}


@pytest.fixture
def backend(request: pytest.FixtureRequest) -> str:
    """The store's backend: ``sqlite`` unless a test asks for both (``indirect``)."""
    return str(getattr(request, "param", "sqlite"))


BOTH = pytest.mark.parametrize("backend", ["sqlite", "postgres"], indirect=True)


def write_config(
    path: Path, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic, backend: str
) -> None:
    models = "".join(
        f'[[models]]\nid = "{model}"\nprovider = "{provider}"\n'
        f'capabilities = ["chat", "streaming"]\n'
        f"input_cost_per_1k = {PRICES[model][0]}\noutput_cost_per_1k = {PRICES[model][1]}\n"
        + (f'upstream_id = "{CLAUDE_UPSTREAM}"\n' if provider == "anthropic" else "")
        for model, provider in (("gpt-4o-mini", "openai"), ("claude-sonnet", "anthropic"))
    )
    keys = "".join(
        f'[[auth.keys]]\nkey_env = "KEY_{tenant.upper()}"\ntenant = "{tenant}"\n' for tenant in KEYS
    )
    # PostgreSQL's URL comes from $RUNESTONE_OVERFLOW_URL (the ``env`` fixture).
    store = 'backend = "postgres"' if backend == "postgres" else 'database = "usage.sqlite3"'
    path.write_text(
        '[server]\nhost = "127.0.0.1"\nport = 0\nshutdown_grace_s = 1.0\n'
        "[logging]\naccess_log = false\n"
        f"[overflow]\n{store}\n"
        "[routing]\nmax_attempts = 1\nretry_base_ms = 0\n"
        f"{keys}"
        f'[[providers]]\nname = "openai"\nkind = "openai"\nbase_url = "{fake_openai.base_url}"\n'
        'api_key_env = "FAKE_OPENAI_KEY"\n'
        f'[[providers]]\nname = "anthropic"\nkind = "anthropic"\n'
        f'base_url = "{fake_anthropic.base_url}"\napi_key_env = "FAKE_ANTHROPIC_KEY"\n'
        f"{models}"
    )


@pytest.fixture
def env(tmp_path: Path, backend: str, request: pytest.FixtureRequest) -> dict[str, str]:
    store = {}
    if backend == "postgres":
        server: pg_server.PgServer = request.getfixturevalue("pg")
        store["RUNESTONE_OVERFLOW_URL"] = server.create_database("usage")
    return {
        **ENV,
        **{f"KEY_{tenant.upper()}": key for tenant, key in KEYS.items()},
        "RUNESTONE_ADMIN_KEY": ADMIN,
        "RUNESTONE_STATE_DIR": str(tmp_path / "state"),
        **store,
    }


@pytest.fixture
async def gateway(
    start_gateway: StartGateway,
    fake_openai: FakeOpenAI,
    fake_anthropic: FakeAnthropic,
    tmp_path: Path,
    env: dict[str, str],
    backend: str,
) -> Gateway:
    path = tmp_path / "runestone.toml"
    write_config(path, fake_openai, fake_anthropic, backend)
    return await start_gateway(config_module.load(path, env), env)


async def make_requests(gateway: Gateway) -> None:
    """The requests in :data:`MADE`."""
    acme = {"authorization": f"Bearer {KEYS['acme']}"}
    beta = {"x-api-key": KEYS["beta"]}
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        for stream in (False, True):
            body = chat_body("gpt-4o-mini", stream=stream)
            r = await http.post("/v1/chat/completions", json=body, headers=acme)
            assert r.is_success, r.text
        r = await http.post("/v1/chat/completions", json=chat_body("claude-sonnet"), headers=acme)
        assert r.is_success, r.text
        for stream in (False, True):
            body = {**chat_body("claude-sonnet", stream=stream), "max_tokens": 64}
            r = await http.post("/v1/messages", json=body, headers={**MSG, **beta})
            assert r.is_success, r.text
        r = await http.post("/v1/chat/completions", json=chat_body("gpt-4o-mini"), headers=beta)
        assert r.is_success, r.text
    client = openai.OpenAI(
        base_url=f"{gateway.url}/v1", api_key=KEYS["acme"], max_retries=0, timeout=10
    )
    try:
        answer = await in_thread(
            client.chat.completions.create,
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Hi"}],
        )
        assert answer.usage is not None
    finally:
        client.close()


def expected(group: tuple[str, ...]) -> dict[tuple[str, ...], tuple[int, int, int, float]]:
    """requests, prompt, completion tokens and USD per ``group`` (of tenant, model)."""
    out: dict[tuple[str, ...], list[Any]] = {}
    for (tenant, model), n in MADE.items():
        key = tuple({"tenant": tenant, "model": model}[g] for g in group)
        sums = out.setdefault(key, [0, 0, 0, []])
        prompt, completion = TOKENS[model]
        sums[0] += n
        sums[1] += n * prompt
        sums[2] += n * completion
        sums[3] += [(prompt * PRICES[model][0] + completion * PRICES[model][1]) / 1000] * n
    return {k: (v[0], v[1], v[2], math.fsum(v[3])) for k, v in out.items()}


def by_group(rows: list[dict[str, Any]], group: tuple[str, ...]) -> dict[tuple[str, ...], Any]:
    """The rows' sums per ``group``, across buckets (a run may straddle an hour)."""
    out: dict[tuple[str, ...], list[Any]] = {}
    for row in rows:
        sums = out.setdefault(tuple(row[g] for g in group), [0, 0, 0, []])
        sums[0] += int(row["requests"])
        sums[1] += int(row["prompt_tokens"])
        sums[2] += int(row["completion_tokens"])
        sums[3].append(float(row["cost_usd"]))
    return {k: (v[0], v[1], v[2], math.fsum(v[3])) for k, v in out.items()}


def assert_cent_for_cent(got: dict[Any, Any], want: dict[Any, Any]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        assert got[key][:3] == want[key][:3], key
        assert round(got[key][3], 2) == round(want[key][3], 2), key
        assert abs(got[key][3] - want[key][3]) < 1e-9, key


async def report(gateway: Gateway, query: str = "", **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
        auth = {"authorization": f"Bearer {ADMIN}"}
        return await http.get(f"/admin/usage{query}", headers={**auth, **headers})


@BOTH
async def test_usage_report_equals_what_the_providers_reported(
    gateway: Gateway, env: dict[str, str]
) -> None:
    with trio.fail_after(30):
        await make_requests(gateway)
        # At once: the records are still buffered (1 s flush); the route flushes them.
        r = await report(gateway, "?group_by=tenant,model")
        assert r.status_code == 200, r.text
        body = r.json()
        pair = ("tenant", "model")
        assert_cent_for_cent(by_group(body["rows"], pair), expected(pair))
        want_all = expected(())[()]
        assert (body["totals"]["requests"], body["totals"]["prompt_tokens"]) == want_all[:2]
        assert abs(body["totals"]["cost_usd"] - want_all[3]) < 1e-9
        assert body["covered"]["exact"] is True
        assert body["group_by"] == ["tenant", "model"]
        assert body["granularity"] == "total"
        assert r.headers["x-runestone-usage-exact"] == "true"
        # The raw records say the same, cached and reasoning tokens included.
        assert body["totals"] == await raw_totals(gateway, env)

        # CSV, by format= and by Accept.
        for query, headers in (("&format=csv", {}), ("", {"accept": "text/csv"})):
            r = await report(gateway, "?group_by=model,tenant&granularity=hour" + query, **headers)
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/csv; charset=utf-8"
            assert r.text.startswith("bucket_start,model,tenant,requests,errors,prompt_tokens,")
            assert "\r\n" in r.text
            rows = list(csv.DictReader(io.StringIO(r.text, newline="")))
            assert_cent_for_cent(by_group(rows, pair), expected(pair))
            assert all(row["bucket_start"].endswith(":00:00Z") for row in rows)

        # Other groupings and buckets; a filter.
        for query, group in (
            ("?group_by=model&granularity=day", ("model",)),
            ("?group_by=tenant&granularity=hour", ("tenant",)),
            ("?granularity=total", ()),
        ):
            r = await report(gateway, query)
            assert_cent_for_cent(by_group(r.json()["rows"], group), expected(group))
        r = await report(gateway, "?group_by=key,provider&tenant=beta")
        rows = r.json()["rows"]
        assert {row["provider"] for row in rows} == {"openai", "anthropic"}
        assert len({row["key_id"] for row in rows}) == 1  # beta's one key, by its id
        assert KEYS["beta"] not in r.text
        assert sum(row["requests"] for row in rows) == 3
        # A range that ends before the requests: nothing.
        r = await report(gateway, f"?from={int(time.time()) - 7200}&to={int(time.time()) - 3600}")
        assert r.json()["rows"] == []
        assert r.json()["totals"]["requests"] == 0


async def raw_totals(gateway: Gateway, env: dict[str, str]) -> dict[str, Any]:
    """The sums of the raw ``usage`` records in the gateway's database, read behind its back."""
    sql = (
        "SELECT COUNT(*), SUM(CASE WHEN outcome = 'error' THEN 1 ELSE 0 END),"
        " SUM(prompt_tokens), SUM(completion_tokens), SUM(cached_tokens),"
        " SUM(reasoning_tokens), SUM(cost_usd) FROM usage"
    )
    if "RUNESTONE_OVERFLOW_URL" in env:
        import psycopg

        with psycopg.connect(env["RUNESTONE_OVERFLOW_URL"]) as pg_conn:
            row = pg_conn.execute(sql).fetchone()
        assert row is not None
    else:
        path = Path(env["RUNESTONE_STATE_DIR"]) / "usage.sqlite3"
        assert gateway.app.store.path == path
        conn = sqlite3.connect(path)
        try:
            row = conn.execute(sql).fetchone()
        finally:
            conn.close()
    names = ("requests", "errors", "prompt_tokens", "completion_tokens", "cached_tokens",
             "reasoning_tokens", "cost_usd")  # fmt: skip
    totals = {name: int(value) for name, value in zip(names[:-1], row, strict=False)}
    totals["cost_usd"] = round(row[-1], 10)
    return totals


async def test_only_admin_keys_read_usage(gateway: Gateway) -> None:
    with trio.fail_after(10):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            r = await http.get("/admin/usage")
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"
            r = await http.get("/admin/usage", headers={"authorization": f"Bearer {KEYS['acme']}"})
            assert r.status_code == 401
            r = await http.post(
                "/v1/chat/completions",
                json=chat_body("gpt-4o-mini"),
                headers={"authorization": f"Bearer {ADMIN}"},
            )
            assert r.status_code == 401
            r = await http.get("/admin/usage", headers={"authorization": f"Bearer {ADMIN}"})
            assert r.status_code == 200


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("?from=yesterday", "from"),
        ("?to=2027-01-15T08:00:00", "to"),
        ("?from=1800000000&to=1700000000", "from"),
        ("?group_by=tenant,team", "group_by"),
        ("?granularity=week", "granularity"),
        ("?format=xml", "format"),
        ("?groupby=tenant", "groupby"),
        ("?from=0&granularity=hour", "granularity"),
    ],
)
async def test_bad_parameters_are_400_naming_the_parameter(
    gateway: Gateway, query: str, param: str
) -> None:
    with trio.fail_after(10):
        r = await report(gateway, query)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


@BOTH
async def test_the_cli_prints_the_same_totals(
    gateway: Gateway, env: dict[str, str], tmp_path: Path
) -> None:
    with trio.fail_after(60):
        await make_requests(gateway)
        await gateway.app.store.sync_ledger()  # the CLI reads the file; the gateway flushes
        config_path = str(tmp_path / "runestone.toml")
        command = [sys.executable, "-m", "runestone_proxy", "--config", config_path]
        child_env = {**os.environ, **env}
        table = await trio.run_process(
            [*command, "usage", "--since", "1h", "--by", "tenant,model"],
            capture_stdout=True,
            capture_stderr=True,
            env=child_env,
            cwd=tmp_path,
        )
        as_csv = await trio.run_process(
            [*command, "usage", "--by", "tenant,model", "--csv"],
            capture_stdout=True,
            env=child_env,
            cwd=tmp_path,
        )
    lines = table.stdout.decode().splitlines()
    assert lines[0].startswith("usage ")
    assert lines[0].endswith(", total, by tenant, model")
    heads = lines[1].split()
    assert heads[:4] == ["tenant", "model", "requests", "errors"]
    got = {}
    for line in lines[3:-2]:
        cells = line.split()
        row = dict(zip(heads, cells, strict=True))
        got[(row["tenant"], row["model"])] = (
            int(row["requests"].replace(",", "")),
            int(row["prompt"].replace(",", "")),
            int(row["completion"].replace(",", "")),
            float(row["cost_usd"]),
        )
    want = expected(("tenant", "model"))
    assert got.keys() == want.keys()
    for key, (n, prompt, completion, usd) in want.items():
        assert got[key][:3] == (n, prompt, completion)
        assert got[key][3] == round(usd, 6)  # the table shows micro-dollars
    total = lines[-1].split()
    assert total[0] == "total"
    assert int(total[1]) == sum(MADE.values())
    rows = list(csv.DictReader(io.StringIO(as_csv.stdout.decode(), newline="")))
    assert_cent_for_cent(by_group(rows, ("tenant", "model")), want)
