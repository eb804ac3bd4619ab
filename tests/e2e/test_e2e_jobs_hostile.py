"""No queued job can take the gateway down, or crash-loop it (issue 10, item 8).

The gateway as ``App.build`` + ``App.run`` build it, real sockets, a real fake provider. Jobs
whose run fails, or whose answer is hostile, at run time (lone surrogates in provider error
messages and answers, garbage, an answer over ``upstream.max_response_bytes``), and jobs
left in the database as an older version could have written them (a ``model`` holding an
escaped lone surrogate, a body that is not JSON, text that is not UTF-8): each ends with a
status and, if it failed, an error envelope; the gateway keeps serving; the other jobs
complete. A job whose outcome the store refuses (an SQLite trigger) is claimed at most
``max_claims`` times, then ``dead``, across a restart too.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; waits are for
upstream arrivals or telemetry events, never sleeps.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import h11
import httpx
import pytest
import trio
from flaky_fakes import completion
from jobs_helpers import Answer, _serve

from runestone_proxy import config as config_mod
from runestone_proxy import telemetry
from runestone_proxy.gateway.overflow import NewJob
from runestone_proxy.server import store_schema, store_sql
from runestone_proxy.server.app import App

KEY = "sk-acme-0123456789abcdef"
ENV = {"KEY_ACME": KEY, "RUNESTONE_WEBHOOK_SECRET": "whsec_0123456789"}
AUTH = {"authorization": f"Bearer {KEY}"}
ASYNC = {**AUTH, "prefer": "respond-async"}
TIMEOUT_S = 15
TERMINAL = ("succeeded", "failed", "dead")
MAX_RESPONSE_BYTES = 65536

CONFIG = """
[server]
host = "127.0.0.1"
port = 0
shutdown_grace_s = 0.5

[logging]
access_log = false

[[auth.keys]]
key_env = "KEY_ACME"
tenant = "acme"

[tenants.acme]
max_concurrent = 1

[routing]
max_attempts = 1

[routing.breaker]
failure_threshold = 1000          # hostile answers must not open the circuit for the others
min_requests = 1000

[upstream]
max_response_bytes = {max_response_bytes}

[overflow]
database = "{database}"
backoff_base_s = 0.05
backoff_max_s = 0.2
lease_s = {lease_s}
max_attempts = 2
max_claims = 3

[[providers]]
name = "upstream"
kind = "openai"
base_url = "{upstream}"

{models}
"""

MODELS = ("held-1", "ok-1", "surrogate-error-1", "surrogate-answer-1", "garbage-1", "huge-1")
# What an older version could have stored: the model name with an escaped lone surrogate.
SURROGATE_MODEL = b'{"model":"gpt-\\ud800","messages":[{"role":"user","content":"hi"}]}'


def _error(message: str, code: str) -> bytes:
    envelope = {"error": {"message": message, "type": "invalid_request_error", "code": code}}
    return json.dumps(envelope).encode()  # ensure_ascii: "\ud800" goes out as its escape


def _completion(model: str, content: str) -> bytes:
    return json.dumps(completion(model, content)).encode()  # ensure_ascii: surrogates escaped


@attrs.define(eq=False)
class HostileUpstream:
    """An OpenAI-compatible provider; the model name picks the answer. ``held-1`` waits for
    ``release``; the others answer at once, hostile as their names say."""

    arrivals: list[str] = attrs.Factory(list)
    release: trio.Event = attrs.Factory(trio.Event)
    port: int = 0
    _changed: trio.Event = attrs.Factory(trio.Event)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def count(self, model: str) -> int:
        return self.arrivals.count(model)

    async def wait_arrival(self, model: str) -> None:
        while model not in self.arrivals:
            self._changed = trio.Event()
            await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self.port = await nursery.start(_serve, self._handle)
            task_status.started()

    async def _handle(self, _request: h11.Request, _headers: dict[str, str], raw: bytes) -> Answer:
        json_type = [("content-type", "application/json")]
        model = str(json.loads(raw).get("model", ""))
        self.arrivals.append(model)
        self._changed.set()
        if model == "held-1":
            await self.release.wait()
        if model == "surrogate-error-1":
            return 404, json_type, _error("The model `x\ud800` does not exist", "model_not_found")
        if model == "surrogate-answer-1":
            return 200, json_type, _completion(model, "lone \ud800 and \udfff surrogates")
        if model == "garbage-1":
            return 200, json_type, b"\xff\xfe{not json \xed\xa0\x80"
        if model == "huge-1":
            return 200, json_type, _completion(model, "x" * (2 * MAX_RESPONSE_BYTES))
        return 200, json_type, _completion(model, "fine")


@attrs.define
class Events:
    """Wakes waiters on every ``overflow.drain.stop`` / ``overflow.job.dead``."""

    event: trio.Event = attrs.Factory(trio.Event)
    dead: list[str] = attrs.Factory(list)

    def __call__(self, name: str, fields: dict[str, Any]) -> None:
        if name == "overflow.job.dead":
            self.dead.append(fields["job_id"])
        if name in ("overflow.drain.stop", "overflow.job.dead"):
            self.event.set()
            self.event = trio.Event()


@pytest.fixture
def events() -> Iterator[Events]:
    recorder = Events()
    remove = telemetry.add_handler(recorder)
    yield recorder
    remove()


@attrs.define
class Env:
    app: App
    http: httpx.AsyncClient
    upstream: HostileUpstream
    events: Events

    async def queue(self, model: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
        response = await self.http.post("/v1/chat/completions", json=body, headers=ASYNC)
        assert response.status_code == 202, response.text
        job_id: str = response.json()["job_id"]
        return job_id

    async def view(self, job_id: str) -> dict[str, Any]:
        response = await self.http.get(f"/v1/jobs/{job_id}", headers=AUTH)
        assert response.status_code == 200, response.text
        view: dict[str, Any] = response.json()
        return view

    async def wait_finished(self, job_id: str) -> dict[str, Any]:
        while True:
            settled = self.events.event  # taken before the read: no settle is missed
            view = await self.view(job_id)
            if view["status"] in TERMINAL:
                return view
            await settled.wait()

    async def still_serving_held(self) -> None:
        """A live request to ``held-1`` (it holds acme's one slot until released): 200."""
        body = {"model": "held-1", "messages": [{"role": "user", "content": "hi"}]}
        response = await self.http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text

    async def still_serving(self) -> None:
        body = {"model": "ok-1", "messages": [{"role": "user", "content": "hi"}]}
        response = await self.http.post("/v1/chat/completions", json=body, headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "fine"


def write_config(tmp_path: Path, upstream: HostileUpstream, lease_s: float = 30.0) -> Path:
    models = "\n".join(f'[[models]]\nid = "{m}"\nprovider = "upstream"\n' for m in MODELS)
    text = (
        CONFIG.replace("{database}", str(tmp_path / "jobs.sqlite3"))
        .replace("{upstream}", upstream.base_url)
        .replace("{max_response_bytes}", str(MAX_RESPONSE_BYTES))
        .replace("{lease_s}", str(lease_s))
        .replace("{models}", models)
    )
    path = tmp_path / "config.toml"
    path.write_text(text)
    return path


@asynccontextmanager
async def running(path: Path, upstream: HostileUpstream, events: Events) -> AsyncIterator[Env]:
    """The gateway from ``path``; the test fails if it stops by itself (its nursery would
    raise here)."""
    app = App.build(config_mod.load(path, ENV), path, ENV)
    async with trio.open_nursery() as gateway:
        bound = await gateway.start(app.run)
        url = f"http://127.0.0.1:{bound.port}"
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            yield Env(app, http, upstream, events)
        await app.begin_drain()


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> HostileUpstream:
    fake = HostileUpstream()
    await nursery.start(fake.serve)
    return fake


def assert_envelope(view: dict[str, Any], code: str | None = None) -> None:
    error = view["error"]
    assert set(error) == {"error"}, error
    assert isinstance(error["error"]["message"], str)
    assert error["error"]["message"]
    assert isinstance(error["error"]["type"], str)
    if code is not None:
        assert error["error"]["code"] == code


async def test_hostile_answers_fail_their_own_job_and_nothing_else(
    tmp_path: Path, upstream: HostileUpstream, events: Events
) -> None:
    hostile = ("surrogate-error-1", "garbage-1", "huge-1")
    with trio.fail_after(TIMEOUT_S):
        async with running(write_config(tmp_path, upstream), upstream, events) as env:
            async with trio.open_nursery() as holder:  # fill acme's one slot
                holder.start_soon(env.still_serving_held)
                await upstream.wait_arrival("held-1")
                jobs = {model: await env.queue(model) for model in (*hostile, "ok-1")}
                jobs["surrogate-answer-1"] = await env.queue("surrogate-answer-1")
                upstream.release.set()
            views = {model: await env.wait_finished(job) for model, job in jobs.items()}
            await env.still_serving()
    for model in hostile:
        assert views[model]["status"] == "failed", (model, views[model])
        assert_envelope(views[model])
    assert views["surrogate-error-1"]["error"]["error"]["message"].startswith("The model `x")
    assert views["surrogate-error-1"]["error"]["error"]["code"] == "model_not_found"
    assert views["ok-1"]["status"] == "succeeded"
    answer = views["surrogate-answer-1"]
    assert answer["status"] == "succeeded"  # any text a provider answers is kept as it came
    assert (
        answer["result"]["choices"][0]["message"]["content"] == "lone \ud800 and \udfff surrogates"
    )


async def test_jobs_an_older_version_left_behind_end_failed(
    tmp_path: Path, upstream: HostileUpstream, events: Events
) -> None:
    """The report's case: a ``model`` with an escaped lone surrogate fails at run time with
    ``model_not_found``, whose message carries the surrogate; before the fix storing it
    raised ``UnicodeEncodeError`` and the gateway exited."""
    path = write_config(tmp_path, upstream)
    database = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(database)
    conn.row_factory = sqlite3.Row  # store_sql.insert reads the row back (RETURNING)
    store_schema.migrate(conn)
    ids = {}
    for name, endpoint, body in (
        ("surrogate-model", "chat", SURROGATE_MODEL),
        ("not-json", "chat", b"\xff{"),
        ("unknown-endpoint", "frobnicate", b"{}"),
        ("ok", "chat", b'{"model":"ok-1","messages":[{"role":"user","content":"hi"}]}'),
    ):
        job = NewJob("acme", f"req-{name}", endpoint, body)
        store_sql.insert(conn, job, 1.0)
        ids[name] = job.id
    # A request id that is not UTF-8 (written as bytes into a TEXT column).
    conn.execute("UPDATE jobs SET request_id = CAST(x'ff6964' AS TEXT) WHERE id = ?", (ids["ok"],))
    conn.commit()
    conn.close()
    with trio.fail_after(TIMEOUT_S):
        async with running(path, upstream, events) as env:
            views = {name: await env.wait_finished(job) for name, job in ids.items()}
            await env.still_serving()
    for name in ("surrogate-model", "not-json", "unknown-endpoint"):
        assert views[name]["status"] == "failed", (name, views[name])
        assert_envelope(views[name])
    # The drainer validates a job as the live path does: the model's lone surrogate is a 400.
    surrogate = views["surrogate-model"]["error"]["error"]
    assert (surrogate["code"], surrogate["param"]) == ("invalid_value", "model")
    assert views["ok"]["status"] == "succeeded"
    assert views["ok"]["request_id"] == "\\xffid"


def refuse_outcomes(database: Path, job_id: str) -> None:
    """The store fails to record ``job_id``'s outcome, whatever it is (SQLite raises)."""
    conn = sqlite3.connect(database)
    conn.execute(
        "CREATE TRIGGER refuse_outcome BEFORE UPDATE OF status ON jobs"
        f" WHEN OLD.id = '{job_id}' AND NEW.status IN ('succeeded', 'failed', 'queued')"
        " BEGIN SELECT RAISE(ABORT, 'injected: outcome refused'); END"
    )
    conn.commit()
    conn.close()


async def test_a_job_whose_outcome_cannot_be_stored_ends_dead_after_max_claims(
    tmp_path: Path, upstream: HostileUpstream, events: Events
) -> None:
    path = write_config(tmp_path, upstream, lease_s=0.3)
    with trio.fail_after(TIMEOUT_S):
        async with running(path, upstream, events) as env:
            async with trio.open_nursery() as holder:
                holder.start_soon(env.still_serving_held)
                await upstream.wait_arrival("held-1")
                doomed = await env.queue("surrogate-answer-1")
                other = await env.queue("ok-1")
                refuse_outcomes(tmp_path / "jobs.sqlite3", doomed)
                upstream.release.set()
            view = await env.wait_finished(doomed)
            assert (await env.wait_finished(other))["status"] == "succeeded"
            await env.still_serving()
    assert view["status"] == "dead"
    assert_envelope(view, "job_dead")
    assert view["attempts"] == 3
    assert upstream.count("surrogate-answer-1") == 3  # claimed max_claims times, then buried
    assert events.dead == [doomed]


async def test_after_a_restart_an_unstorable_running_job_is_not_claimed_forever(
    tmp_path: Path, upstream: HostileUpstream, events: Events
) -> None:
    """A database as the crash-looping version left it (schema v1, no claim count): a job
    ``running`` under an expired lease, whose outcome the store refuses."""
    path = write_config(tmp_path, upstream, lease_s=0.3)
    database = tmp_path / "jobs.sqlite3"
    conn = sqlite3.connect(database)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    for statement in store_schema._MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute("INSERT INTO schema_version VALUES (1)")
    job = NewJob("acme", "req-loop", "chat", SURROGATE_MODEL.replace(b"gpt-\\ud800", b"ok-1"))
    conn.execute(  # as version 1 wrote it (the current insert names later columns)
        "INSERT INTO jobs (id, tenant, request_id, endpoint, body, status, next_attempt_at,"
        " created_at, updated_at) VALUES (?, ?, ?, ?, ?, 'queued', 1.0, 1.0, 1.0)",
        (job.id, job.tenant, job.request_id, job.endpoint, job.body),
    )
    conn.execute(
        "UPDATE jobs SET status = 'running', attempts = 4, lease_token = 'stale',"
        " lease_expires_at = 2.0 WHERE id = ?",
        (job.id,),
    )
    conn.commit()
    conn.close()
    refuse_outcomes(database, job.id)
    with trio.fail_after(TIMEOUT_S):
        async with running(path, upstream, events) as env:
            view = await env.wait_finished(job.id)
            await env.still_serving()
    assert view["status"] == "dead"
    assert_envelope(view, "job_dead")
    assert upstream.count("ok-1") == 3 + 1  # three claimed runs, then the live check
