"""Run-time API keys under ``server.workers = 2``: one supervisor, two worker processes on
one SQLite file (and the real redis-server ``[state]`` needs). The admin API's request is
taken by one worker; every worker's keys refresh (it polls ``api_keys_version`` every
0.5 s) puts the key in force, and later its revocation.

Each worker logs ``keys.loaded`` with the version it loaded, tagged ``worker``: the test
waits for both workers' lines, then asks on fresh connections (the workers share the
listening socket, so they answer some each) that every answer agrees.

Test rules: 127.0.0.1, port 0 (ports come from the ``supervisor.ready`` log line); waits are
for log lines, under ``trio.fail_after``.
"""

from __future__ import annotations

import signal
from pathlib import Path

import httpx
import trio
from workers_helpers import redis_server, supervisor_process, write_config

ADMIN = "admin-key-workers-0123456789"
CONFIG_KEY = "sk-config-workers-0123456789"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}
#: Fresh connections per check: with two workers accepting, each gets some of them.
ASKS = 12
TIMEOUT_S = 60
#: A config key, so no worker runs open before it has a run-time key.
EXTRA = """
[[auth.keys]]
key_env = "CONFIG_KEY"
tenant = "ops"
"""


async def statuses(port: int, key: str) -> set[int]:
    """The answers to ASKS requests, each on a connection of its own."""
    seen = set()
    for _ in range(ASKS):
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            answer = await http.post(
                "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
            )
            seen.add(answer.status_code)
    return seen


async def test_every_worker_puts_a_key_and_its_revocation_in_force(tmp_path: Path) -> None:
    with trio.fail_after(TIMEOUT_S):
        async with redis_server(tmp_path) as redis_url:
            config = write_config(
                tmp_path / "config.toml", workers=2, redis_url=redis_url, extra=EXTRA
            )
            text = config.read_text().replace("enabled = false", "enabled = true", 1)
            config.write_text(text)
            env = {"RUNESTONE_ADMIN_KEY": ADMIN, "CONFIG_KEY": CONFIG_KEY}
            async with supervisor_process(config, env) as sup:
                assert sup.port is not None
                await sup.wait_for_count("keys.loaded", 2, version=0)  # each at start
                async with httpx.AsyncClient(
                    base_url=f"http://127.0.0.1:{sup.port}", timeout=10
                ) as http:
                    made = await http.post("/admin/keys", json={"tenant": "acme"}, headers=AS_ADMIN)
                    assert made.status_code == 201, made.text
                    key, key_id = made.json()["key"], made.json()["id"]
                    await sup.wait_for_count("keys.loaded", 2, version=1)
                    assert {r["worker"] for r in sup.records if r.get("version") == 1} == {0, 1}
                    assert await statuses(sup.port, key) == {200}

                    revoked = await http.post(f"/admin/keys/{key_id}/revoke", headers=AS_ADMIN)
                    assert revoked.status_code == 200, revoked.text
                    await sup.wait_for_count("keys.loaded", 2, version=2)
                    assert await statuses(sup.port, key) == {401}
                    assert await statuses(sup.port, CONFIG_KEY) == {200}
                sup.send_signal(signal.SIGTERM)
                assert await sup.wait() == 0
