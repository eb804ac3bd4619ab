"""Tenancy end to end, over real sockets: API keys, per-tenant concurrency slots, fair
waiting between tenants, per-key rate limits and OpenAI's headers, reload, telemetry.

The gateway runs in-process from a config file (``App.build(config, path, env)``, so
``app.reload()`` re-reads it as SIGHUP does) in front of :class:`TenancyFake`, which counts
concurrent upstream calls per tenant (the request's ``user`` field, which the gateway
forwards untouched) and holds streams until the test releases them. Clients: the official
``openai`` SDK (its sync client in a worker thread), httpx for headers, raw trio sockets for
clients that vanish mid-stream, and a bare h11 client for the throughput measurement.

Test rules: 127.0.0.1 and port 0 only; every test under ``trio.fail_after``; waits are on
the fake's counters, telemetry events or the capacity's own release notification
(``Capacity.wait_freed``). One wait polls: requests parked in a tenant's FIFO
(``Capacity.waiting_of``) announce themselves nowhere, so :func:`until` checks that counter
every few milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import attrs
import h11
import httpx
import openai
import pytest
import structlog
import trio
from tenancy_fakes import HOST, PIECES, TenancyFake

from runestone_proxy import config as config_mod
from runestone_proxy import logs, telemetry
from runestone_proxy.server.app import App

TEXT = "".join(PIECES)
KEYS = {
    "acme": "sk-acme-tenancy-0123456789abcd",
    "globex": "sk-globex-tenancy-0123456789ab",
    "initech": "sk-initech-tenancy-01234567ef",
    "dormant": "sk-dormant-tenancy-0123456789",
}
HASHED_KEY = "sk-hashed-tenancy-0123456789a"
ENV = {
    "TENANCY_UPSTREAM_KEY": "sk-upstream-0123456789",
    **{f"KEY_{name.upper()}": value for name, value in KEYS.items()},
}
MESSAGES: list[Any] = [{"role": "user", "content": "Hi"}]
WAIT_FOREVER = {"on_limit": "wait", "max_wait_ms": 60_000}

T = TypeVar("T")


# --- config and gateway -------------------------------------------------------------------------


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def _table(header: str, fields: Mapping[str, object]) -> str:
    lines = [header, *(f"{name} = {_toml(value)}" for name, value in fields.items())]
    return "\n".join(lines) + "\n"


def key(tenant: str, **fields: object) -> dict[str, object]:
    """An ``[[auth.keys]]`` entry whose key is ``KEYS[tenant]`` (through ``KEY_<TENANT>``)."""
    return {"key_env": f"KEY_{tenant.upper()}", "tenant": tenant, **fields}


def config_text(
    upstream: str,
    keys: Sequence[Mapping[str, object]] = (),
    tenants: Mapping[str, Mapping[str, object]] | None = None,
    global_max: int = 1024,
) -> str:
    """A config.toml: the fake as the only provider (models ``t-fast`` and ``t-hold``)."""
    parts = [
        _table("[server]", {"host": HOST, "port": 0, "shutdown_grace_s": 0.5}),
        _table("[logging]", {"access_log": False}),
        _table("[tenancy]", {"global_max_concurrent": global_max}),
        _table("[routing]", {"max_attempts": 1}),
        _table(
            "[[providers]]",
            {
                "name": "tenancy",
                "kind": "openai",
                "base_url": upstream,
                "api_key_env": "TENANCY_UPSTREAM_KEY",
            },
        ),
        _table("[[models]]", {"id": "t-fast", "provider": "tenancy"}),
        _table("[[models]]", {"id": "t-hold", "provider": "tenancy"}),
        _table("[[models]]", {"id": "t-500", "provider": "tenancy"}),
    ]
    parts += [_table("[[auth.keys]]", k) for k in keys]
    parts += [_table(f"[tenants.{name}]", t) for name, t in (tenants or {}).items()]
    return "\n".join(parts)


@attrs.frozen
class Gateway:
    app: App
    port: int
    path: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def capacity(self) -> Any:
        return self.app.service.capacity


Start = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake(nursery: trio.Nursery) -> TenancyFake:
    fake = TenancyFake()
    await nursery.start(fake.serve)
    return fake


@pytest.fixture
def start(nursery: trio.Nursery, fake: TenancyFake, tmp_path: Path) -> Start:
    """``await start(keys=..., tenants=..., global_max=...)``: a gateway on its own config file."""
    count = 0

    async def start(**options: Any) -> Gateway:
        nonlocal count
        count += 1
        path = tmp_path / f"config-{count}.toml"
        path.write_text(config_text(fake.base_url, **options))
        app = App.build(config_mod.load(path, ENV), path, ENV)
        bound = await nursery.start(app.run)
        return Gateway(app, bound.port, path)

    return start


# --- clients ------------------------------------------------------------------------------------


@contextmanager
def sdk(gw: Gateway, api_key: str, max_retries: int = 0) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"{gw.url}/v1", api_key=api_key, max_retries=max_retries, timeout=15
    )
    try:
        yield client
    finally:
        client.close()


async def in_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await trio.to_thread.run_sync(partial(fn, *args, **kwargs), abandon_on_cancel=True)


def stream_text(client: openai.OpenAI, tenant: str, model: str = "t-hold") -> str:
    """A whole streamed completion through the SDK (blocking: run it in a thread)."""
    chunks = client.chat.completions.create(
        model=model, messages=MESSAGES, user=tenant, stream=True
    )
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def chat(tenant: str, model: str = "t-fast", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": MESSAGES, "user": tenant, **extra}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=15) as client:
        yield client


def bearer(tenant: str) -> dict[str, str]:
    return {"authorization": f"Bearer {KEYS[tenant]}"}


async def open_stream(gw: Gateway, api_key: str, tenant: str) -> trio.SocketStream:
    """Send a held streaming request on a raw connection; the caller reads."""
    body = json.dumps(chat(tenant, "t-hold", stream=True)).encode()
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\n"
        f"authorization: Bearer {api_key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    )
    stream = await trio.open_tcp_stream(HOST, gw.port)
    await stream.send_all(head.encode() + body)
    return stream


async def read_until(stream: trio.SocketStream, marker: bytes, received: bytes = b"") -> bytes:
    while marker not in received:
        chunk = await stream.receive_some(65536)
        assert chunk, f"connection closed before {marker!r}: {received!r}"
        received += chunk
    return received


async def until(predicate: Callable[[], bool]) -> None:
    """Poll a counter that has no event (the capacity's FIFO lengths)."""
    while not predicate():
        await trio.sleep(0.002)


async def slots_freed(gw: Gateway, tenant: str) -> None:
    """Wait, on the capacity's own release notification, until ``tenant`` holds no slot."""
    while gw.capacity.in_flight_of(tenant):
        await gw.capacity.wait_freed()


@contextmanager
def recorded() -> Iterator[telemetry.Recorder]:
    recorder = telemetry.Recorder()
    remove = telemetry.add_handler(recorder)
    try:
        yield recorder
    finally:
        remove()


# --- keys ---------------------------------------------------------------------------------------


async def test_keys_and_401s(start: Start, http: httpx.AsyncClient) -> None:
    sha = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    gw = await start(
        keys=[
            key("acme"),
            key("dormant", active=False),
            {"key_sha256": sha.upper(), "tenant": "hashed"},
        ]
    )
    with trio.fail_after(15):
        for wrong in ("sk-wrong-tenancy-0000000000", KEYS["dormant"]):
            with sdk(gw, wrong) as client, pytest.raises(openai.AuthenticationError) as caught:
                await in_thread(client.chat.completions.create, model="t-fast", messages=MESSAGES)
            assert caught.value.status_code == 401
            assert caught.value.code == "invalid_api_key"
            assert wrong not in caught.value.message  # masked: sk-...xxxx
            assert wrong[-4:] in caught.value.message
        for good in (KEYS["acme"], HASHED_KEY):
            with sdk(gw, good) as client:
                done = await in_thread(
                    client.chat.completions.create, model="t-fast", messages=MESSAGES
                )
            assert done.choices[0].message.content == TEXT

        url = f"{gw.url}/v1/chat/completions"
        ok = await http.post(url, json=chat("acme"), headers={"x-api-key": KEYS["acme"]})
        assert ok.status_code == 200, ok.text
        missing = await http.post(url, json=chat("acme"))
        assert missing.status_code == 401
        assert missing.json()["error"]["code"] == "invalid_api_key"
        basic = await http.post(url, json=chat("acme"), headers={"authorization": "Basic eA=="})
        assert basic.status_code == 401
        for path in ("/health/live", "/health/ready"):
            assert (await http.get(gw.url + path)).status_code == 200, path
        # The detailed view names tenants: a key is needed (test_e2e_health_auth has the rest).
        assert (await http.get(gw.url + "/health")).status_code == 401
        models = await http.get(f"{gw.url}/v1/models")
        assert models.status_code == 401


# --- concurrency slots --------------------------------------------------------------------------


async def test_burst_never_exceeds_max_concurrent(start: Start, fake: TenancyFake) -> None:
    """20 parallel SDK streams, max_concurrent = 3: the fake sees exactly 3 at a time."""
    gw = await start(keys=[key("acme")], tenants={"acme": {"max_concurrent": 3, **WAIT_FOREVER}})
    texts: list[str] = []
    with trio.fail_after(20), sdk(gw, KEYS["acme"]) as client:

        async def one() -> None:
            texts.append(await in_thread(stream_text, client, "acme"))

        async with trio.open_nursery() as nursery:
            for _ in range(20):
                nursery.start_soon(one)
            for left in range(20, 0, -1):
                # Exactly min(3, left) calls upstream, all of them held: the limit is reached
                # while requests remain, and never exceeded.
                want = min(3, left)
                await fake.wait_until(
                    lambda want=want: len(fake.held) == fake.in_flight["acme"] == want  # type: ignore[misc]
                )
                assert fake.peak["acme"] == 3
                assert gw.capacity.in_flight_of("acme") <= 3
                fake.release_oldest()
        await slots_freed(gw, "acme")
    assert texts == [TEXT] * 20
    assert fake.peak["acme"] == 3
    assert len(fake.admitted) == 20
    assert gw.capacity.waiting_of("acme") == 0


async def test_disconnects_release_every_slot(start: Start, fake: TenancyFake) -> None:
    """1,000 streams whose clients vanish: after the first chunk, or while still waiting
    for a slot. No slot leaks: afterwards the tenant's full capacity is available at once."""
    limit, parallel, total = 16, 48, 1000
    gw = await start(
        keys=[key("acme")], tenants={"acme": {"max_concurrent": limit, **WAIT_FOREVER}}
    )
    limiter = trio.CapacityLimiter(parallel)
    with trio.fail_after(30):

        async def vanish(index: int) -> None:
            async with limiter:
                stream = await open_stream(gw, KEYS["acme"], "acme")
                try:
                    if index % 4:  # three in four leave after the first chunk
                        head = await read_until(stream, b"data: ")
                        assert head.startswith(b"HTTP/1.1 200 "), head
                finally:
                    await stream.aclose()

        async with trio.open_nursery() as nursery:
            for index in range(total):
                nursery.start_soon(vanish, index)
        await slots_freed(gw, "acme")
        await fake.wait_until(lambda: fake.total_in_flight == 0)
        assert gw.capacity.waiting_of("acme") == 0
        assert gw.capacity.in_flight == 0
        assert fake.peak["acme"] <= limit
        assert fake.completed == 0
        assert fake.disconnects == len(fake.admitted) >= total * 3 // 4

        # No drift: `limit` new streams are all admitted at once (none waits).
        streams = [await open_stream(gw, KEYS["acme"], "acme") for _ in range(limit)]
        await fake.wait_until(lambda: len(fake.held) == limit)
        assert gw.capacity.waiting_of("acme") == 0
        fake.release_all()
        for stream in streams:
            body = await read_until(stream, b"data: [DONE]")
            assert b'"finish_reason":"stop"' in body.replace(b" ", b"")
            await stream.aclose()
        await slots_freed(gw, "acme")


async def test_fair_waiting_between_tenants(
    start: Start, fake: TenancyFake, http: httpx.AsyncClient
) -> None:
    """Global cap 2: acme bursts 30 waiting requests, then globex sends 3. Globex is served
    interleaved with acme's backlog, not after it."""
    tenants = {t: {"max_concurrent": 50, **WAIT_FOREVER} for t in ("acme", "globex")}
    gw = await start(keys=[key("acme"), key("globex")], tenants=tenants, global_max=2)
    url = f"{gw.url}/v1/chat/completions"
    statuses: list[int] = []
    with trio.fail_after(20):

        async def one(tenant: str) -> None:
            reply = await http.post(
                url, json=chat(tenant, "t-hold", stream=True), headers=bearer(tenant)
            )
            assert reply.text.endswith("data: [DONE]\n\n")
            statuses.append(reply.status_code)

        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one, "acme")
            await until(lambda: gw.capacity.waiting_of("acme") == 28)
            for _ in range(3):
                nursery.start_soon(one, "globex")
            await until(lambda: gw.capacity.waiting_of("globex") == 3)
            assert fake.admitted == ["acme", "acme"]
            for left in range(33, 0, -1):
                want = min(2, left)
                await fake.wait_until(
                    lambda want=want: len(fake.held) == fake.total_in_flight == want  # type: ignore[misc]
                )
                fake.release_oldest()
    assert statuses == [200] * 33
    order = fake.admitted
    positions = [i for i, tenant in enumerate(order) if tenant == "globex"]
    # Each of globex's requests gets one of the next slots to free, alternating with acme's
    # (least in-flight first): positions 2, 4, 6 of 33, not 30, 31, 32.
    assert len(positions) == 3
    assert max(positions) <= 8, order


async def test_reject_and_wait_timeout(start: Start, fake: TenancyFake) -> None:
    """on_limit = reject: 429 at once; wait with a tiny max_wait_ms: 429 after the wait. Both
    carry retry-after and the key's x-ratelimit-* headers, and neither uses up the key's
    RPM: a request refused for capacity was never served."""
    gw = await start(
        keys=[key("acme", rpm=3), key("globex")],
        tenants={
            "acme": {"max_concurrent": 1, "on_limit": "reject"},
            "globex": {"max_concurrent": 1, "on_limit": "wait", "max_wait_ms": 80},
        },
    )
    with trio.fail_after(15), recorded() as events:
        held = [await open_stream(gw, KEYS[t], t) for t in ("acme", "globex")]
        await fake.wait_until(lambda: len(fake.held) == 2)
        for tenant, least_s in (("acme", 0.0), ("globex", 0.08)):
            with sdk(gw, KEYS[tenant]) as client:
                began = trio.current_time()
                with pytest.raises(openai.RateLimitError) as caught:
                    await in_thread(
                        client.chat.completions.create, model="t-fast", messages=MESSAGES
                    )
                waited = trio.current_time() - began
            error = caught.value
            assert least_s <= waited < least_s + 1.0  # reject: at once; wait: after 80 ms
            assert error.status_code == 429
            assert error.code == "rate_limit_exceeded"
            assert error.response.headers["retry-after"] == "1"
            assert f"Tenant '{tenant}' is at capacity" in error.message
            if tenant == "acme":
                # The held stream counts; the refused request does not.
                assert error.response.headers["x-ratelimit-limit-requests"] == "3"
                assert error.response.headers["x-ratelimit-remaining-requests"] == "2"
        blocks = events.named("ratelimit.block")
        assert [b["limit"] for b in blocks] == ["concurrency", "concurrency_wait"]
        assert [b["tenant"] for b in blocks] == ["acme", "globex"]
        fake.release_all()
        for stream in held:
            await read_until(stream, b"data: [DONE]")
            await stream.aclose()
        await slots_freed(gw, "acme")
        assert fake.admitted == ["acme", "globex"]
        # Two more fit acme's rpm = 3 (the SDK's retries of a capacity 429 cost nothing).
        with sdk(gw, KEYS["acme"]) as client:
            for remaining in ("1", "0"):
                raw = await in_thread(
                    client.chat.completions.with_raw_response.create,
                    model="t-fast",
                    messages=MESSAGES,
                )
                assert raw.headers["x-ratelimit-remaining-requests"] == remaining


async def test_sdk_retries_a_capacity_429(start: Start, fake: TenancyFake) -> None:
    """The SDK retries a 429 after its retry-after (1 s) on its own; by then the slot freed."""
    gw = await start(
        keys=[key("acme")], tenants={"acme": {"max_concurrent": 1, "on_limit": "reject"}}
    )
    blocked = trio.Event()

    def on_event(event: str, fields: dict[str, Any]) -> None:
        if event == "ratelimit.block":
            blocked.set()

    remove = telemetry.add_handler(on_event)
    try:
        with trio.fail_after(15), sdk(gw, KEYS["acme"], max_retries=1) as client:
            holder = await open_stream(gw, KEYS["acme"], "acme")
            await fake.wait_until(lambda: len(fake.held) == 1)
            async with trio.open_nursery() as nursery:
                answers: list[str | None] = []

                async def call() -> None:
                    done = await in_thread(
                        client.chat.completions.create,
                        model="t-fast",
                        messages=MESSAGES,
                        user="acme",
                    )
                    answers.append(done.choices[0].message.content)

                nursery.start_soon(call)
                await blocked.wait()  # the first attempt was refused
                fake.release_all()
                await read_until(holder, b"data: [DONE]")
                await holder.aclose()
            assert answers == [TEXT]
    finally:
        remove()
    assert fake.admitted == ["acme", "acme"]


# --- rate limits --------------------------------------------------------------------------------


def _duration_ok(text: str) -> bool:
    """OpenAI's reset format: ``20ms``, ``1s``, ``8.64s``, ``1m0s`` ..."""
    return bool(text) and text[-1] == "s" and text[0].isdigit()


async def test_rpm_limit_and_headers(start: Start) -> None:
    gw = await start(keys=[key("acme", rpm=3)])
    with trio.fail_after(15), sdk(gw, KEYS["acme"]) as client:
        for remaining in (2, 1, 0):
            raw = await in_thread(
                client.chat.completions.with_raw_response.create,
                model="t-fast",
                messages=MESSAGES,
                user="acme",
            )
            assert raw.parse().choices[0].message.content == TEXT
            assert raw.headers["x-ratelimit-limit-requests"] == "3"
            assert raw.headers["x-ratelimit-remaining-requests"] == str(remaining)
            assert _duration_ok(raw.headers["x-ratelimit-reset-requests"])
            assert "x-ratelimit-limit-tokens" not in raw.headers  # no TPM on this key
        with pytest.raises(openai.RateLimitError) as caught:
            await in_thread(client.chat.completions.create, model="t-fast", messages=MESSAGES)
        # Streams count the same and carry the headers on their 200 too (checked above for
        # whole answers); a denied stream is an ordinary 429 before any byte of SSE.
        with pytest.raises(openai.RateLimitError):
            await in_thread(stream_text, client, "acme", "t-fast")
    error = caught.value
    headers = error.response.headers
    assert error.code == "rate_limit_exceeded"
    assert error.type == "requests"
    assert "requests per min (RPM): Limit 3, Used 3, Requested 1" in error.message
    assert 1 <= int(headers["retry-after"]) <= 61
    assert headers["x-ratelimit-limit-requests"] == "3"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert _duration_ok(headers["x-ratelimit-reset-requests"])


async def test_tpm_limit_and_headers(start: Start, http: httpx.AsyncClient) -> None:
    """tpm = 1000: max_tokens plus the prompt is reserved at admission and reconciled with
    the real usage (14 tokens) when the answer ends."""
    gw = await start(keys=[key("acme", tpm=1000, rpm=50)])
    url = f"{gw.url}/v1/chat/completions"
    # "user" + "Hi" = 6 characters, ~2 prompt tokens, plus max_tokens.
    with trio.fail_after(15):
        first = await http.post(url, json=chat("acme", max_tokens=100), headers=bearer("acme"))
        assert first.status_code == 200, first.text
        assert first.headers["x-ratelimit-limit-tokens"] == "1000"
        assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - 102)
        assert _duration_ok(first.headers["x-ratelimit-reset-tokens"])
        assert first.headers["x-ratelimit-limit-requests"] == "50"
        second = await http.post(
            url, json=chat("acme", max_tokens=100, stream=True), headers=bearer("acme")
        )
        assert second.status_code == 200
        assert second.text.endswith("data: [DONE]\n\n")
        # The first answer's 102 reserved tokens were settled to its real usage of 14.
        assert second.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 102)
        # The client did not ask for usage, but a tpm key makes Runestone ask the provider:
        # the stream is settled to its real usage (14) too, the client never sees it.
        lines = second.text.splitlines()
        assert all(json.loads(x[6:])["choices"] for x in lines if x.startswith("data: {"))

        # An upstream error is an answer too: it carries the key's headers.
        failed = await http.post(
            url, json=chat("acme", "t-500", max_tokens=10), headers=bearer("acme")
        )
        assert failed.status_code == 500
        assert failed.headers["x-ratelimit-limit-requests"] == "50"
        assert failed.headers["x-ratelimit-remaining-requests"] == "47"
        assert failed.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 14 - 12)

        too_large = await http.post(url, json=chat("acme", max_tokens=5000), headers=bearer("acme"))
        assert too_large.status_code == 429
        error = too_large.json()["error"]
        assert error["type"] == "tokens"
        assert error["code"] == "rate_limit_exceeded"
        assert error["message"].startswith("Request too large for key sk-...")
        assert "retry-after" not in too_large.headers  # it can never fit: do not retry
        assert too_large.headers["x-ratelimit-limit-tokens"] == "1000"

        # Fits the limit, not what is left of this minute: a retryable 429.
        later = await http.post(url, json=chat("acme", max_tokens=990), headers=bearer("acme"))
        assert later.status_code == 429
        assert later.json()["error"]["type"] == "tokens"
        assert 1 <= int(later.headers["retry-after"]) <= 61
        assert later.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 14 - 12)


async def test_tpm_streams_charge_real_usage(start: Start, fake: TenancyFake) -> None:
    """A stream with include_usage is reconciled from its last chunk, through the SDK."""
    gw = await start(keys=[key("acme", tpm=1000)])
    with trio.fail_after(15), sdk(gw, KEYS["acme"]) as client:

        def stream_with_usage() -> int:
            chunks = client.chat.completions.create(
                model="t-fast",
                messages=MESSAGES,
                user="acme",
                stream=True,
                stream_options={"include_usage": True},
                max_tokens=300,
            )
            return [c for c in chunks if c.usage][-1].usage.total_tokens  # type: ignore[union-attr]

        assert await in_thread(stream_with_usage) == 14
        raw = await in_thread(
            client.chat.completions.with_raw_response.create,
            model="t-fast",
            messages=MESSAGES,
            max_tokens=300,
        )
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 302)
    assert fake.completed == 2


async def test_tpm_streams_charge_real_usage_the_client_did_not_ask_for(
    start: Start, fake: TenancyFake
) -> None:
    """A key with a tpm limit: Runestone asks the provider for usage itself, reconciles with
    it, and strips the usage chunk the client did not ask for."""
    gw = await start(keys=[key("acme", tpm=1000)])
    with trio.fail_after(15), sdk(gw, KEYS["acme"]) as client:

        def stream_without_usage() -> list[Any]:
            return list(
                client.chat.completions.create(
                    model="t-fast", messages=MESSAGES, user="acme", stream=True, max_tokens=300
                )
            )

        chunks = await in_thread(stream_without_usage)
        raw = await in_thread(
            client.chat.completions.with_raw_response.create,
            model="t-fast",
            messages=MESSAGES,
            max_tokens=300,
        )
    assert all(c.choices and c.usage is None for c in chunks)
    assert raw.headers["x-ratelimit-remaining-tokens"] == str(1000 - 14 - 302)


# --- reload -------------------------------------------------------------------------------------


async def test_reload_swaps_keys_without_dropping_streams(
    start: Start, fake: TenancyFake, http: httpx.AsyncClient
) -> None:
    sha = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
    gw = await start(keys=[key("acme"), key("globex")], tenants={"acme": {"max_concurrent": 2}})
    url = f"{gw.url}/v1/chat/completions"
    with trio.fail_after(15):
        stream = await open_stream(gw, KEYS["acme"], "acme")
        head = await read_until(stream, b"data: ")
        await fake.wait_until(lambda: len(fake.held) == 1)

        gw.path.write_text(
            config_text(
                fake.base_url,
                keys=[key("acme"), {"key_sha256": sha, "tenant": "newco"}],
                tenants={"acme": {"max_concurrent": 5}, "newco": {"max_concurrent": 1}},
            )
        )
        await gw.app.reload()

        hashed = {"authorization": f"Bearer {HASHED_KEY}"}
        added = await http.post(url, json=chat("newco"), headers=hashed)
        assert added.status_code == 200, added.text
        removed = await http.post(url, json=chat("globex"), headers=bearer("globex"))
        assert removed.status_code == 401
        assert removed.json()["error"]["code"] == "invalid_api_key"
        kept = await http.post(url, json=chat("acme"), headers=bearer("acme"))
        assert kept.status_code == 200
        snapshot = gw.capacity.snapshot()["tenants"]
        assert snapshot["acme"]["max_concurrent"] == 5
        assert snapshot["acme"]["in_flight"] == 1  # the stream still holds its slot
        assert snapshot["newco"]["max_concurrent"] == 1

        # The stream that began before the reload runs to its end.
        fake.release_all()
        body = await read_until(stream, b"data: [DONE]", head)
        await stream.aclose()
        for piece in PIECES:
            assert json.dumps(piece).encode() in body
        await slots_freed(gw, "acme")
    assert fake.disconnects == 0


# --- telemetry ----------------------------------------------------------------------------------


async def test_telemetry_names_tenant_key_mask_and_request(
    start: Start, http: httpx.AsyncClient
) -> None:
    gw = await start(
        keys=[key("acme", rpm=1), key("dormant", active=False)],
        tenants={"acme": {"max_concurrent": 1, "on_limit": "reject"}},
    )
    url = f"{gw.url}/v1/chat/completions"
    wrong = "sk-wrong-tenancy-abcdefghijkl"
    with trio.fail_after(15), recorded() as events:
        for request_id, api_key in (("req-wrong", wrong), ("req-dormant", KEYS["dormant"])):
            headers = {"authorization": f"Bearer {api_key}", "x-request-id": request_id}
            reply = await http.post(url, json=chat("x"), headers=headers)
            assert reply.status_code == 401
        ok = await http.post(url, json=chat("acme"), headers=bearer("acme"))
        assert ok.status_code == 200
        denied = await http.post(
            url, json=chat("acme"), headers={**bearer("acme"), "x-request-id": "req-rpm"}
        )
        assert denied.status_code == 429

    failures = events.named("auth.failure")
    assert [f["request_id"] for f in failures] == ["req-wrong", "req-dormant"]
    assert [f["key_mask"] for f in failures] == ["sk-...ijkl", "sk-...6789"]
    assert failures[0]["tenant"] is None  # an unknown key belongs to nobody
    assert failures[1]["tenant"] == "dormant"
    (block,) = events.named("ratelimit.block")
    assert block["tenant"] == "acme"
    assert block["key_mask"] == "sk-...abcd"
    assert block["request_id"] == "req-rpm"
    assert block["limit"] == "rpm"
    (check,) = events.named("ratelimit.check")
    assert check["tenant"] == "acme"
    assert check["remaining_requests"] == 0
    text = repr(events.events)
    for secret in (wrong, *KEYS.values()):
        assert secret not in text


# --- cost of auth + limits ----------------------------------------------------------------------


class KeepAliveClient:
    """A bare HTTP/1.1 keep-alive client on h11: little enough overhead that the gateway's
    own work shows in the numbers."""

    def __init__(self, stream: trio.SocketStream, request: bytes) -> None:
        self.stream = stream
        self.request = request
        self.conn = h11.Connection(h11.CLIENT)

    async def post(self) -> int:
        await self.stream.send_all(self.request)
        self.conn.send(h11.Request(method="POST", target="/", headers=[("host", "x")]))
        self.conn.send(h11.EndOfMessage())
        status = 0
        while True:
            event = self.conn.next_event()
            if event is h11.NEED_DATA:
                self.conn.receive_data(await self.stream.receive_some(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.EndOfMessage):
                self.conn.start_next_cycle()
                return status
            elif isinstance(event, h11.ConnectionClosed):
                raise AssertionError("closed")


def _post_bytes(api_key: str | None) -> bytes:
    body = json.dumps(chat("acme", max_tokens=16)).encode()
    auth = f"authorization: Bearer {api_key}\r\n" if api_key else ""
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nhost: {HOST}\r\n{auth}"
        f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    ).encode() + body


async def _rate(gw: Gateway, api_key: str | None, requests: int, workers: int) -> float:
    """Requests per second for ``requests`` non-stream requests over ``workers`` keep-alive
    connections (sequential on each)."""
    payload = _post_bytes(api_key)

    async def worker(count: int) -> None:
        stream = await trio.open_tcp_stream(HOST, gw.port)
        client = KeepAliveClient(stream, payload)
        try:
            for _ in range(count):
                assert await client.post() == 200
        finally:
            await stream.aclose()

    began = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(workers):
            nursery.start_soon(worker, requests // workers)
    return requests / (time.perf_counter() - began)


@contextmanager
def production_logging() -> Iterator[None]:
    """Log as production does (level info, JSON, here into a sink), so that debug-level
    telemetry lines are filtered as they would be rather than printed; then restore."""
    saved, level = structlog.get_config(), logs._enabled_level
    logs.configure("info", "json", stream=io.StringIO())
    try:
        yield
    finally:
        structlog.configure(**saved)
        logs._enabled_level = level


async def test_measure_cost_of_auth_and_limits(start: Start) -> None:
    """Report, don't assert: throughput of non-stream requests with auth + RPM/RPH/TPM limits
    vs an open gateway, same process, same fake. Noisy (client, gateway and fake share one
    thread and one core); rounds alternate to spread drift over both."""
    limited = await start(keys=[key("acme", rpm=10**7, rph=10**8, tpm=10**9)])
    open_ = await start()
    rounds, per_round, workers = 4, 500, 4
    rates: dict[str, list[float]] = {"open": [], "auth+limits": []}
    with trio.fail_after(40), production_logging():
        await _rate(open_, None, 100, workers)  # warm both paths and the upstream pool
        await _rate(limited, KEYS["acme"], 100, workers)
        for _ in range(rounds):
            rates["open"].append(await _rate(open_, None, per_round, workers))
            rates["auth+limits"].append(await _rate(limited, KEYS["acme"], per_round, workers))
    best = {name: max(values) for name, values in rates.items()}
    mean = {name: sum(values) / len(values) for name, values in rates.items()}
    cost_us = (1 / mean["auth+limits"] - 1 / mean["open"]) * 1e6
    print(
        f"\n[tenancy cost] {rounds * per_round} requests each, {workers} connections: "
        f"open {mean['open']:.0f} req/s (best {best['open']:.0f}), "
        f"auth+limits {mean['auth+limits']:.0f} req/s (best {best['auth+limits']:.0f}); "
        f"throughput change {100 * (mean['auth+limits'] / mean['open'] - 1):+.1f}%, "
        f"~{cost_us:.0f} us/request (noisy)"
    )
    assert all(rate > 0 for values in rates.values() for rate in values)
