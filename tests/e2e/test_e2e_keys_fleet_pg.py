"""Run-time API keys across a fleet: two ``python -m runestone_proxy`` processes (separate
configs, ports and state directories) on one real PostgreSQL (``[overflow] backend =
"postgres"``), so the keys live in the one ``api_keys`` table both read.

A key made through gateway A's admin API works on A at once (A reloads after its own
change) and on B once B's keys refresh (it polls ``api_keys_version`` every 0.5 s) has seen
it; revoked through A, it is 401 on A at once and on B after B's next refresh. Both
gateways have a config key, so neither runs open while it has no run-time key (an unknown
key is 401 from the start, not "open").

Test rules: 127.0.0.1 and port 0 everywhere; a change reaching B is awaited by asking B
(a bounded loop: nothing on B can be awaited from here), under ``fail_after``.
"""

from __future__ import annotations

import signal
from contextlib import AsyncExitStack
from pathlib import Path

import httpx
import pg_server
import trio
from fleet_helpers import gateway_config, start_fleet

ADMIN = "admin-key-fleet-0123456789"
CONFIG_KEY = "sk-config-fleet-0123456789"
AS_ADMIN = {"authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "mock-1", "messages": [{"role": "user", "content": "hi"}]}
#: The refresh interval is 0.5 s; this bound allows a loaded 2-core machine's scheduling.
REACH_S = 3.0
POLL_S = 0.02

CONFIG = gateway_config(
    {"shutdown_grace_s": 1.0},
    [
        ("[auth]", {"enabled": True}),
        ("[[auth.keys]]", {"key_env": "CONFIG_KEY", "tenant": "ops"}),
        ("[overflow]", {"backend": "postgres"}),
        ("[[providers]]", {"name": "mock", "kind": "mock"}),
        ("[[models]]", {"id": "mock-1", "provider": "mock"}),
    ],
)


async def status(http: httpx.AsyncClient, key: str) -> int:
    answer = await http.post(
        "/v1/chat/completions", json=CHAT, headers={"authorization": f"Bearer {key}"}
    )
    return answer.status_code


async def reached(http: httpx.AsyncClient, key: str, wanted: int) -> float:
    """Ask until ``key`` gets ``wanted``; the seconds it took (at most REACH_S)."""
    started = trio.current_time()
    with trio.fail_after(REACH_S):
        while await status(http, key) != wanted:
            await trio.sleep(POLL_S)
    return trio.current_time() - started


async def test_a_key_made_on_one_gateway_works_on_the_other_and_its_revocation_too(
    tmp_path: Path, pg: pg_server.PgServer
) -> None:
    url = pg.create_database("keys")
    with trio.fail_after(60):
        async with AsyncExitStack() as stack:
            env = {
                "RUNESTONE_OVERFLOW_URL": url,
                "RUNESTONE_ADMIN_KEY": ADMIN,
                "CONFIG_KEY": CONFIG_KEY,
            }
            processes, clients = await start_fleet(
                stack, tmp_path, ("a", "b"), CONFIG, lambda _: env
            )
            a, b = clients["a"], clients["b"]
            assert await status(b, CONFIG_KEY) == 200

            made = await a.post("/admin/keys", json={"tenant": "acme"}, headers=AS_ADMIN)
            assert made.status_code == 201, made.text
            key, key_id = made.json()["key"], made.json()["id"]
            assert await status(a, key) == 200  # at once where it was made
            to_b = await reached(b, key, 200)
            listed = (await b.get("/admin/keys?tenant=acme", headers=AS_ADMIN)).json()
            assert [v["id"] for v in listed["data"]] == [key_id]

            revoked = await a.post(f"/admin/keys/{key_id}/revoke", headers=AS_ADMIN)
            assert revoked.status_code == 200, revoked.text
            assert await status(a, key) == 401
            gone_from_b = await reached(b, key, 401)
            assert await status(b, CONFIG_KEY) == 200

            for process in processes.values():
                process.send_signal(signal.SIGTERM)
                assert await process.wait() == 0
    print(f"created on A -> 200 on B after {to_b:.2f} s; revoked -> 401 after {gone_from_b:.2f} s")
