"""``runestone-proxy keys ...`` from a shell while the gateway runs.

The gateway runs in-process (its SQLite store in the test's directory); the CLI is a real
child process (``python -m runestone_proxy keys ...``) in the same directory with the same
configuration (``./config.toml``: the default store path, and the config key the gateway
has too), opening the store directly. A change it makes reaches the running
gateway through the keys refresh (it polls ``keys_version`` every 0.5 s): the test asks the
gateway until the change shows, at most :data:`BOUND_S`. Also: ``keys list`` lines, the exit
statuses, and the config's own keys listed but refused.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import attrs
import httpx
import pytest
import trio
from conftest import StartGateway
from e2e_helpers import Gateway, chat_body, gateway_config
from fakes import FakeAnthropic, FakeOpenAI

from runestone_proxy.cli_keys import parse_duration
from runestone_proxy.config import AuthConfig, AuthKeyConfig

CONFIG_KEY = "sk-config-key-0123456789"
#: What the CLI reads as its config: the gateway's config key (the store path is default).
CLI_CONFIG = """
[[auth.keys]]
key_env = "CONFIG_KEY"
tenant = "ops"
"""
#: How long a change may take to reach the gateway here: the refresh interval (0.5 s) and
#: a loaded 2-core machine's scheduling.
BOUND_S = 5.0


@attrs.frozen
class Ran:
    status: int
    out: str
    err: str


async def cli(*args: str) -> Ran:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNESTONE_")}
    env["CONFIG_KEY"] = CONFIG_KEY
    done = await trio.run_process(
        [sys.executable, "-m", "runestone_proxy", "keys", *args],
        capture_stdout=True,
        capture_stderr=True,
        check=False,
        cwd=Path.cwd(),
        env=env,
    )
    return Ran(done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture
async def gateway(
    start_gateway: StartGateway, fake_openai: FakeOpenAI, fake_anthropic: FakeAnthropic
) -> Gateway:
    Path("config.toml").write_text(CLI_CONFIG)  # the test's own directory
    base = gateway_config(fake_openai.base_url, fake_anthropic.base_url)
    key = AuthKeyConfig(key_env="CONFIG_KEY", tenant="ops")
    return await start_gateway(
        attrs.evolve(base, auth=AuthConfig(keys=(key,))), {"CONFIG_KEY": CONFIG_KEY}
    )


async def status_of(http: httpx.AsyncClient, key: str) -> int:
    response = await http.post(
        "/v1/chat/completions",
        json=chat_body("gpt-4o-mini"),
        headers={"authorization": f"Bearer {key}"},
    )
    return response.status_code


async def until_status(http: httpx.AsyncClient, key: str, wanted: int) -> float:
    """Ask until ``key`` gets ``wanted`` (bounded by BOUND_S); returns the seconds it took."""
    started = trio.current_time()
    with trio.fail_after(BOUND_S):
        while await status_of(http, key) != wanted:
            await trio.sleep(0.05)
    return trio.current_time() - started


async def test_cli_changes_reach_the_running_gateway(gateway: Gateway) -> None:
    with trio.fail_after(60):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as http:
            made = await cli(
                "create", "--tenant", "acme", "--name", "from the shell", "--rpm", "50"
            )
            assert made.status == 0, made.err
            key = made.out.strip()
            assert key.startswith("sk-rs-")
            assert "\n" not in key
            assert "created key_" in made.err
            assert "acme" in made.err
            await until_status(http, key, 200)

            listed = await cli("list")
            assert listed.status == 0, listed.err
            lines = listed.out.splitlines()
            assert lines[0].split()[:4] == ["ID", "TENANT", "STATUS", "SOURCE"]
            mine = next(line for line in lines if "acme" in line)
            key_id, tenant, status, source = mine.split()[:4]
            assert (tenant, status, source) == ("acme", "active", "store")
            assert mine.endswith("from the shell")
            assert key not in listed.out
            assert any(line.split()[1:4] == ["ops", "active", "config"] for line in lines)

            rotated = await cli("rotate", key_id, "--grace", "0")
            assert rotated.status == 0, rotated.err
            new_key = rotated.out.strip()
            await until_status(http, new_key, 200)
            assert await status_of(http, key) == 401  # a grace of 0 ends the old one at once

            revoked = await cli("revoke", key_id)
            assert revoked.status == 0
            assert revoked.out.strip() == f"{key_id} revoked"
            await until_status(http, new_key, 401)
            assert await status_of(http, CONFIG_KEY) == 200


async def test_cli_refusals_and_exit_statuses(gateway: Gateway) -> None:
    with trio.fail_after(60):
        config_id = next(
            line.split()[0] for line in (await cli("list")).out.splitlines() if " ops " in line
        )
        refused = await cli("revoke", config_id)
        assert refused.status == 1
        assert "read-only" in refused.err
        unknown = await cli("show", "key_0123456789abcdef")
        assert unknown.status == 1
        assert "No key with id" in unknown.err
        bad = await cli("create", "--tenant", "acme", "--rpm", "0")
        assert bad.status == 1
        assert "'rpm'" in bad.err
        usage = await cli("create")
        assert usage.status == 2
        assert "--tenant" in usage.err


def test_durations() -> None:
    assert [parse_duration(t) for t in ("90", "90s", "15m", "24h", "7d", "0")] == [
        90,
        90,
        900,
        86400,
        7 * 86400,
        0,
    ]
    for text in ("", "1w", "-1h", "31d"):
        with pytest.raises(Exception, match=r"duration|at most"):
            parse_duration(text)


def test_the_gateway_still_starts_without_a_command(tmp_path: Path) -> None:
    """``runestone-proxy --check-config`` (no command) is the gateway's own path."""
    done = subprocess.run(
        [sys.executable, "-m", "runestone_proxy", "--check-config"],
        capture_output=True,
        check=False,
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNESTONE_")},
        timeout=30,
    )
    assert done.returncode == 0
    assert b"configuration is valid" in done.stdout
